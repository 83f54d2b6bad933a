"""Non-finite numbers in a model file: `moed info --check` names the tensor,
`moed generate` and the warm-up of `moed serve` refuse a model whose first
step is NaN, and over HTTP a NaN that only some prompts reach fails just
those requests (500 / an error event) while the others complete unchanged.

The files are demo models from `moed mkmodel` with NaN/Inf written into
one tensor through gguf-py (r+ memory map), an independent writer."""
import json
import shutil
import subprocess
import threading

import numpy as np
import pytest
import requests
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from server_util import Server, make_model, sse_events

BAD_TOKEN = 7  # the token_embd row made NaN: prompts holding it go NaN


def corrupt(src, dst, name, row=None, value=float("nan")):
    """Copies src to dst and sets tensor `name` (all of it, or one row) to value."""
    shutil.copy(src, dst)
    r = GGUFReader(str(dst), "r+")
    t = next(t for t in r.tensors if t.name == name)
    d = t.data.reshape(-1, t.data.shape[-1])
    if row is None:
        d[...] = value
    else:
        d[row, :] = value
    r.data.flush()
    return dst


def run(moed_bin, *args, timeout=120):
    return subprocess.run([str(moed_bin), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(moed_bin, tmp_path_factory):
    return make_model(moed_bin, tmp_path_factory.mktemp("nonfinite"))


@pytest.fixture(scope="module")
def nan_row_model(tiny, tmp_path_factory):
    return corrupt(tiny, tmp_path_factory.mktemp("nanrow") / "nanrow.gguf", "token_embd.weight", row=BAD_TOKEN)


def test_info_check_clean(moed_bin, tiny):
    r = run(moed_bin, "info", "--check", tiny)
    assert r.returncode == 0, r.stderr
    n = len(GGUFReader(str(tiny)).tensors)
    assert f"{n} tensors" in r.stdout and "all finite" in r.stdout, r.stdout


@pytest.mark.parametrize("name,row,value,elem,kind", [
    ("blk.1.ffn_gate_inp.weight", None, float("nan"), 0, "NaN"),
    ("blk.2.ffn_norm.weight", None, float("inf"), 0, "+Inf"),
    ("token_embd.weight", BAD_TOKEN, float("-inf"), BAD_TOKEN * 64, "-Inf"),  # n_embd 64: row 7 starts there
])
def test_info_check_names_tensor_and_element(moed_bin, tiny, tmp_path, name, row, value, elem, kind):
    bad = corrupt(tiny, tmp_path / "bad.gguf", name, row, value)
    r = run(moed_bin, "info", "--check", bad)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"tensor '{name}' (F32): element {elem} " in r.stdout and f"is {kind}" in r.stdout, r.stdout
    assert "1 of " in r.stdout, r.stdout  # only that tensor


# Every stored float type: (type, bytes per block, elements per block,
# byte offsets of the block's f16/bf16 scales). A NaN or Inf scale decodes
# to NaN (times a zero quant or sub-scale) or +-Inf in every element of its
# block, so the first bad element is the block's first.
TYPES = [
    ("F16", 2, 1, [0]), ("BF16", 2, 1, [0]),
    ("Q4_0", 18, 32, [0]), ("Q4_1", 20, 32, [0, 2]), ("Q5_0", 22, 32, [0]), ("Q5_1", 24, 32, [0, 2]),
    ("Q8_0", 34, 32, [0]), ("Q2_K", 84, 256, [80, 82]), ("Q3_K", 110, 256, [108]),
    ("Q4_K", 144, 256, [0, 2]), ("Q5_K", 176, 256, [0, 2]), ("Q6_K", 210, 256, [208]),
]
ONE = {"F16": 0x3C00, "BF16": 0x3F80}  # 1.0; the quantized types' scales are f16


def write_blocks(path, qtype, raw):
    """One tensor of 2 rows holding the block bytes `raw` (gguf-py takes a
    uint8 array as the byte shape)."""
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.w", raw.reshape(2, -1), raw_dtype=GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype,bsize,blck,offs", TYPES, ids=[t[0] for t in TYPES])
def test_info_check_every_type_and_scale(moed_bin, tmp_path, qtype, bsize, blck, offs):
    rng = np.random.default_rng(1)
    n_blocks = 8 if blck > 1 else 512
    raw = rng.integers(0, 256, size=(n_blocks, bsize), dtype=np.uint8)
    one = np.frombuffer(np.uint16(ONE.get(qtype, 0x3C00)).tobytes(), np.uint8)
    for o in offs:  # finite scales (random bytes could be NaN halves)
        raw[:, o:o + 2] = one
    if blck == 1:  # plain halves: random signs and mantissas, exponents kept finite
        raw[:, 1] = raw[:, 1] & 0xBF
    clean = tmp_path / "clean.gguf"
    write_blocks(clean, qtype, raw)
    r = run(moed_bin, "info", "--check", clean)
    assert r.returncode == 0 and "1 tensors" in r.stdout and "all finite" in r.stdout, r.stdout + r.stderr
    k = 5
    for o in offs:
        for bits, kinds in ((0x7FC0 if qtype == "BF16" else 0x7E00, ("NaN",)),
                            (0x7F80 if qtype == "BF16" else 0x7C00, ("+Inf",) if blck == 1 else ("NaN", "+Inf", "-Inf"))):
            bad = raw.copy()
            bad[k, o:o + 2] = np.frombuffer(np.uint16(bits).tobytes(), np.uint8)
            path = tmp_path / "bad.gguf"
            write_blocks(path, qtype, bad)
            r = run(moed_bin, "info", "--check", path)
            assert r.returncode == 1, r.stdout + r.stderr
            line = f"tensor 'blk.0.w' ({qtype}): element {k * blck} "
            assert line in r.stdout and any(f"is {x}" in r.stdout for x in kinds), (o, hex(bits), r.stdout)


def test_generate_refuses_nonfinite(moed_bin, tiny, nan_row_model, tmp_path):
    # every token NaN (the router of layer 1): the first step already fails
    gate = corrupt(tiny, tmp_path / "gate.gguf", "blk.1.ffn_gate_inp.weight")
    r = run(moed_bin, "generate", "-m", gate, "--ids", "1,2,3", "-n", "4")
    assert r.returncode == 1 and "non-finite logits (NaN" in r.stderr and "position 2" in r.stderr, r.stderr
    assert r.stdout == ""  # no token printed from NaN logits
    # one NaN row: a prompt without it runs, one with it stops at its position
    ok = run(moed_bin, "generate", "-m", nan_row_model, "--ids", "1,2,3", "-n", "4")
    assert ok.returncode == 0 and len(ok.stdout.split()) == 4, ok.stderr
    bad = run(moed_bin, "generate", "-m", nan_row_model, "--ids", f"1,{BAD_TOKEN},3,4", "-n", "4")
    assert bad.returncode == 1 and "non-finite logits (NaN" in bad.stderr and "position 3" in bad.stderr, bad.stderr


@pytest.mark.parametrize("name,value", [("blk.1.ffn_gate_inp.weight", float("nan")),
                                        ("blk.0.attn_norm.weight", float("inf"))])
def test_serve_warmup_refuses_nonfinite(moed_bin, tiny, tmp_path, name, value):
    bad = corrupt(tiny, tmp_path / "bad.gguf", name, value=value)
    s = Server(moed_bin, bad, log_dir=tmp_path)
    try:
        rc = s.proc.wait(timeout=60)
    finally:
        s.stop()
    log = s.read_log()
    assert rc not in (0, None) and rc > 0, (rc, log)  # an exit status, not a signal
    assert "model load failed: warm-up forward pass: non-finite logits" in log, log
    assert "AddressSanitizer" not in log and "free()" not in log


def test_serve_nan_prompt_fails_only_its_request(moed_bin, nan_row_model, tmp_path):
    s = Server(moed_bin, nan_row_model, log_dir=tmp_path).wait_ready()
    url = s.url("/v1/completions")
    # the clean prompts never sample the bad token, or they would reach it too
    clean = {"model": "nanrow", "prompt": [1, 2, 3, 4], "max_tokens": 48, "temperature": 0,
             "ignore_eos": True, "logit_bias": {str(BAD_TOKEN): -100}}
    bad = {"model": "nanrow", "prompt": [1, 2, BAD_TOKEN, 4, 5], "max_tokens": 8, "temperature": 0}
    try:
        alone = requests.post(url, json=clean, timeout=60)
        assert alone.status_code == 200, alone.text
        want = alone.json()["choices"][0]["text"]
        results = {}

        def go(key, body, stream=False):
            r = requests.post(url, json={**body, "stream": stream}, stream=stream, timeout=60)
            results[key] = (r.status_code, list(sse_events(r)) if stream else r.json())

        th = [threading.Thread(target=go, args=("clean", clean)),
              threading.Thread(target=go, args=("bad", bad)),
              threading.Thread(target=go, args=("bad_stream", bad, True)),
              threading.Thread(target=go, args=("clean2", clean))]
        for t in th:
            t.start()
        for t in th:
            t.join(90)
        # non-streamed: the server's engine-error answer, naming the cause
        st, body = results["bad"]
        assert st == 500, body
        msg = body["error"]["message"]
        assert "non-finite logits (NaN" in msg and "at position 4" in msg, msg
        assert body["error"]["code"] == "engine_error", body
        # streamed: an error event, no tokens from NaN logits
        st, events = results["bad_stream"]
        assert st == 200, events
        errs = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errs) == 1 and "non-finite logits (NaN" in errs[0]["error"]["message"], events
        assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0].get("text") for e in events)
        # the others are untouched: the same greedy text as alone
        for key in ("clean", "clean2"):
            st, body = results[key]
            assert st == 200, body
            assert body["choices"][0]["text"] == want and body["usage"]["completion_tokens"] == 48, body
        # and the server goes on serving
        again = requests.post(url, json=clean, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == want
        assert requests.get(s.url("/health"), timeout=5).status_code == 200
    finally:
        assert s.stop() == 0, s.read_log()
