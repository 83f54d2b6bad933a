#!/usr/bin/env python3
"""Soak test: many mixed requests against one live `moed serve`, then
checks that the process gave back what it took.

    tests/soak.py [--requests 20000] [--warmup 2000] [--workers 16]
                  [--moed build/moed] [--model M.gguf] [--threads 2] [--json OUT]

It starts its own server on a tiny random-weight model (made with
`moed mkmodel` unless --model is given) and sends --requests requests from
--workers threads (bounded concurrency). The first --warmup requests are a
warm-up: malloc arenas, MHD's connection pool, the thread pool and the KV
cache's pages reach their working size there. The mix (deterministic for a
--seed) is:

  completions and chat completions, plain and streamed, n 1..3, stop
  strings, max_tokens 1..--max-tokens, greedy or seeded sampling; streams
  the client drops after two chunks (half with a FIN, half with a RST);
  invalid requests with a known status (bad JSON, bad fields, unknown
  model/path/method, a body over --max-body); /health, /metrics and
  /v1/models probes; some requests on a fresh connection, the rest on
  each worker's keep-alive connection.

Every answer is checked (status, choice count, finish reasons, usage, a
stream's [DONE]). After the warm-up and again at the end, once every client
connection is closed and the server is idle, it reads /proc/<pid>/status
(VmRSS, threads), counts /proc/<pid>/fd and scrapes /metrics, then checks:

  RSS growth from the warm-up to the end    <= --rss-growth (5 %) and
                                            <= --rss-growth-kib (2 MiB)
  open fds and threads at the end           <= their post-warm-up values
  running/waiting requests, running sequences, used KV blocks  == 0,
    moed_engine_ready == 1
  moed_http_requests_total by code == the statuses the client saw
  moed_requests_finished_total, the request-duration and TTFT histogram
    counts == the generation requests sent (dropped ones included)
  moed_requests_cancelled_total == the streams the client dropped
  moed_generation_tokens_total within [sum of usage.completion_tokens,
    that + dropped streams x their max_tokens]

Why 2 MiB: the server's RSS is ~170 MB, so 5 % would let a leak of 480
bytes per request through over 18,000 requests and of 4 KiB per request
over a 2,000-request run. Idle-to-idle growth measured on a 2-core machine
was -32..+320 KiB (malloc arenas, page granularity); a leaked srv_gen
(~2 KiB per generation) showed as +3.9 MiB over 2,000 requests.

The KV cache is small (--kv-blocks 512) on purpose: the prefix cache keeps
released blocks and hands out untouched ones first, so a 1 GiB default
cache's RSS would keep growing, legitimately, until every page had been
touched. 512 blocks are cycled through within the warm-up, and the soak
then also exercises prefix-cache eviction. Exit status 0 when every check
passes; a table of the numbers is printed either way.
"""
import argparse
import http.client
import json
import os
import pathlib
import random
import socket
import struct
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "py"))
from server_util import Server, make_model, metric, parse_prometheus  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven tired robots count "
         "prime numbers under grey autumn skies and sing about rivers").split()

# kind -> weight (per cent of requests)
MIX = {"cmpl": 16, "chat": 14, "cmpl_stream": 14, "chat_stream": 14, "drop": 10, "bad": 12, "probe": 20}

GAUGES = ("moed_requests_running", "moed_requests_waiting", "moed_sequences_running", "moed_kv_blocks_used",
          "moed_kv_cache_usage_ratio")


def proc_sample(pid):
    """VmRSS / RssAnon in KiB, threads and open fds of a live process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Tally:
    """What the client sent and saw; one lock for all workers."""

    def __init__(self):
        self.mu = threading.Lock()
        self.codes = {}          # HTTP status -> count
        self.kinds = {}          # request kind -> count
        self.gen = 0             # generation requests the server accepted
        self.dropped = 0         # streams the client hung up on
        self.usage_completion = 0
        self.usage_prompt = 0
        self.no_text = 0         # generations whose every choice ended at once with no text
        self.drop_ids = []       # ids of the dropped streams, in order
        self.failures = []       # client-side check failures (first few kept)
        self.n_failures = 0
        self.done = 0

    def add(self, kind, code, gen=False, dropped=False, usage=None, no_text=False, drop_id=None):
        with self.mu:
            if drop_id:
                self.drop_ids.append(drop_id)
            self.no_text += no_text
            self.codes[code] = self.codes.get(code, 0) + 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.gen += gen
            self.dropped += dropped
            if usage:
                self.usage_prompt += usage["prompt_tokens"]
                self.usage_completion += usage["completion_tokens"]
            self.done += 1

    def fail(self, msg):
        with self.mu:
            self.n_failures += 1
            if len(self.failures) < 20:
                self.failures.append(msg)

    def snapshot(self):
        with self.mu:
            return {"codes": dict(self.codes), "gen": self.gen, "dropped": self.dropped, "no_text": self.no_text,
                    "drop_ids": list(self.drop_ids),
                    "usage_completion": self.usage_completion, "usage_prompt": self.usage_prompt}


class Check(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Check(what)


def prompt_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))


def sampling(rng, body):
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = 0.9
        body["seed"] = rng.randint(0, 1 << 30)
    if rng.random() < 0.4:
        body["stop"] = rng.sample(["e", "th", "o ", "\n", "xq"], rng.randint(1, 3))
    return body


def gen_body(rng, chat, max_tokens):
    n = rng.randint(1, 3)
    body = {"max_tokens": rng.randint(1, max_tokens), "n": n}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt_text(rng)}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": prompt_text(rng)})
    else:
        body["prompt"] = prompt_text(rng)
    return sampling(rng, body)


def check_usage(u, body):
    expect(isinstance(u, dict), f"no usage: {u!r}")
    expect(u["prompt_tokens"] >= 1, f"usage.prompt_tokens {u['prompt_tokens']}")
    expect(0 <= u["completion_tokens"] <= body["max_tokens"] * body["n"],
           f"usage.completion_tokens {u['completion_tokens']} > max_tokens {body['max_tokens']} x n {body['n']}")
    expect(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], f"usage.total_tokens {u}")


def no_text(texts, finishes, usage):
    """True when every choice stopped after one token with no text: either
    an EOS, which counts as a completion token but is never rendered (no
    TOKEN event, so no time-to-first-token observation), or a first token
    that hit a stop string (which does get one); the client cannot tell."""
    return (all(t == "" for t in texts) and all(f == "stop" for f in finishes)
            and usage["completion_tokens"] == len(texts))


def read_sse(resp):
    """Events of an SSE body read to its end ('[DONE]' as the string)."""
    out = []
    while True:
        line = resp.readline()
        if not line:
            return out
        line = line.rstrip(b"\r\n")
        if not line or line.startswith(b":"):  # blank, or a keep-alive comment
            continue
        expect(line.startswith(b"data: "), f"SSE line {line[:80]!r}")
        data = line[6:]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))


class Worker:
    def __init__(self, base_port, tally, opts):
        self.port = base_port
        self.tally = tally
        self.o = opts
        self.conn = None

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None

    def _conn(self, fresh):
        if fresh:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        return self.conn

    def call(self, method, path, body=None, fresh=False, raw=None):
        """One request; returns (status, response) with the response open
        (the caller reads it). fresh: a new connection, closed afterwards."""
        c = self._conn(fresh)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if fresh:
            headers["Connection"] = "close"
        try:
            c.request(method, path, body=data, headers=headers)
            return c, c.getresponse()
        except (OSError, http.client.HTTPException):
            if c is self.conn:
                self.close()
            raise

    def one(self, i, rng):
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        fresh = rng.random() < 0.15
        try:
            getattr(self, "do_" + kind)(rng, fresh)
        except Check as e:
            self.tally.fail(f"request {i} ({kind}): {e}")
            self.close()
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            self.tally.fail(f"request {i} ({kind}): {type(e).__name__}: {e}")
            self.close()

    def _finish(self, c, fresh):
        if fresh:
            c.close()

    def do_cmpl(self, rng, fresh, chat=False):
        body = gen_body(rng, chat, self.o.max_tokens)
        c, r = self.call("POST", "/v1/chat/completions" if chat else "/v1/completions", body, fresh)
        data = r.read()
        self._finish(c, fresh)
        expect(r.status == 200, f"status {r.status}: {data[:200]!r}")
        j = json.loads(data)
        expect(len(j["choices"]) == body["n"], f"{len(j['choices'])} choices for n={body['n']}")
        expect(sorted(ch["index"] for ch in j["choices"]) == list(range(body["n"])), "choice indices")
        for ch in j["choices"]:
            expect(ch["finish_reason"] in ("stop", "length"), f"finish_reason {ch['finish_reason']}")
            text = ch["message"]["content"] if chat else ch["text"]
            for s in body.get("stop", []):
                expect(s not in text, f"stop string {s!r} in the text {text!r}")
        check_usage(j["usage"], body)
        texts = [ch["message"]["content"] if chat else ch["text"] for ch in j["choices"]]
        self.tally.add("chat" if chat else "cmpl", 200, gen=True, usage=j["usage"],
                       no_text=no_text(texts, [ch["finish_reason"] for ch in j["choices"]], j["usage"]))

    def do_chat(self, rng, fresh):
        self.do_cmpl(rng, fresh, chat=True)

    def do_cmpl_stream(self, rng, fresh, chat=False):
        body = gen_body(rng, chat, self.o.max_tokens)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        c, r = self.call("POST", "/v1/chat/completions" if chat else "/v1/completions", body, fresh)
        if r.status != 200:
            data = r.read()
            self._finish(c, fresh)
            raise Check(f"status {r.status}: {data[:200]!r}")
        evs = read_sse(r)
        self._finish(c, fresh)
        expect(evs and evs[-1] == "[DONE]", f"stream did not end with [DONE]: {evs[-1:]!r}")
        finishes = {}
        usage = None
        texts = [""] * body["n"]
        for ev in evs[:-1]:
            expect("error" not in ev, f"error event {ev}")
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev["choices"]:
                piece = ch["delta"].get("content") if chat else ch["text"]
                texts[ch["index"]] += piece or ""
                if ch.get("finish_reason"):
                    expect(ch["index"] not in finishes, f"choice {ch['index']} finished twice")
                    finishes[ch["index"]] = ch["finish_reason"]
        expect(sorted(finishes) == list(range(body["n"])), f"finished choices {sorted(finishes)} for n={body['n']}")
        expect(set(finishes.values()) <= {"stop", "length"}, f"finish reasons {finishes}")
        check_usage(usage, body)
        self.tally.add("chat_stream" if chat else "cmpl_stream", 200, gen=True, usage=usage,
                       no_text=no_text(texts, list(finishes.values()), usage))

    def do_chat_stream(self, rng, fresh):
        self.do_cmpl_stream(rng, fresh, chat=True)

    def do_drop(self, rng, fresh):
        """A stream long enough (ignore_eos) to be running when the client
        hangs up after two chunks; always on its own connection."""
        chat = rng.random() < 0.5
        body = {"max_tokens": self.o.drop_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt_text(rng)}]
        else:
            body["prompt"] = prompt_text(rng)
        rst = rng.random() < 0.5
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        c.request("POST", "/v1/chat/completions" if chat else "/v1/completions", body=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        try:
            expect(r.status == 200, f"status {r.status}")
            seen = 0
            while seen < 2:
                line = r.readline()
                expect(line, "stream ended before two chunks")
                if line.startswith(b"data: "):
                    ev = json.loads(line[6:])
                    expect("error" not in ev, f"error event {line[:200]!r}")
                    seen += 1
        finally:
            if rst and c.sock:
                # SO_LINGER 0: close() sends a RST instead of a FIN
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        self.tally.add("drop", 200, gen=True, dropped=True, drop_id=ev["id"])

    BAD = (  # (method, path, body bytes, expected status)
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "n": 0}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "stop": [1]}', 400),
        ("POST", "/v1/completions", b'{"prompt": "x", "model": "no-such-model"}', 404),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "bogus", "content": "x"}]}', 400),
        ("POST", "/v1/chat/completions", b"[1, 2, 3]", 400),
        ("GET", "/v1/completions", None, 405),
        ("GET", "/v1/no-such-endpoint", None, 404),
        ("POST", "/v1/completions", "BIG", 413),
    )

    def do_bad(self, rng, fresh):
        method, path, raw, code = rng.choice(self.BAD)
        if raw == "BIG":
            # over --max-body: refused from its Content-Length, connection closed
            raw = json.dumps({"prompt": "x" * (self.o.max_body + 1)}).encode()
            fresh = True
        c, r = self.call(method, path, raw=raw, fresh=fresh)
        data = r.read()
        self._finish(c, fresh)
        expect(r.status == code, f"{method} {path} {raw[:40] if raw else ''!r}: status {r.status}, want {code}")
        j = json.loads(data)
        expect(isinstance(j.get("error"), dict) and j["error"].get("message"), f"error body {data[:200]!r}")
        self.tally.add("bad", code)

    def do_probe(self, rng, fresh):
        path = rng.choice(("/health", "/metrics", "/v1/models"))
        c, r = self.call("GET", path, fresh=fresh)
        data = r.read()
        self._finish(c, fresh)
        expect(r.status == 200, f"GET {path}: status {r.status}")
        if path == "/metrics":
            parse_prometheus(data.decode())
        else:
            json.loads(data)
        self.tally.add("probe", 200)


class Soak:
    def __init__(self, moed_bin, workdir, o):
        self.o = o
        self.workdir = pathlib.Path(workdir)
        model = pathlib.Path(o.model) if o.model else make_model(moed_bin, self.workdir)
        self.server = Server(moed_bin, model, "--kv-blocks", str(o.kv_blocks), "--max-body", str(o.max_body),
                             "--log-format", "json", threads=o.threads, log_dir=self.workdir)
        self.server.wait_ready()
        self.pid = self.server.proc.pid
        self.tally = Tally()
        self.mu = threading.Lock()
        self.rss_trace = []  # (requests done, VmRSS KiB) while the soak phase runs

    def scrape(self):
        """/metrics, counted in the tally like every other request; the
        server counts a request when it completes, so a scrape does not
        include itself."""
        r = requests.get(self.server.url("/metrics"), timeout=30)
        m = parse_prometheus(r.text)
        self.tally.add("harness", r.status_code)
        return m

    def run_phase(self, first, last):
        nxt = [first]
        workers = [Worker(self.server.port, self.tally, self.o) for _ in range(self.o.workers)]

        def loop(w):
            while True:
                with self.mu:
                    i = nxt[0]
                    if i >= last:
                        break
                    nxt[0] += 1
                w.one(i, random.Random(f"{self.o.seed}:{i}"))
            w.close()

        th = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
        [t.start() for t in th]
        [t.join() for t in th]

    def sample_loop(self, stop):
        while not stop.wait(0.5):
            try:
                self.rss_trace.append((self.tally.done, proc_sample(self.pid)["VmRSS"]))
            except OSError:
                return

    def settle(self, base):
        """Waits (<= 30 s) until the server is idle and has counted every
        request the client finished (a dropped stream completes on the
        server only when it notices); returns (metrics, proc sample)."""
        deadline = time.time() + 30
        while True:
            want = self.tally.snapshot()["codes"]
            m = self.scrape()
            got = http_codes(m, base)
            if all(metric(m, g) == 0 for g in GAUGES) and got == want:
                break
            if time.time() > deadline:
                break
            time.sleep(0.2)
        # fds of closed client connections go once MHD has seen the close
        deadline = time.time() + 10
        while proc_sample(self.pid)["fds"] > self.fd_floor and time.time() < deadline:
            time.sleep(0.1)
        return m, want, proc_sample(self.pid)

    def run(self):
        o = self.o
        t0 = time.time()
        m0 = self.scrape()
        # before any client connection: the fewest fds the server can have
        self.fd_floor = proc_sample(self.pid)["fds"]
        self.run_phase(0, o.warmup)
        t1 = time.time()
        m1, want1, p1 = self.settle(m0)
        self.fd_floor = p1["fds"]
        g1 = self.tally.snapshot()
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample_loop, args=(stop,), daemon=True)
        sampler.start()
        t2 = time.time()
        self.run_phase(o.warmup, o.requests)
        t3 = time.time()
        stop.set()
        sampler.join()
        m2, want2, p2 = self.settle(m0)
        g2 = self.tally.snapshot()
        self.server.stop()
        log = self.server.read_log()
        return Result(o, m0, m1, m2, want1, want2, p1, p2, g1, g2, self.tally, self.rss_trace,
                      t1 - t0, t3 - t2, log, self.server.proc.returncode)


def http_codes(m, base):
    """moed_http_requests_total since the `base` scrape, by code."""
    out = {}
    for (name, labels), v in m.items():
        if name == "moed_http_requests_total":
            code = int(dict(labels)["code"])
            d = v - base.get((name, labels), 0)
            if d:
                out[code] = int(d)
    return out


def mdelta(a, b, name):
    return metric(b, name) - metric(a, name)


class Result:
    def __init__(self, o, m0, m1, m2, want1, want2, p1, p2, g1, g2, tally, trace, t_warm, t_soak, log, rc):
        self.o, self.p1, self.p2, self.trace = o, p1, p2, trace
        self.t_warm, self.t_soak = t_warm, t_soak
        self.rows = []      # (what, value, bound, ok)
        self.failures = list(tally.failures)
        if tally.n_failures > len(tally.failures):
            self.failures.append(f"... {tally.n_failures - len(tally.failures)} more client-side failures")
        n_soak = o.requests - o.warmup
        gen = g2["gen"] - g1["gen"]
        dropped = g2["dropped"] - g1["dropped"]
        self.kinds = tally.kinds

        def row(what, value, bound, ok):
            self.rows.append((what, value, bound, ok))
            if not ok:
                self.failures.append(f"{what}: {value} (want {bound})")

        growth = (p2["VmRSS"] - p1["VmRSS"]) / p1["VmRSS"]
        row("requests (warm-up + soak)", f"{o.warmup} + {n_soak}", "", True)
        row("client-side check failures", tally.n_failures, "0", tally.n_failures == 0)
        row("wall time warm-up / soak (s)", f"{t_warm:.1f} / {t_soak:.1f}", "", True)
        row("soak throughput (req/s)", f"{n_soak / t_soak:.1f}" if t_soak else "-", "", True)
        row("VmRSS after warm-up (KiB)", p1["VmRSS"], "", True)
        if trace:
            row("VmRSS peak during soak (KiB)", max(r for _, r in trace), "", True)
        row("VmRSS at the end, idle (KiB)", p2["VmRSS"], "", True)
        row("RSS growth after warm-up", f"{growth * 100:+.2f} %", f"<= {o.rss_growth * 100:g} %",
            growth <= o.rss_growth)
        grew = p2["VmRSS"] - p1["VmRSS"]
        row("RSS growth after warm-up (KiB)", grew, f"<= {o.rss_growth_kib}", grew <= o.rss_growth_kib)
        row("RSS growth per soak request (bytes)", f"{grew * 1024 / n_soak:.1f}", "", True)
        row("RssAnon after warm-up -> end (KiB)", f"{p1['RssAnon']} -> {p2['RssAnon']}", "", True)
        row("open fds after warm-up -> end", f"{p1['fds']} -> {p2['fds']}", "no growth", p2["fds"] <= p1["fds"])
        row("threads after warm-up -> end", f"{p1['Threads']} -> {p2['Threads']}", "no growth",
            p2["Threads"] <= p1["Threads"])
        for g in GAUGES:
            v = metric(m2, g)
            row(f"{g} (idle)", f"{v:g}", "0", v == 0)
        v = metric(m2, "moed_engine_ready")
        row("moed_engine_ready (idle)", f"{v:g}", "1", v == 1)
        got, want = http_codes(m2, m0), want2
        for code in sorted(set(got) | set(want)):
            row(f"moed_http_requests_total{{code={code}}}", got.get(code, 0), f"= {want.get(code, 0)} sent",
                got.get(code, 0) == want.get(code, 0))
        fin = mdelta(m1, m2, "moed_requests_finished_total")
        row("soak: moed_requests_finished_total", f"{fin:g}", f"= {gen} generations", fin == gen)
        e2e = mdelta(m1, m2, "moed_request_duration_seconds_count")
        row("soak: request duration observations", f"{e2e:g}", f"= {gen}", e2e == gen)
        ttft = mdelta(m1, m2, "moed_time_to_first_token_seconds_count")
        silent = g2["no_text"] - g1["no_text"]
        row("soak: time-to-first-token observations", f"{ttft:g}", f"in [{gen - silent}, {gen}]",
            gen - silent <= ttft <= gen)
        # A dropped stream is cancelled if it is still running when the
        # server sees the hang-up. On a busy machine a client thread can
        # stall long enough for all drop_tokens to be generated first, and
        # the server may count a cancellation whose DONE was already on its
        # way. So: every drop that ended short of drop_tokens (per the
        # server's request log) must be counted and logged as cancelled,
        # and the counter cannot exceed the drops.
        logged = {}
        for ln in log.splitlines():
            try:
                j = json.loads(ln)
            except ValueError:
                continue
            if j.get("msg") == "request" and "id" in j:
                logged[j["id"]] = j
        short = full = drop_tokens = 0
        for rid in g2["drop_ids"][len(g1["drop_ids"]):]:
            j = logged.get(rid)
            if not j or j.get("status") != 200:
                self.failures.append(f"dropped stream {rid}: no status-200 line in the server log: {j}")
                continue
            # tokens the server had seen when it logged the request (<= generated)
            drop_tokens += j["completion_tokens"]
            if j["completion_tokens"] >= o.drop_tokens:
                full += 1
            elif j.get("finish") != "cancelled":
                self.failures.append(f"dropped stream {rid} ended early but is logged as finish={j.get('finish')}")
            else:
                short += 1
        canc = mdelta(m1, m2, "moed_requests_cancelled_total")
        row("soak: streams dropped by the client", dropped, "", True)
        row("soak: ... all tokens generated first (log)", full, "", True)
        row("soak: moed_requests_cancelled_total", f"{canc:g}", f"in [{short} cut short (log), {dropped}]",
            short <= canc <= dropped and short + full == dropped)
        gtok = mdelta(m1, m2, "moed_generation_tokens_total")
        # usage of the answered requests plus, for the dropped streams, at
        # least the tokens logged and at most drop_tokens each
        answered = g2["usage_completion"] - g1["usage_completion"]
        lo, hi = answered + drop_tokens, answered + dropped * o.drop_tokens
        row("soak: moed_generation_tokens_total", f"{gtok:g}", f"in [{lo}, {hi}]", lo <= gtok <= hi)
        ptok = mdelta(m1, m2, "moed_prompt_tokens_total")
        row("soak: prompt tokens computed / in usage", f"{ptok:g} / {g2['usage_prompt'] - g1['usage_prompt']}",
            "(prefix cache hits are not computed)", True)
        row("soak: preemptions", f"{mdelta(m1, m2, 'moed_preemptions_total'):g}", "", True)
        row("server exit status", rc, "0", rc == 0)
        errors = [ln for ln in log.splitlines() if '"level":"error"' in ln.replace(" ", "")]
        row("server log lines at level error", len(errors), "0", not errors)
        self.failures += errors[:5]

    def table(self):
        w = max(len(r[0]) for r in self.rows)
        wv = max(len(str(r[1])) for r in self.rows)
        lines = [f"{'':{w}}  {'value':>{wv}}  bound"]
        for what, value, bound, ok in self.rows:
            lines.append(f"{what:{w}}  {str(value):>{wv}}  {bound}{'' if ok else '   <-- FAIL'}")
        lines.append("mix: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())))
        if self.trace:
            n = len(self.trace)
            pts = [self.trace[min(n - 1, (n * q) // 4)] for q in range(5)]
            lines.append("VmRSS during the soak (requests done: KiB): " + ", ".join(f"{d}: {r}" for d, r in pts))
        return "\n".join(lines)

    def as_json(self):
        return {"requests": self.o.requests, "warmup": self.o.warmup, "workers": self.o.workers,
                "rows": [{"what": r[0], "value": str(r[1]), "bound": r[2], "ok": r[3]} for r in self.rows],
                "failures": self.failures}


def options(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = pathlib.Path(__file__).resolve().parents[1]
    ap.add_argument("--moed", default=os.environ.get("MOED_BIN", str(root / "build" / "moed")))
    ap.add_argument("--model", help="GGUF to serve (default: a tiny random-weight model made with mkmodel)")
    ap.add_argument("--requests", type=int, default=20000, help="total requests, warm-up included")
    ap.add_argument("--warmup", type=int, help="warm-up requests (default: a tenth, at least 300)")
    ap.add_argument("--workers", type=int, default=16, help="concurrent client connections")
    ap.add_argument("--threads", type=int, default=2, help="engine threads")
    ap.add_argument("--max-tokens", type=int, default=8, help="max_tokens of ordinary requests is 1..this")
    ap.add_argument("--drop-tokens", type=int, default=256, help="max_tokens of the streams the client drops")
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-body", type=int, default=65536)
    ap.add_argument("--rss-growth", type=float, default=0.05, help="largest RSS growth after the warm-up (fraction)")
    ap.add_argument("--rss-growth-kib", type=int, default=2048,
                    help="and at most this many KiB (5 %% of ~170 MB would hide a leak of KiBs per request)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--workdir", help="model and server log directory (default: a temporary one)")
    o = ap.parse_args(argv)
    if o.warmup is None:
        o.warmup = max(300, o.requests // 10)
    if not 0 < o.warmup < o.requests:
        ap.error("--warmup must be between 1 and --requests - 1")
    return o


def run(moed_bin, workdir, o):
    return Soak(moed_bin, workdir, o).run()


def main():
    o = options()
    with tempfile.TemporaryDirectory(prefix="moed-soak-") as tmp:
        r = run(o.moed, o.workdir or tmp, o)
    print(r.table())
    if o.json:
        pathlib.Path(o.json).write_text(json.dumps(r.as_json(), indent=1) + "\n")
    if r.failures:
        print("\nFAILED:\n  " + "\n  ".join(r.failures), file=sys.stderr)
        return 1
    print("\nsoak: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
