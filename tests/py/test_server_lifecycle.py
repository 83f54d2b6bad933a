"""`moed serve` lifecycle: systemd notifications (STATUS while loading,
READY once serving, WATCHDOG while the engine ticks, STOPPING on SIGTERM),
options from a config file under the environment and flags, and the
per-request timeout."""
import json
import os
import re
import signal
import socket
import threading
import time

import pytest
import requests

from server_util import Server, make_model, sse_events


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


def test_sd_notify(moed_bin, model, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    msgs = []
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            try:
                msgs.append((time.monotonic(), sock.recv(4096).decode()))
            except socket.timeout:
                pass

    t = threading.Thread(target=collect)
    t.start()
    s = Server(moed_bin, model, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, log_dir=tmp_path)
    try:
        s.wait_ready()
        deadline = time.time() + 10
        while not any("READY=1" in m for _, m in msgs) and time.time() < deadline:
            time.sleep(0.05)
        assert requests.get(s.url("/health")).status_code == 200
        time.sleep(1.0)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=20) == 0
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
        s.stop()
        sock.close()
    texts = [m for _, m in msgs]
    ready = [i for i, m in enumerate(texts) if "READY=1" in m]
    assert len(ready) == 1, texts
    assert any(m.startswith("STATUS=loading") for m in texts[:ready[0]]), texts
    assert "STATUS=serving" in texts[ready[0]]
    dogs = [ts for ts, m in msgs if m == "WATCHDOG=1"]
    assert len(dogs) >= 3, texts  # every 0.2 s for over a second
    assert max(b - a for a, b in zip(dogs, dogs[1:])) < 0.8  # 0.2 s apart, with slack for busy CI cores
    stopping = [i for i, m in enumerate(texts) if "STOPPING=1" in m]
    assert stopping and stopping[0] > ready[0]


def test_config_file_env_and_flag_precedence(moed_bin, model, tmp_path):
    conf = tmp_path / "moed.conf"
    conf.write_text("# test config\n"
                    "served_model_name = from-file\n"
                    "api_key = filekey   # a comment\n"
                    "log_format = json\n"
                    "ctx_size = 300\n"
                    "max_seqs = 4\n")
    s = Server(moed_bin, model, "--config", str(conf), "--max-seqs", "2",
               env={"MOED_SERVED_MODEL_NAME": "from-env", "MOED_CTX_SIZE": "320"}, log_dir=tmp_path)
    try:
        s.wait_ready()
        h = {"Authorization": "Bearer filekey"}
        models = requests.get(s.url("/v1/models"), headers=h).json()
        assert models["data"][0]["id"] == "from-env"       # env over file
        assert models["data"][0]["max_model_len"] == 320   # env over file
        assert requests.get(s.url("/v1/models")).status_code == 401  # the file's key is required
        r = requests.post(s.url("/v1/completions"), headers=h, json={"prompt": "x", "n": 3, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # --max-seqs 2 over the file's 4
        r = requests.post(s.url("/v1/completions"), headers=h,
                          json={"model": "from-env", "prompt": "x", "n": 2, "max_tokens": 1})
        assert r.status_code == 200, r.text
    finally:
        assert s.stop() == 0
    lines = [json.loads(ln) for ln in s.read_log().splitlines()]  # every line is JSON
    assert any(ln.get("msg") == "request" and ln.get("status") == 200 for ln in lines)


def test_request_timeout(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, "--ctx-size", "65536", "--request-timeout", "0.3", log_dir=tmp_path).wait_ready()
    try:
        body = {"prompt": "x", "max_tokens": 60000, "ignore_eos": True}
        t = time.perf_counter()
        r = requests.post(s.url("/v1/completions"), json=body, timeout=30)
        assert time.perf_counter() - t < 3
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with requests.post(s.url("/v1/completions"), json=dict(body, stream=True), stream=True, timeout=30) as r:
            evs = list(sse_events(r))
        assert evs[-1] == "[DONE]" and evs[-2]["error"]["code"] == "request_timeout"
        r = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 200
    finally:
        assert s.stop() == 0


def test_health_while_loading_and_failed_load(moed_bin, tmp_path):
    # a truncated model file: the engine fails to load; the server exits 1 with the reason
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    s = Server(moed_bin, bad, log_dir=tmp_path)
    rc = s.proc.wait(timeout=30)
    s.stop()
    assert rc == 1
    # the reason names the file and what is wrong with it, not just "failed"
    log = s.read_log()
    assert re.search(r"model load failed: \S*/bad\.gguf: .*truncated", log), log


def test_health_503_until_ready(moed_bin, model, tmp_path):
    """The socket listens before the model is loaded: until then /health and
    generation requests answer 503 with Retry-After (how many such answers
    a run sees depends on timing; every one must be well formed)."""
    s = Server(moed_bin, model, log_dir=tmp_path)
    seen = []
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                r = requests.get(s.url("/health"), timeout=2)
            except requests.ConnectionError:
                continue
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["status"] == "loading"
            g = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 1}, timeout=5)
            if g.status_code != 200:
                assert g.status_code == 503 and g.headers["Retry-After"]
                assert g.json()["error"]["code"] == "model_not_ready"
        assert seen[-1] == 200
        print(f"503 answers before ready: {len(seen) - 1}")
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("override,marker", [(None, "User: hi\\n\\nAssistant:"),
                                             ("chatml", "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n")])
def test_chat_template_override(moed_bin, model, tmp_path, override, marker):
    """The model's own template (DeepSeek-V2 for mkmodel's deepseek2) unless
    --chat-template names another; --log-prompts shows the rendered prompt."""
    args = ["--log-prompts"] + (["--chat-template", override] if override else [])
    s = Server(moed_bin, model, *args, log_dir=tmp_path).wait_ready()
    try:
        r = requests.post(s.url("/v1/chat/completions"),
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200
    finally:
        assert s.stop() == 0
    prompts = [ln for ln in s.read_log().splitlines() if " prompt id=" in ln]
    assert len(prompts) == 1 and marker in prompts[0], prompts


def test_health_stale_heartbeat(moed_bin, model, tmp_path):
    """/health is 503 'unresponsive' when the engine loop's heartbeat is
    older than heartbeat_timeout. The idle engine ticks every 100 ms, so a
    10 ms threshold makes most probes see a stale heartbeat."""
    s = Server(moed_bin, model, "--heartbeat-timeout", "0.01", log_dir=tmp_path).wait_ready()
    try:
        seen = set()
        for _ in range(40):
            r = requests.get(s.url("/health"))
            seen.add((r.status_code, r.json()["status"]))
            time.sleep(0.01)
        assert (503, "unresponsive") in seen, seen
        assert seen <= {(200, "ok"), (503, "unresponsive")}, seen
    finally:
        assert s.stop() == 0
