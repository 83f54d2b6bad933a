"""`moed perplexity` on the tiny fixtures.

- PPL of one window equals a hand computation from transformers' reference
  logits (tests/fixtures/models/*.logits.f32): llama.cpp's rule scores the
  logits at positions ctx/2 .. ctx-2 against the next token.
- Windows batched into one step give the same numbers as one per step.
- KL against its own --save-logits file is 0 with 100 % top-1 agreement;
  against a Q4_0 copy it is > 0, and its mean/p99 equal a numpy computation
  from two full-vocabulary --save-logits files.
"""
import os
import re
import struct
import subprocess

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "models")
LLAMA = os.path.join(FIXTURES, "llama.gguf")
# "Hi  tom be!" is the fixture prompt's first 8 tokens; with BOS the window
# [316 72 105 32 261 109 280 101 33] is exactly the reference's positions 0..8.
PROMPT_TEXT = "Hi  tom be!"
PROMPT = [316, 72, 105, 32, 261, 109, 280, 101, 33, 300]
N_VOCAB = 320


def run(moed_bin, *args, check=True):
    r = subprocess.run([str(moed_bin), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ppl_of(out):
    m = re.search(r"^PPL = ([0-9.]+) \+/- ([0-9.]+)$", out, re.M)
    assert m, out
    return float(m.group(1)), float(m.group(2))


def kl_of(out):
    m = re.search(r"KL divergence: mean = ([0-9.]+), p99 = ([0-9.]+)", out)
    t = re.search(r"top-1 agreement: ([0-9.]+) %", out)
    assert m and t, out
    return float(m.group(1)), float(m.group(2)), float(t.group(1))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """~1,500 tokens of words from the fixture vocabulary."""
    rng = np.random.default_rng(3)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "away", "to", "see", "dog",
             "Hi", "tom", "be!"]
    p = tmp_path_factory.mktemp("ppl") / "text.txt"
    p.write_text(" ".join(rng.choice(words) for _ in range(600)) + "\n")
    return p


@pytest.mark.parametrize("fixture", ["llama", "mixtral"])
def test_one_window_matches_reference_logits(moed_bin, tmp_path, fixture):
    t = tmp_path / "t.txt"
    t.write_text(PROMPT_TEXT)
    out = run(moed_bin, "perplexity", "-m", os.path.join(FIXTURES, f"{fixture}.gguf"), "-f", t, "--ctx", 9).stdout
    logits = np.fromfile(os.path.join(FIXTURES, f"{fixture}.logits.f32"), dtype=np.float32)
    logits = logits.reshape(-1, N_VOCAB).astype(np.float64)
    nll = []
    for r in range(9 // 2, 9 - 1):  # positions 4..7 predict tokens 5..8
        x = logits[r]
        lse = x.max() + np.log(np.exp(x - x.max()).sum())
        nll.append(lse - x[PROMPT[r + 1]])
    want = np.exp(np.mean(nll))
    got, se = ppl_of(out)
    assert got == pytest.approx(want, rel=2e-4)
    want_se = np.std(nll, ddof=1) / np.sqrt(len(nll)) * want
    assert se == pytest.approx(want_se, rel=2e-3)
    assert re.search(r"^\[1\][0-9.]+,$", out, re.M)


def test_windows_chunks_and_batching(moed_bin, text):
    one = run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--batch", 64).stdout
    many = run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--batch", 4096, "--threads", 2).stdout
    assert ppl_of(one)[0] == pytest.approx(ppl_of(many)[0], rel=1e-5)
    n_win = len(re.findall(r"\[\d+\]", one))
    assert n_win >= 10
    r = run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--chunks", 3)
    assert re.findall(r"\[(\d+)\]", r.stdout) == ["1", "2", "3"]
    assert "93 tokens scored" in r.stderr  # 3 windows x (64 - 32 - 1)
    # the running value after window 3 equals the full run's third value
    third = re.findall(r"\[3\]([0-9.]+)", one)[0]
    assert ppl_of(r.stdout)[0] == pytest.approx(float(third), rel=1e-6)


def read_logits(path):
    """A --save-logits file: header, evaluated tokens, then per scored token
    top_k (id, logprob) pairs and the log of the rest."""
    b = open(path, "rb").read()
    assert b[:8] == b"MOEPPLK1"
    top_k, ctx, n_vocab, n_chunks = struct.unpack_from("<4I", b, 8)
    off = 32 + 4 * ctx * n_chunks
    rec = np.dtype([("pairs", [("id", "<i4"), ("lp", "<f4")], (top_k,)), ("rest", "<f4")])
    return np.frombuffer(b, dtype=rec, offset=off), top_k, n_vocab


def test_kl_self_is_zero_and_quantized_copy_is_not(moed_bin, text, tmp_path):
    base = tmp_path / "base.kl"
    run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--save-logits", base, "--top-k", N_VOCAB)
    self_ = run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--kl-base", base).stdout
    assert kl_of(self_) == (0.0, 0.0, 100.0)

    q4 = tmp_path / "q4.gguf"
    run(moed_bin, "quantize", LLAMA, q4, "Q4_0")
    out = run(moed_bin, "perplexity", "-m", q4, "-f", text, "--ctx", 64, "--kl-base", base,
              "--save-logits", tmp_path / "q4.kl", "--top-k", N_VOCAB).stdout
    mean, p99, top1 = kl_of(out)
    assert mean > 1e-3 and p99 > mean and top1 < 100.0

    # independent: KL(P||Q) from the two full-vocabulary files with numpy
    p, k, nv = read_logits(base)
    q, _, _ = read_logits(tmp_path / "q4.kl")
    assert k == nv == N_VOCAB and len(p) == len(q) > 0
    kl, agree = [], 0
    for a, b in zip(p, q):
        lp = np.full(nv, -np.inf)
        lq = np.full(nv, -np.inf)
        lp[a["pairs"]["id"]] = a["pairs"]["lp"]
        lq[b["pairs"]["id"]] = b["pairs"]["lp"]
        kl.append(float(np.sum(np.exp(lp) * (lp - lq))))
        agree += a["pairs"]["id"][0] == b["pairs"]["id"][0]
    kl = np.sort(np.array(kl))
    assert mean == pytest.approx(kl.mean(), rel=1e-4, abs=1e-6)
    assert p99 == pytest.approx(kl[int(np.ceil(0.99 * len(kl))) - 1], rel=1e-4, abs=1e-6)
    assert top1 == pytest.approx(100.0 * agree / len(kl), abs=1e-3)

    # with the default top-32 the KL is over the 32 tokens plus "the rest"
    base32 = tmp_path / "base32.kl"
    run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--save-logits", base32)
    mean32, _, _ = kl_of(run(moed_bin, "perplexity", "-m", q4, "-f", text, "--ctx", 64, "--kl-base", base32).stdout)
    kl32 = []
    for a, b in zip(p, q):
        lp = np.full(nv, -np.inf)
        lq = np.full(nv, -np.inf)
        lp[a["pairs"]["id"]] = a["pairs"]["lp"]
        lq[b["pairs"]["id"]] = b["pairs"]["lp"]
        top = np.argsort(-lp, kind="stable")[:32]
        rest = np.ones(nv, bool)
        rest[top] = False
        pr, qr = np.exp(lp[rest]).sum(), np.exp(lq[rest]).sum()
        kl32.append(float(np.sum(np.exp(lp[top]) * (lp[top] - lq[top])) + pr * np.log(pr / qr)))
    assert mean32 == pytest.approx(np.mean(kl32), rel=1e-3)
    assert mean32 < mean  # coarse-graining can only lose divergence


@pytest.mark.parametrize("args,code,msg", [
    (["-f", "TEXT"], 2, "-m MODEL and -f TEXT are required"),
    (["-m", "M", "-f", "SHORT", "--ctx", "64"], 2, "fewer than one --ctx window of 64"),
    (["-m", "M", "-f", "TEXT", "--ctx", "0"], 2, "--ctx wants a positive integer"),
    (["-m", "M", "-f", "TEXT", "--chunks", "x"], 2, "--chunks wants a positive integer"),
    (["-m", "M", "-f", "MISSING"], 1, "MISSING"),
    (["-m", "M", "-f", "TEXT", "--ctx", "32", "--kl-base", "BASE"], 2, "was made with --ctx 64"),
    (["-m", "M", "-f", "TEXT", "--kl-base", "TEXT"], 2, "not a file written by --save-logits"),
])
def test_bad_arguments(moed_bin, text, tmp_path, args, code, msg):
    base = tmp_path / "base.kl"
    run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--chunks", 2, "--save-logits", base)
    short = tmp_path / "short.txt"
    short.write_text("Hi tom")
    names = {"M": LLAMA, "TEXT": str(text), "SHORT": str(short), "MISSING": str(tmp_path / "missing.txt"),
             "BASE": str(base)}
    r = run(moed_bin, "perplexity", *[names.get(a, a) for a in args], check=False)
    assert r.returncode == code, r.stderr
    assert names.get(msg, msg) in r.stderr


def test_kl_base_of_other_text_is_refused(moed_bin, text, tmp_path):
    base = tmp_path / "base.kl"
    run(moed_bin, "perplexity", "-m", LLAMA, "-f", text, "--ctx", 64, "--chunks", 2, "--save-logits", base)
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[7:])
    r = run(moed_bin, "perplexity", "-m", LLAMA, "-f", other, "--ctx", 64, "--kl-base", base, check=False)
    assert r.returncode == 2 and "over other tokens" in r.stderr
