"""`moed serve` refuses bad input with the right HTTP status and an
OpenAI-shaped error body naming the field (param), and keeps serving:
every case is followed by a successful request."""
import json
import socket
import threading
import time

import pytest
import requests

from server_util import Server, make_model, metric

CTX = 256


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(moed_bin, model, tmp_path_factory):
    s = Server(moed_bin, model, "--ctx-size", str(CTX), "--max-body", "200000", "--max-seqs", "8",
               "--idle-timeout", "2", log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


@pytest.fixture(scope="module")
def n_vocab(server):
    # the largest id /detokenize accepts + 1
    lo, hi = 0, 1 << 20
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        ok = requests.post(server.url("/detokenize"), json={"tokens": [mid]}).status_code == 200
        lo, hi = (mid, hi) if ok else (lo, mid)
    return hi


def assert_serving(server):
    r = requests.post(server.url("/v1/completions"), json={"prompt": "ok", "max_tokens": 1, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def check_error(r, status, param):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, (param, err)
    return err


MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return {"messages": MSG, **kw}


CHAT_CASES = [
    # (body, param)
    (chat(messages=None), "messages"),
    ({"model": "tiny"}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{}]), "messages[0].role"),
    (chat(messages="hi"), "messages"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]"),
    (chat(model=7), "model"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(n=0), "n"),
    (chat(n=-1), "n"),
    (chat(n=1e9), "n"),
    (chat(n="2"), "n"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-1), "max_tokens"),
    (chat(max_tokens=2**31), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_tokens=CTX), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(temperature=-1), "temperature"),
    (chat(temperature=2.01), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_p=-0.1), "top_p"),
    (chat(top_k=-5), "top_k"),
    (chat(top_k=10**9), "top_k"),
    (chat(min_p=1.5), "min_p"),
    (chat(presence_penalty=2.5), "presence_penalty"),
    (chat(frequency_penalty=-2.5), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(seed="x"), "seed"),
    (chat(logprobs="yes"), "logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(logit_bias=[1, 2]), "logit_bias"),
    (chat(logit_bias={"-1": 1}), "logit_bias"),
    (chat(logit_bias={"10000000": 1}), "logit_bias"),
    (chat(logit_bias={"5": 101}), "logit_bias"),
    (chat(stop=5), "stop"),
    (chat(stop=[None]), "stop"),
    (chat(stop=[str(i) for i in range(10000)]), "stop"),
    (chat(stop=["x" * 5000]), "stop"),
    (chat(ignore_eos=1), "ignore_eos"),
    (chat(user=5), "user"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
]


@pytest.mark.parametrize("body,param", CHAT_CASES, ids=[f"chat{i}-{p}" for i, (_, p) in enumerate(CHAT_CASES)])
def test_chat_bad_fields(server, body, param):
    r = requests.post(server.url("/v1/chat/completions"), data=json.dumps(body))
    err = check_error(r, 400, param)
    assert err["type"] == "invalid_request_error"
    assert_serving(server)


def test_completion_bad_fields(server, n_vocab):
    cases = [
        ({}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [n_vocab]}, "prompt"),
        ({"prompt": [1, 2, 1.5]}, "prompt"),
        ({"prompt": [[1], [n_vocab]]}, "prompt[1]"),
        ({"prompt": ["a", 3]}, "prompt[1]"),
        ({"prompt": [1] * CTX}, "prompt"),  # the prompt alone fills the context
        ({"prompt": [1] * 200, "max_tokens": 100}, "max_tokens"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "logit_bias": {str(n_vocab): 1}}, "logit_bias"),
    ]
    for body, param in cases:
        r = requests.post(server.url("/v1/completions"), data=json.dumps(body))
        check_error(r, 400, param)
    # the largest valid id is accepted
    r = requests.post(server.url("/v1/completions"), json={"prompt": [n_vocab - 1], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert_serving(server)


RAW_CASES = [
    b"{",
    b'{"messages": [{"role": "user", "content": "hi"}',
    b'{"messages": [{"role": "user", "content": "hi"}]} trailing',
    b"",
    b"null",
    b"[]",
    b'{"messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
    b'{"messages": [{"role": "user", "content": "\xed\xa0\x80 surrogate"}]}',
    b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
]


@pytest.mark.parametrize("raw", RAW_CASES, ids=[f"raw{i}" for i in range(len(RAW_CASES))])
def test_malformed_bodies(server, raw):
    r = requests.post(server.url("/v1/chat/completions"), data=raw, headers={"Content-Type": "application/json"})
    check_error(r, 400, None)
    assert_serving(server)


def test_routes_methods_models(server):
    check_error(requests.get(server.url("/v1/nothing")), 404, None)
    check_error(requests.post(server.url("/v2/chat/completions"), json=chat()), 404, None)
    r = requests.get(server.url("/v1/chat/completions"))
    check_error(r, 405, None)
    assert "POST" in r.headers["Allow"]
    check_error(requests.post(server.url("/v1/models"), json={}), 405, None)
    check_error(requests.delete(server.url("/health")), 405, None)
    err = check_error(requests.post(server.url("/v1/chat/completions"), json=chat(model="gpt-4o")), 404, "model")
    assert err["code"] == "model_not_found"
    check_error(requests.get(server.url("/v1/models/nope")), 404, "model")
    assert_serving(server)


def test_oversized_body(server):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 300000}]))
    r = requests.post(server.url("/v1/chat/completions"), data=big)
    check_error(r, 413, None)
    # without Content-Length (chunked upload) the limit holds too
    r = requests.post(server.url("/v1/chat/completions"), data=iter([big[:150000].encode(), big[150000:].encode()]))
    check_error(r, 413, None)
    assert_serving(server)


def raw_request(server, data, timeout=10):
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if b"\r\n\r\n" in out:
                    break
        except (ConnectionResetError, socket.timeout):
            pass
    return out


def test_huge_and_many_headers(server):
    huge = raw_request(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n")
    assert huge.split(b" ", 2)[1] == b"431", huge[:200]
    many = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
    resp = raw_request(server, many)
    assert resp.split(b" ", 2)[1] == b"431", resp[:200]
    bad = raw_request(server, b"NOT HTTP AT ALL\r\n\r\n")
    assert bad == b"" or bad.split(b" ", 2)[1] in (b"400", b"505", b"501"), bad[:200]
    assert_serving(server)


def test_slow_client_times_out_and_is_cancelled(moed_bin, model, tmp_path):
    """A client that stops reading a stream: once the socket buffers are
    full MHD's connection timeout (2 s here) closes it and the engine
    request is cancelled (top_logprobs=20 makes each chunk ~1.5 KB)."""
    server = Server(moed_bin, model, "--ctx-size", "8192", "--idle-timeout", "2", log_dir=tmp_path).wait_ready()
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", server.port))
        body = json.dumps({"messages": MSG, "max_tokens": 8000, "stream": True, "ignore_eos": True,
                           "logprobs": True, "top_logprobs": 20}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        s.recv(200)  # the response starts, then we stop reading
        deadline = time.time() + 60
        while time.time() < deadline:
            m = server.metrics()
            if metric(m, "moed_requests_cancelled_total") > 0 and metric(m, "moed_requests_running") == 0:
                break
            time.sleep(0.25)
        s.close()
        assert metric(m, "moed_requests_cancelled_total") == 1
        assert metric(m, "moed_requests_running") == 0
        assert metric(m, "moed_kv_blocks_used") == 0
        assert metric(m, "moed_generation_tokens_total") < 8000
        assert_serving(server)
    finally:
        assert server.stop() == 0


def test_queue_full_429(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, "--max-seqs", "1", "--queue-limit", "1", "--ctx-size", "65536",
               log_dir=tmp_path).wait_ready()
    try:
        # three prompts, one slot and a queue of one: the third (or the second) does not fit,
        # the ones already queued are cancelled and the answer is the 429
        r = requests.post(s.url("/v1/completions"), json={"prompt": ["a", "b", "c"], "max_tokens": 50})
        check_error(r, 429, None)
        assert r.headers["Retry-After"]
        body = {"prompt": "x", "max_tokens": 60000, "ignore_eos": True, "stream": True}
        streams = []
        done = threading.Event()

        def hold():
            with requests.post(s.url("/v1/completions"), json=body, stream=True) as r:
                streams.append(r.status_code)
                for _ in r.iter_lines():
                    if done.is_set():
                        break

        th = [threading.Thread(target=hold) for _ in range(2)]
        th[0].start()
        time.sleep(0.2)
        th[1].start()
        time.sleep(0.2)
        statuses = []
        for _ in range(3):
            r = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 1})
            statuses.append(r.status_code)
            if r.status_code == 429:
                check_error(r, 429, None)
                assert r.headers["Retry-After"]
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert 429 in statuses, statuses
        done.set()
        [t.join() for t in th]
        assert streams == [200, 200]
        r = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        assert s.stop() == 0


def test_bad_config_is_a_usage_error(moed_bin, model, tmp_path):
    import subprocess
    bad = [["--port", "99999"], ["--log-format", "xml"], ["--nope"], ["--chat-template", "klingon"]]
    for args in bad:
        p = subprocess.run([str(moed_bin), "serve", "-m", str(model), *args], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert "moed serve:" in p.stderr
    p = subprocess.run([str(moed_bin), "serve", "-m", str(tmp_path / "missing.gguf"), "--port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "missing.gguf" in p.stderr
    h = subprocess.run([str(moed_bin), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert h.returncode == 0
    for key in ("--model", "--port", "--api-key", "--ctx-size", "--drain-timeout", "--log-format", "MOED_PORT"):
        assert key in h.stdout
