"""`moed serve` against slow and hostile HTTP clients: request framing that
RFC 9112 makes an error, a key check that answers from the head before any
body byte is read, NUL characters in JSON strings, an API key setting with
no key, and 1,100 sockets trickling their heads and bodies one byte at a
time while /health, /metrics and a chat request must still be answered.

Raw sockets are used wherever the framing itself is under test (HTTP
libraries would fix it up). Every hostile socket is on a loopback address
(127.0.0.0/8 all reach the server on Linux), so nothing leaves the host."""
import json
import resource
import selectors
import socket
import subprocess
import threading
import time

import pytest
import requests

from server_util import Server, make_model, metric

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEAD_S = 3.0  # --header-timeout and --body-timeout of the module's server
PER_IP = 16   # --max-connections-per-ip
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(moed_bin, model, tmp_path_factory):
    s = Server(moed_bin, model, "--api-key", KEY, "--header-timeout", str(HEAD_S), "--body-timeout", str(HEAD_S),
               "--max-connections-per-ip", str(PER_IP), "--ctx-size", "256",
               log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


def chat_ok(server):
    r = requests.post(server.url("/v1/chat/completions"), json=CHAT, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def raw(server, data, src="127.0.0.1", timeout=5.0):
    """Sends data on a fresh connection from src and reads until the server
    closes it or `timeout` passes. Returns (bytes read, closed by server)."""
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", server.port))
    try:
        s.sendall(data)
        out, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out, True
            except socket.timeout:
                return out, False
            if not chunk:
                return out, True
            out += chunk
        return out, False
    finally:
        s.close()


def status_and_json(resp):
    head, _, body = resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), json.loads(body) if body.strip() else None


# --- framing (RFC 9112) ------------------------------------------------------

def test_http11_without_host_is_400(server):
    resp, closed = raw(server, b"GET /health HTTP/1.1\r\n\r\n")
    status, head, body = status_and_json(resp)
    assert status == 400 and "Host" in body["error"]["message"], resp
    assert body["error"]["type"] == "invalid_request_error"
    assert closed and "connection: close" in head.lower()
    # two Host lines are as bad as none
    resp, _ = raw(server, b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status_and_json(resp)[0] == 400
    # HTTP/1.0 has no Host requirement, and a Host makes 1.1 fine
    for req in (b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        resp, _ = raw(server, req)
        assert status_and_json(resp)[0] == 200, resp


@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
], ids=["cl-te", "te-cl", "te-not-chunked", "two-te", "two-cl"])
def test_ambiguous_body_length_is_400_and_closed(server, headers):
    # A request that is otherwise fine (key, route) and keeps the body
    # bytes coming: the server must answer 400 and close without waiting.
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\nContent-Type: application/json\r\n" + headers + b"\r\n5\r\nhello\r\n")
    t0 = time.monotonic()
    resp, closed = raw(server, req)
    status, head, body = status_and_json(resp)
    assert status == 400, resp
    assert "Transfer-Encoding" in body["error"]["message"] or "Content-Length" in body["error"]["message"]
    assert closed and time.monotonic() - t0 < 2, "the connection was kept open"
    assert "connection: close" in head.lower()


# --- the key is checked from the head ---------------------------------------

def head_then_read(server, extra, timeout=5.0):
    """Sends only the head of a 4 MB POST and reads what comes back
    (the body is never sent)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4000000\r\n" + extra + b"\r\n")
        out = b""
        try:
            while b"\r\n\r\n" not in out or (b" 100 " not in out.split(b"\r\n")[0]
                                             and len(out.partition(b"\r\n\r\n")[2]) < 20):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out
    finally:
        s.close()


@pytest.mark.parametrize("extra", [b"", b"Authorization: Bearer wrong\r\n", b"Expect: 100-continue\r\n",
                                   b"Authorization: Bearer wrong\r\nExpect: 100-continue\r\n"],
                         ids=["no-key", "wrong-key", "no-key-expect", "wrong-key-expect"])
def test_401_before_the_body(server, extra):
    out = head_then_read(server, extra)
    assert out.startswith(b"HTTP/1.1 401 "), out[:200]
    body = json.loads(out.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "invalid_api_key"


def test_right_key_gets_100_continue(server):
    # The control: with the key, the same head is let through to its body.
    out = head_then_read(server, b"Authorization: Bearer " + KEY.encode() + b"\r\nExpect: 100-continue\r\n")
    assert out.startswith(b"HTTP/1.1 100 "), out[:200]


def test_health_and_metrics_need_no_key_and_unknown_paths_stay_404(server):
    assert requests.get(server.url("/health"), timeout=5).status_code == 200
    assert requests.get(server.url("/metrics"), timeout=5).status_code == 200
    assert requests.post(server.url("/nope"), data=b"x" * 100, timeout=5).status_code == 404
    assert requests.get(server.url("/v1/chat/completions"), timeout=5).status_code == 405


# --- NUL in strings ------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({**CHAT, "model": "tiny\x00evil"}, "model"),
    ({**CHAT, "messages": [{"role": "user\x00", "content": "hi"}]}, "messages[0].role"),
    ({**CHAT, "messages": [{"role": "user", "name": "a\x00b", "content": "hi"}]}, "messages[0].name"),
    ({**CHAT, "messages": [{"role": "user", "content": "hi\x00there"}]}, "messages[0].content"),
    ({**CHAT, "stop": ["x", "\x00"]}, "stop[1]"),
], ids=["model", "role", "name", "content", "stop"])
def test_nul_in_strings_is_400_naming_the_field(server, body, param):
    text = json.dumps(body)
    assert "\\u0000" in text
    r = requests.post(server.url("/v1/chat/completions"), data=text, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "NUL" in err["message"], err
    r = requests.post(server.url("/tokenize"), data=json.dumps({"content": "a\x00b"}), headers=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "content", r.text
    chat_ok(server)


# --- an API key setting without a key ----------------------------------------

@pytest.mark.parametrize("value", [",", "  ", ""])
def test_api_key_without_a_key_is_a_startup_error(moed_bin, model, tmp_path, value):
    s = Server(moed_bin, model, env={"MOED_API_KEY": value}, log_dir=tmp_path)
    try:
        rc = s.proc.wait(timeout=30)
    finally:
        s.stop()
    log = s.read_log()
    assert rc == 2, log
    assert "MOED_API_KEY" in log and "api_key" in log and "no key" in log, log


# --- slow clients ---------------------------------------------------------------

def test_open_files_soft_limit_is_raised(moed_bin, model, tmp_path):
    """Every connection is a descriptor: a soft limit of 256 inherited from
    the shell must not cap the server; it is raised to the hard limit and logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 1024, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        s = Server(moed_bin, model, log_dir=tmp_path)  # inherits the 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        s.wait_ready()
        limits = open(f"/proc/{s.proc.pid}/limits").read()
        row = [line for line in limits.splitlines() if line.startswith("Max open files")][0].split()
        assert row[3] == row[4] and row[3] != "256", row
        assert f"open files limit raised from 256 to {row[3]}" in s.read_log()
    finally:
        assert s.stop() == 0, s.read_log()


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, \
            f"this test needs {need} open files; the hard limit is {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else hard, hard))


def test_one_address_is_capped(server):
    """PER_IP connections from one address are held; the rest are closed at once."""
    socks = []
    try:
        for _ in range(PER_IP + 8):
            s = socket.socket()
            s.bind(("127.0.0.250", 0))
            s.connect(("127.0.0.1", server.port))
            s.setblocking(False)
            socks.append(s)
        time.sleep(1.0)  # well under the head deadline: nobody is closed for slowness yet
        closed = 0
        for s in socks:
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 8, f"{closed} of {len(socks)} closed; expected all beyond {PER_IP}"
        # another address is not affected
        assert requests.get(server.url("/health"), timeout=1).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_kept_alive_connection_gets_a_head_deadline_too(server):
    """The second request on a connection: its head deadline starts at its
    request line, and trickled header bytes do not extend it."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += s.recv(4096)
        head, _, body = resp.partition(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
        while len(body) < length:
            body += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        time.sleep(1.0)  # idle between requests: not counted against the head
        s.sendall(b"GET /health HTTP/1.1\r\n")
        t0 = time.monotonic()
        s.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        pad, k, closed_after = b"X-Pad: 1\r\n", 0, None
        while time.monotonic() - t0 < HEAD_S + 5:
            if sel.select(timeout=0.2):
                try:
                    data = s.recv(4096)
                except ConnectionResetError:
                    data = b""
                assert not data, data  # no answer: the head never completes
                closed_after = time.monotonic() - t0
                break
            try:
                s.send(pad[k % len(pad):k % len(pad) + 1])
            except OSError:
                pass
            k += 1
        sel.close()
        assert closed_after is not None, "the trickled head was never cut off"
        assert HEAD_S - 0.3 < closed_after < HEAD_S + 1.5, closed_after
    finally:
        s.close()


class Trickler:
    """n sockets from many loopback addresses (PER_IP each), sending their
    request heads (or, for the last n_body, their bodies) one byte per
    tick. Records when each was opened and when the server closed it.
    (The body senders come last so that the connections displaced at
    max_connections, the oldest heads, are head senders.)"""

    def __init__(self, port, n, n_body):
        self.sel = selectors.DefaultSelector()
        self.socks, self.opened, self.closed_at = [], [], {}
        self.body_from = n - n_body
        for i in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.bind((f"127.0.0.{2 + i // PER_IP}", 0))
            t = time.monotonic()
            s.connect_ex(("127.0.0.1", port))
            self.socks.append(s)
            self.opened.append(t)
            if i % 100 == 99:
                time.sleep(0.01)  # let the server's accept keep up with the listen backlog
        time.sleep(0.1)
        for i, s in enumerate(self.socks):
            if i >= self.body_from:  # a complete head announcing a body that then trickles
                first = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                         b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            else:  # a head that never ends
                first = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            self._send(i, first)
            self.sel.register(s, selectors.EVENT_READ, i)
        self.ticks = 0

    def _send(self, i, data):
        if i in self.closed_at:
            return
        try:
            self.socks[i].send(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.closed_at[i] = time.monotonic()

    def open_count(self):
        return len(self.socks) - len(self.closed_at)

    def poll(self, seconds):
        """Watches for closes for `seconds`, then sends one more byte on each open socket."""
        for key, _ in self.sel.select(timeout=seconds):
            i = key.data
            try:
                data = key.fileobj.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data and i not in self.closed_at:
                self.closed_at[i] = time.monotonic()
                self.sel.unregister(key.fileobj)
        self.ticks += 1
        for i in range(len(self.socks)):
            self._send(i, b" " if i >= self.body_from else b"X-Pad: 1\r\n"[self.ticks % 10:self.ticks % 10 + 1])

    def close(self):
        for s in self.socks:
            s.close()
        self.sel.close()


def test_trickling_clients_are_cut_off_and_health_stays_up(server):
    n, n_body = 1100, 200
    raise_nofile(n + 200)
    before = server.metrics()
    probes, chat_errors, hostile_open = [], [], []
    trick = Trickler(server.port, n, n_body)
    done = threading.Event()

    def probe():
        # While the hostile sockets are held: /health and /metrics, four times
        # each, must answer within a second, and a real chat request works.
        try:
            for k in range(8):
                hostile_open.append(trick.open_count())
                path = "/health" if k % 2 == 0 else "/metrics"
                t0 = time.monotonic()
                try:
                    r = requests.get(server.url(path), timeout=1.0)
                    probes.append((path, r.status_code, time.monotonic() - t0))
                except requests.RequestException as e:
                    probes.append((path, repr(e), time.monotonic() - t0))
                time.sleep(0.1)
            try:
                chat_ok(server)
            except AssertionError as e:
                chat_errors.append(str(e))
            except requests.RequestException as e:
                chat_errors.append(repr(e))
        finally:
            done.set()

    try:
        th = threading.Thread(target=probe)
        th.start()
        last_open = trick.opened[-1]
        # Trickle until every hostile socket is gone or well past the deadline.
        while trick.open_count() and time.monotonic() < last_open + HEAD_S + 6:
            trick.poll(0.2)
        th.join(timeout=60)
        assert done.is_set()
        lifetimes = [trick.closed_at.get(i, float("inf")) - trick.opened[i] for i in range(n)]
    finally:
        trick.close()

    srt = sorted(lifetimes)
    print(f"probes {[(p, st, round(t, 3)) for p, st, t in probes]}; hostile open at probes {hostile_open}; "
          f"lifetimes min {srt[0]:.2f} median {srt[n // 2]:.2f} max {srt[-1]:.2f} s")
    # /health and /metrics answered in time, with the hostile sockets open
    assert len(probes) == 8
    for path, status, secs in probes:
        assert status == 200 and secs < 1.0, probes
    assert min(hostile_open) > 900, hostile_open
    assert not chat_errors, chat_errors
    # Every trickler was closed by the server; none outlived its deadline by
    # more than the sweep's and this loop's lateness. (Without deadlines they
    # would have lived for idle_timeout, 60 s, renewed by every byte.)
    assert max(lifetimes) < HEAD_S + 2.5, sorted(lifetimes)[-10:]
    # Most lived their deadline out: only the ones beyond max_connections (1024)
    # were displaced early to make room (and the probes' own connections).
    early = [x for x in lifetimes if x < HEAD_S - 0.5]
    assert len(early) <= (n - 1024) + 40, f"{len(early)} closed early"
    after = server.metrics()
    delta = {r: metric(after, "moed_http_closed_total", reason=r) - metric(before, "moed_http_closed_total", reason=r)
             for r in ("header_timeout", "body_timeout", "evicted")}
    assert delta["header_timeout"] + delta["body_timeout"] + delta["evicted"] >= n, delta
    assert delta["body_timeout"] >= n_body - 40, delta
    assert delta["evicted"] >= n - 1024, delta
    print(f"closed by the server: {delta}")
    # and the server goes on serving everyone else
    chat_ok(server)
    assert requests.get(server.url("/health"), timeout=1).status_code == 200
