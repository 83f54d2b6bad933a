#!/usr/bin/env python3
"""Serving benchmark: aggregate tokens/s, TTFT and inter-token latency of a
live `moed serve` at several concurrency levels, measured in one run so the
ratios compare like with like on a shared machine.

    tests/bench_serve.py --url http://127.0.0.1:8080 [--concurrency 1,4,8]
                         [--max-tokens 32] [--prompt-tokens 64] [--rounds 1]
    tests/bench_serve.py --moed build/moed --model M.gguf ...   (starts its own server)

Each level runs `rounds` waves of C simultaneous streaming completions
(ignore_eos, so every stream yields exactly max_tokens tokens, counted from
the usage chunk; different prompts so the prefix cache does not turn prefill
into a no-op). TTFT is request start to the first text chunk, ITL the gaps
between text chunks (a token whose text is held back, e.g. half a UTF-8
character, sends none), aggregate = all tokens / wall time of the wave.
Prints a table and the aggregate speed-up of each level over C=1.
"""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_stream(url, prompt, max_tokens, out):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times = []
    usage = None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            ch = json.loads(data)
            if "error" in ch:
                raise RuntimeError(ch["error"])
            if ch.get("choices"):
                times.append(time.perf_counter())
            if ch.get("usage"):
                usage = ch["usage"]["completion_tokens"]
    out.append((t0, times, usage))


def wave(url, conc, max_tokens, prompts):
    res, threads = [], []
    start = time.perf_counter()
    for i in range(conc):
        th = threading.Thread(target=one_stream, args=(url, prompts[i], max_tokens, res))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return wall, res


def make_prompts(n, n_words, seed):
    rnd = random.Random(seed)
    words = "the of and to in model expert token cache batch stream server layer weight route".split()
    return [" ".join(rnd.choice(words) for _ in range(n_words)) for _ in range(n)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--moed", help="start this moed binary (with --model)")
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    proc = None
    url = a.url
    if not url:
        if not (a.moed and a.model):
            ap.error("give --url, or --moed and --model")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [a.moed, "serve", "-m", a.model, "--port", str(port), "--max-seqs", str(max(levels))]
        if a.threads:
            cmd += ["-t", str(a.threads)]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                sys.exit("moed serve did not become ready")
            time.sleep(0.2)
    try:
        # warm-up: page the weights in and settle the thread pool
        wave(url, 1, 4, make_prompts(1, a.prompt_words, 999))
        rows = []
        seed = 1
        for c in levels:
            ttft, itl, aggs = [], [], []
            for _ in range(a.rounds):
                wall, res = wave(url, c, a.max_tokens, make_prompts(c, a.prompt_words, seed))
                seed += 1
                n_tok = sum(u for _, _, u in res)
                assert n_tok == c * a.max_tokens, f"expected {c * a.max_tokens} tokens, got {n_tok}"
                aggs.append(n_tok / wall)
                for t0, ts, _ in res:
                    ttft.append((ts[0] - t0) * 1e3)
                    itl += [(y - x) * 1e3 for x, y in zip(ts, ts[1:])]
            rows.append({"concurrency": c, "aggregate_tok_s": statistics.median(aggs),
                         "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
                         "itl_p50_ms": pct(itl, 50), "itl_p95_ms": pct(itl, 95)})
        base = rows[0]["aggregate_tok_s"] if rows and rows[0]["concurrency"] == 1 else None
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"moed serve benchmark: {url}, max_tokens {a.max_tokens}, ~{a.prompt_words}-word prompts, "
                  f"{a.rounds} round(s) per level")
            print(f"{'streams':>7} {'agg tok/s':>10} {'x C=1':>6} {'TTFT p50':>9} {'TTFT p95':>9} "
                  f"{'ITL p50':>8} {'ITL p95':>8}  (ms)")
            for r in rows:
                sp = f"{r['aggregate_tok_s'] / base:.2f}" if base else "-"
                print(f"{r['concurrency']:>7} {r['aggregate_tok_s']:>10.2f} {sp:>6} {r['ttft_p50_ms']:>9.1f} "
                      f"{r['ttft_p95_ms']:>9.1f} {r['itl_p50_ms']:>8.1f} {r['itl_p95_ms']:>8.1f}")
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
