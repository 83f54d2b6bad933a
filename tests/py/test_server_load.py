"""`moed serve` under concurrent load: continuous batching is real,
clients that go away mid-stream cancel only their own request and free
their KV blocks, and SIGTERM drains (streams finish or end with an error
event, exit 0 within the drain timeout)."""
import json
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from server_util import Server, make_model, metric, sse_events


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(moed_bin, model, tmp_path_factory):
    s = Server(moed_bin, model, "--max-seqs", "64", log_dir=tmp_path_factory.mktemp("log")).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


def wait_idle(server, timeout=15):
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if (metric(m, "moed_requests_running") == 0 and metric(m, "moed_requests_waiting") == 0
                and metric(m, "moed_kv_blocks_used") == 0):
            return m
        assert time.time() < deadline, m
        time.sleep(0.1)


@pytest.fixture(scope="module")
def batch_server(moed_bin, tmp_path_factory):
    """A model wide enough (embd 768, 82 MB, ~2 ms per decode step on two
    cores) that a step costs far more than the HTTP work around it, so
    batching shows in wall time even on a busy machine."""
    d = tmp_path_factory.mktemp("batch")
    path = d / "wide.gguf"
    subprocess.run([str(moed_bin), "mkmodel", "--arch", "deepseek2", "--preset", "tiny", "--type", "F32",
                    "--embd", "768", "--ff-exp", "768", "--ff", "1536", "--layers", "2", "-o", str(path)], check=True, capture_output=True, timeout=120)
    s = Server(moed_bin, path, "--max-seqs", "16", log_dir=d).wait_ready()
    yield s
    assert s.stop() == 0, s.read_log()


def test_batching_is_real(batch_server):
    server = batch_server
    body = {"prompt": "Tell me a story", "max_tokens": 32, "temperature": 0, "stream": True, "ignore_eos": True}

    def one(out=None):
        with requests.post(server.url("/v1/completions"), json=body, stream=True, timeout=120) as r:
            n = sum(1 for ev in sse_events(r) if ev != "[DONE]" and ev["choices"])
        if out is not None:
            out.append(n)

    one()  # warm-up
    # Wall time on shared CI cores is noisy: the best of three rounds counts.
    best = None
    for _ in range(3):
        before = server.metrics()
        t = time.perf_counter()
        for _ in range(8):
            one()
        sequential = time.perf_counter() - t
        mid = server.metrics()
        outs = []
        th = [threading.Thread(target=one, args=(outs,)) for _ in range(8)]
        t = time.perf_counter()
        [x.start() for x in th]
        [x.join() for x in th]
        concurrent = time.perf_counter() - t
        after = server.metrics()
        assert len(outs) == 8
        # sequential steps ran one sequence each; concurrent ones batched several
        seq_steps = metric(mid, "moed_batch_size_count") - metric(before, "moed_batch_size_count")
        one_seq = metric(mid, "moed_batch_size_bucket", le="1") - metric(before, "moed_batch_size_bucket", le="1")
        assert one_seq == seq_steps
        conc_steps = metric(after, "moed_batch_size_count") - metric(mid, "moed_batch_size_count")
        conc_multi = conc_steps - (metric(after, "moed_batch_size_bucket", le="1")
                                   - metric(mid, "moed_batch_size_bucket", le="1"))
        assert conc_multi > 0, "no step ran more than one sequence"
        assert conc_steps < seq_steps
        ratio = sequential / concurrent
        print(f"8 sequential streams: {sequential:.2f} s ({seq_steps:.0f} steps), 8 concurrent: "
              f"{concurrent:.2f} s ({conc_steps:.0f} steps, {conc_multi:.0f} batched): {ratio:.2f}x")
        best = max(best or 0, ratio)
        if best > 1.25:
            break
    assert best > 1.25, best
    wait_idle(server)


def test_cancellation_50_streams(server, model):
    """50 streams; 10 are closed after a few chunks. The other 40 get exactly
    max_tokens tokens; afterwards nothing runs, every KV block is free and
    the 10 were cancelled (not run to their 450 tokens)."""
    max_tokens = 24
    before = wait_idle(server)
    results, errors = {}, []
    body = {"model": model.stem, "messages": [{"role": "user", "content": "count"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "logprobs": True, "stream_options": {"include_usage": True}}

    def run(i):
        try:
            # the ones that go away ask for long outputs, so they are surely mid-stream when they leave
            b = dict(body, max_tokens=450) if i % 5 == 0 else body
            with requests.post(server.url("/v1/chat/completions"), json=b, stream=True, timeout=120) as r:
                assert r.status_code == 200
                tokens, usage, finish, done = 0, None, None, False
                for ev in sse_events(r):
                    if ev == "[DONE]":
                        done = True
                        break
                    for ch in ev["choices"]:
                        if ch.get("logprobs"):
                            tokens += len(ch["logprobs"]["content"])
                        finish = ch["finish_reason"] or finish
                    usage = ev.get("usage") or usage
                    if i % 5 == 0 and tokens >= 3:
                        r.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)  # the client goes away
                        results[i] = "closed"
                        return
                results[i] = (tokens, usage, finish, done)
        except Exception as e:  # noqa: BLE001
            errors.append((i, repr(e)))

    th = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    [t.start() for t in th]
    [t.join() for t in th]
    assert not errors, errors[:3]
    closed = [i for i, v in results.items() if v == "closed"]
    assert len(closed) == 10
    for i, v in results.items():
        if v == "closed":
            continue
        tokens, usage, finish, done = v
        assert tokens == max_tokens and usage["completion_tokens"] == max_tokens, (i, v)
        assert finish == "length" and done
    m = wait_idle(server)
    assert metric(m, "moed_requests_cancelled_total") - metric(before, "moed_requests_cancelled_total") == 10
    generated = metric(m, "moed_generation_tokens_total") - metric(before, "moed_generation_tokens_total")
    assert generated < 40 * max_tokens + 10 * 450, generated
    assert metric(m, "moed_sequences_running") == 0
    r = requests.post(server.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_client_gone_cancels_non_streamed(moed_bin, tmp_path):
    """A client that hangs up while its non-streamed request generates is
    noticed while it waits (not when the finished answer is written): the
    request is cancelled, its sequence and KV blocks freed, long before the
    4000 tokens it asked for. Then a normal request still succeeds."""
    path = make_model(moed_bin, tmp_path, preset="demo")
    s = Server(moed_bin, path, log_dir=tmp_path).wait_ready()
    try:
        before = s.metrics()
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
                           "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.time() + 30
        while metric(s.metrics(), "moed_generation_tokens_total") == metric(before, "moed_generation_tokens_total"):
            assert time.time() < deadline, s.read_log()
            time.sleep(0.02)
        sock.close()
        m = wait_idle(s)
        assert metric(m, "moed_requests_cancelled_total") - metric(before, "moed_requests_cancelled_total") == 1
        generated = metric(m, "moed_generation_tokens_total") - metric(before, "moed_generation_tokens_total")
        assert 0 < generated < 2000, generated
        r = requests.post(s.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2, "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        assert s.stop() == 0, s.read_log()


def test_queued_stream_hang_up_is_logged_cancelled(moed_bin, tmp_path):
    """A stream queued behind the only sequence slot has its headers sent
    and waits; its client hangs up. The tick sees that, cancels it, and the
    [DONE] written afterwards fails. The request log must say it was
    cancelled (the soak test found it logged as finish=write_error), and the
    cancellation is counted once."""
    path = make_model(moed_bin, tmp_path, preset="demo")
    s = Server(moed_bin, path, "--max-seqs", "1", log_dir=tmp_path).wait_ready()

    def send(body):
        data = json.dumps(body).encode()
        k = socket.create_connection(("127.0.0.1", s.port))
        k.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(data) + data)
        return k

    try:
        before = s.metrics()
        busy = send({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True})
        deadline = time.time() + 30
        while metric(s.metrics(), "moed_requests_running") < 1:
            assert time.time() < deadline, s.read_log()
            time.sleep(0.02)
        queued = send({"prompt": "hello", "max_tokens": 5, "stream": True})
        queued.settimeout(30)
        assert queued.recv(4096).startswith(b"HTTP/1.1 200"), s.read_log()
        queued.close()
        deadline = time.time() + 30
        while metric(s.metrics(), "moed_requests_waiting") > 0:
            assert time.time() < deadline, s.read_log()
            time.sleep(0.02)
        m = s.metrics()
        assert metric(m, "moed_requests_cancelled_total") - metric(before, "moed_requests_cancelled_total") == 1
        assert metric(m, "moed_requests_running") == 1  # the busy stream runs on
        busy.close()
        wait_idle(s)
    finally:
        assert s.stop() == 0, s.read_log()
    lines = [ln for ln in s.read_log().splitlines() if "POST /v1/completions" in ln]
    assert len(lines) == 2 and all(ln.endswith(" finish=cancelled") for ln in lines), lines


def test_sigterm_drains_under_load(moed_bin, model, tmp_path):
    drain = 2.0
    s = Server(moed_bin, model, "--ctx-size", "65536", "--drain-timeout", str(drain), log_dir=tmp_path).wait_ready()
    results = {}

    def run(i, max_tokens):
        body = {"model": model.stem, "prompt": "go", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        events = []
        try:
            with requests.post(s.url("/v1/completions"), json=body, stream=True, timeout=60) as r:
                for ev in sse_events(r):
                    events.append(ev)
        except requests.RequestException as e:
            events.append(("exception", repr(e)))
        results[i] = events

    short = [threading.Thread(target=run, args=(i, 16)) for i in range(3)]
    long = [threading.Thread(target=run, args=(i, 60000)) for i in range(3, 6)]
    for t in short + long:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # no new connections once draining
    with pytest.raises(requests.ConnectionError):
        requests.get(s.url("/health"), timeout=2)
    rc = s.proc.wait(timeout=drain + 10)
    elapsed = time.perf_counter() - t0
    for t in short + long:
        t.join(timeout=10)
    assert rc == 0, s.read_log()
    assert elapsed < drain + 3, elapsed
    for i in range(3):  # short streams finished normally
        evs = results[i]
        assert evs[-1] == "[DONE]", evs[-3:]
        assert [e["choices"][0]["finish_reason"] for e in evs[:-1] if e["choices"][0]["finish_reason"]] == ["length"]
    for i in range(3, 6):  # long ones were cut at the drain timeout with an error event
        evs = results[i]
        assert evs[-1] == "[DONE]", evs[-3:]
        assert "error" in evs[-2] and evs[-2]["error"]["code"] == "server_shutdown", evs[-2]
        assert 0 < len(evs) - 2 < 60000
    log = s.read_log()
    assert "received SIGTERM" in log and "drain timeout" in log
    s.stop()


def test_big_prompt_does_not_stall_streams(moed_bin, model, tmp_path):
    """Tokenizing a 1 MB body takes about a second; it runs off the event
    loop, so a running stream keeps receiving tokens meanwhile."""
    s = Server(moed_bin, model, "--ctx-size", "65536", log_dir=tmp_path).wait_ready()
    try:
        arrivals, stop = [], threading.Event()

        def stream():
            body = {"prompt": "go", "max_tokens": 60000, "ignore_eos": True, "stream": True}
            with requests.post(s.url("/v1/completions"), json=body, stream=True, timeout=60) as r:
                for ev in sse_events(r):
                    arrivals.append(time.perf_counter())
                    if stop.is_set():
                        break

        t = threading.Thread(target=stream)
        t.start()
        while len(arrivals) < 20:
            time.sleep(0.01)
        text = "The quick brown fox jumps over the lazy dog. " * 22000
        t0 = time.perf_counter()
        r = requests.post(s.url("/tokenize"), json={"content": text}, timeout=60)
        t1 = time.perf_counter()
        stop.set()
        t.join()
        assert r.status_code == 200 and len(r.json()["tokens"]) > 100000
        during = [a for a in arrivals if t0 <= a <= t1]
        gaps = [b - a for a, b in zip(during, during[1:])]
        print(f"tokenize took {t1 - t0:.2f} s; {len(during)} chunks meanwhile, max gap {max(gaps or [0]):.3f} s")
        assert len(during) > 10
        assert max(gaps) < max(0.25, (t1 - t0) / 3)
    finally:
        assert s.stop() == 0
