"""SSE keep-alive comments while a stream waits (queued behind --max-seqs 1)
on every streaming endpoint, X-Request-Id on every answer, and requests cut
short mid-stream in each API's own error shape."""
import json
import threading
import time

import pytest
import requests

from server_util import Server, make_model

MODEL = "tiny"
KEEPALIVE = 0.1


@pytest.fixture(scope="module")
def server(moed_bin, tmp_path_factory):
    model = make_model(moed_bin, tmp_path_factory.mktemp("models"))
    s = Server(moed_bin, model, "--served-model-name", MODEL, "--max-seqs", "1", "--ctx-size", "4096",
               "--sse-keepalive", str(KEEPALIVE), log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


MSG = [{"role": "user", "content": "hi"}]
STREAMS = {
    "/v1/chat/completions": {"messages": MSG, "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/messages": {"messages": MSG, "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
}


def carries_text(line):
    """Whether an SSE line is one that holds generated text."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    ev = json.loads(line[6:])
    if ev.get("type") in ("content_block_delta", "response.output_text.delta"):
        return True
    for ch in ev.get("choices") or []:
        if ch.get("text") or (ch.get("delta") or {}).get("content"):
            return True
    return False


def read_stream(server, path, out):
    t0 = time.time()
    r = requests.post(server.url(path), json={"model": MODEL, "stream": True, "ignore_eos": True, **STREAMS[path]},
                      stream=True, timeout=120)
    lines, first_text_at = [], None
    for raw in r.iter_lines():
        line = raw.decode()
        if line:
            lines.append(line)
        if first_text_at is None and line and carries_text(line):
            first_text_at = time.time() - t0
    out[path] = (r.status_code, lines, first_text_at)


def test_keepalive_before_first_token(server):
    # One long request holds the only sequence; a stream on every endpoint waits in the queue behind it.
    blocker = threading.Thread(target=requests.post, args=(server.url("/v1/completions"),), kwargs=dict(
        json={"model": MODEL, "prompt": "x", "max_tokens": 2500, "ignore_eos": True}, timeout=120))
    blocker.start()
    time.sleep(0.2)
    out = {}
    readers = [threading.Thread(target=read_stream, args=(server, p, out)) for p in STREAMS]
    for t in readers:
        t.start()
    for t in readers + [blocker]:
        t.join()
    for path, (status, lines, first_text_at) in out.items():
        assert status == 200, path
        first_text = next(i for i, ln in enumerate(lines) if carries_text(ln))
        keepalives = [i for i, ln in enumerate(lines) if ln == ": keep-alive"]
        assert keepalives and keepalives[0] < first_text, (path, first_text_at, lines[:12])
        # no more than one comment per interval of waiting (the 0.1 s tick gives slack)
        assert len(keepalives) <= first_text_at / KEEPALIVE + 2, (path, len(keepalives), first_text_at)


def test_request_id(server):
    h = requests.get(server.url("/health"))
    assert h.headers["x-request-id"].startswith("req-")
    assert requests.get(server.url("/nope")).headers["x-request-id"].startswith("req-")
    body = {"model": MODEL, "messages": MSG, "max_tokens": 1}
    r = requests.post(server.url("/v1/chat/completions"), json=body, headers={"X-Request-Id": "trace-42_a.b"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42_a.b"
    assert r.json()["id"].startswith("chatcmpl-")  # the body's id is the server's own
    r = requests.post(server.url("/v1/chat/completions"), json=body)
    assert r.headers["x-request-id"] == r.json()["id"]
    s = requests.post(server.url("/v1/chat/completions"), json={**body, "stream": True},
                      headers={"X-Request-Id": "s-1"})
    assert s.headers["x-request-id"] == "s-1"
    for bad in ("has space", "x" * 129, ""):
        r = requests.post(server.url("/v1/chat/completions"), json=body, headers={"X-Request-Id": bad})
        assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"], bad
    assert "x" * 128 == requests.get(server.url("/health"), headers={"X-Request-Id": "x" * 128}).headers["x-request-id"]
    time.sleep(0.2)
    assert "trace-42_a.b" in server.read_log()


def test_cut_short_in_each_apis_shape(moed_bin, tmp_path):
    """A request ended by request_timeout: Anthropic's and the Responses API's
    own error events mid-stream, and Anthropic's error body (504) otherwise."""
    model = make_model(moed_bin, tmp_path)
    s = Server(moed_bin, model, "--served-model-name", MODEL, "--ctx-size", "4096", "--request-timeout", "0.3",
               log_dir=tmp_path).wait_ready()
    try:
        long = {"model": MODEL, "ignore_eos": True}
        msg = {**long, "max_tokens": 4000, "messages": MSG}
        r = requests.post(s.url("/v1/messages"), json=msg, timeout=60)
        assert r.status_code == 504
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "timeout_error", r.text
        r = requests.post(s.url("/v1/messages"), json={**msg, "stream": True}, timeout=60)
        frames = [f for f in r.text.split("\n\n") if f and not f.startswith(":")]
        assert frames[0].startswith("event: message_start\n")
        assert frames[-1].startswith("event: error\n"), frames[-1]
        assert json.loads(frames[-1].split("\n")[1][6:])["error"]["type"] == "timeout_error"
        r = requests.post(s.url("/v1/responses"), timeout=60,
                          json={**long, "max_output_tokens": 4000, "input": "hi", "stream": True})
        frames = [f for f in r.text.split("\n\n") if f and not f.startswith(":")]
        last = json.loads(frames[-1].split("\n")[1][6:])
        assert last["type"] == "error" and last["code"] == "request_timeout", last
        assert last["sequence_number"] == len(frames) - 1
    finally:
        assert s.stop() == 0
