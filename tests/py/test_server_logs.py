"""Log lines hold whatever a client sends: a path or a `model` value with a
newline (%0a), ESC, quotes, backslashes or bytes that are not UTF-8 must
stay inside its one line, escaped (text), or inside a string that
json.loads reads back (--log-format json)."""
import json
import socket

import pytest

from server_util import Server, make_model

# A forged line (newline, then a timestamp and level), a terminal escape,
# quotes, a backslash and two bytes that are not UTF-8.
PATH_RAW = b"/v1/x\n2026-01-01T00:00:00.000Z info  request id=forged status=200\x1b[2J\"q\"\\\xff\xfe"
PATH_SENT = (b"/v1/x%0a2026-01-01T00:00:00.000Z%20info%20%20request%20id=forged%20status=200"
             b"%1b[2J%22q%22%5c%ff%fe")
MODEL = "m\n2026-01-01T00:00:00.000Z error forged\x1b[31m \"q\" \\"


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


def raw_request(port, head, body=b""):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return int(out.split(b" ", 2)[1])


def send_hostile(s):
    assert raw_request(s.port, b"GET " + PATH_SENT + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == 404
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert raw_request(s.port, head, body) == 404


def text_escape(b):
    """The text log's escaping, written independently from log.h's rules."""
    out = []
    i = 0
    while i < len(b):
        for k in (1, 2, 3, 4):  # longest well-formed UTF-8 sequence at i
            try:
                ch = b[i:i + k].decode("utf-8")
                break
            except UnicodeDecodeError:
                ch = None
        if ch is None:
            out.append("\\x%02x" % b[i])
            i += 1
            continue
        i += len(ch.encode())
        out.append({"\\": "\\\\", "\"": "\\\"", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch)
                   or ("\\x%02x" % ord(ch) if ord(ch) < 0x20 or ord(ch) == 0x7f else ch))
    return "\"" + "".join(out) + "\""  # these values hold spaces: quoted


def test_text_log_escapes_client_values(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, log_dir=tmp_path).wait_ready()
    try:
        send_hostile(s)
    finally:
        assert s.stop() == 0
    raw = s.log_path.read_bytes()
    text = raw.decode("utf-8")  # strict: every byte of the log is well-formed UTF-8
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert not [ln for ln in lines if "forged" in ln and " request " not in ln], lines  # no forged line
    reqs = [ln for ln in lines if " request id=" in ln and "/health" not in ln]
    assert len(reqs) == 2, lines
    assert f" GET {text_escape(PATH_RAW)} status=404 " in reqs[0], reqs[0]
    err = f"model: The model '{MODEL}' does not exist (this server serves '{model.stem}')"
    assert reqs[1].endswith(f" error={text_escape(err.encode())}"), reqs[1]


def test_json_log_escapes_client_values(moed_bin, model, tmp_path):
    s = Server(moed_bin, model, "--log-format", "json", log_dir=tmp_path).wait_ready()
    try:
        send_hostile(s)
    finally:
        assert s.stop() == 0
    lines = [json.loads(ln) for ln in s.log_path.read_bytes().decode("utf-8").splitlines()]  # every line parses
    reqs = [ln for ln in lines if ln["msg"] == "request" and ln["path"] != "/health"]
    assert len(reqs) == 2, lines
    # bytes that are not UTF-8 read back as the text \xNN
    assert reqs[0]["path"] == PATH_RAW[:-2].decode() + "\\xff\\xfe"
    assert reqs[0]["status"] == 404
    assert reqs[1]["error"] == f"model: The model '{MODEL}' does not exist (this server serves '{model.stem}')"
