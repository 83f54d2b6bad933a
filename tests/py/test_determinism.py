"""Deterministic generation under load (issue 20), through the real daemon.

The same 16 prompts, each greedy and with seeded sampling, first sent one
at a time to a fresh server (the reference), then all 32 at once to another
fresh server (prefix-cache misses, batches of up to 16 with chunked
prefill beside decodes), then all at once again (prefix-cache hits). Text,
tokens and every logprob must be identical: a logprob is a float of the raw
logits row, so a one-ulp difference anywhere in a token's arithmetic shows.
The model is MLA (deepseek2), the family whose attention split used to
depend on the step's size; prompts are long enough to span several of its
fixed 64-position chunks.
"""
import concurrent.futures as cf
import subprocess

import pytest
import requests

from server_util import Server, metric

WORDS = ("alpha beta gamma delta the quick brown fox jumps over lazy dog while seven "
         "engines hum softly under northern lights and rivers carry stones").split()


def prompt(i):
    # deterministic, varied lengths (about 25-250 tokens), shared openings
    # for some so that later requests can reuse cached blocks
    n = 8 + (i * 37) % 60
    words = [WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(n)]
    if i % 4 == 0:
        words = WORDS[:12] + words
    return " ".join(words)


N_PROMPTS = 16
REQUESTS = [(i, sampled) for i in range(N_PROMPTS) for sampled in (False, True)]


def body(i, sampled):
    b = {"prompt": prompt(i), "max_tokens": 16, "ignore_eos": True, "logprobs": 2}
    if sampled:
        b.update(temperature=0.9, top_p=0.95, seed=1000 + i)
    else:
        b.update(temperature=0)
    return b


@pytest.fixture(scope="module")
def model(moed_bin, tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "ds2-q8.gguf"
    subprocess.run([str(moed_bin), "mkmodel", "--arch", "deepseek2", "--preset", "tiny", "--type", "Q8_0",
                    "-o", str(path)], check=True, capture_output=True, timeout=120)
    return path


def run(server, req):
    r = requests.post(server.url("/v1/completions"), json=body(*req), timeout=120)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == 16
    return c["text"], lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], r.json()["usage"]["prompt_tokens"]


def serve(moed_bin, model, tmp_path, threads):
    return Server(moed_bin, model, "--max-seqs", "16", "--step-tokens", "64", threads=threads,
                  log_dir=tmp_path).wait_ready()


def test_alone_equals_concurrent(moed_bin, model, tmp_path):
    ref_srv = serve(moed_bin, model, tmp_path, threads=1)
    try:
        ref = {req: run(ref_srv, req) for req in REQUESTS}
    finally:
        assert ref_srv.stop() == 0, ref_srv.read_log()
    srv = serve(moed_bin, model, tmp_path, threads=2)
    try:
        for what in ("cold cache", "warm cache"):
            before = srv.metrics()
            with cf.ThreadPoolExecutor(len(REQUESTS)) as ex:
                got = dict(zip(REQUESTS, ex.map(lambda q: run(srv, q), REQUESTS)))
            for req in REQUESTS:
                kind = "sampled" if req[1] else "greedy"
                assert got[req][1] == ref[req][1], f"{what}: prompt {req[0]} {kind}: tokens differ"
                assert got[req][0] == ref[req][0], f"{what}: prompt {req[0]} {kind}: text differs"
                assert got[req][2] == ref[req][2], f"{what}: prompt {req[0]} {kind}: logprobs differ"
                assert got[req][3] == ref[req][3], f"{what}: prompt {req[0]} {kind}: top logprobs differ"
            m = srv.metrics()
            steps = metric(m, "moed_engine_steps_total") - metric(before, "moed_engine_steps_total")
            seqs = metric(m, "moed_batch_size_sum") - metric(before, "moed_batch_size_sum")
            print(f"{what}: {seqs} sequences over {steps} steps")
            assert seqs >= 2 * steps, f"{what}: {seqs} sequences over {steps} steps: hardly batched"
            computed = metric(m, "moed_prompt_tokens_total") - metric(before, "moed_prompt_tokens_total")
            sent = sum(g[4] for g in got.values())
            if what == "warm cache":
                assert computed < sent / 2, f"prefix cache: {computed} of {sent} prompt tokens computed"
    finally:
        assert srv.stop() == 0, srv.read_log()
