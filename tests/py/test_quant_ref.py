"""engine/quant.c against gguf-py's independent numpy implementation.

For every weight type: bytes written by our quantizer, decoded by
gguf.quants.dequantize, must equal our own dequantizer bit for bit; random
(valid) block bytes decode identically in both; and for the types gguf-py
can quantize (F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) our bytes equal theirs,
since both follow llama.cpp's reference round-to-nearest algorithms.
gguf-py cannot quantize K-quants, so for Q4_K Q5_K Q6_K the error of our
own quantizer is bounded here (and more tightly in tests/check_quant.c).
"""
import subprocess

import gguf
import numpy as np
import pytest

from gguf import GGMLQuantizationType as T
from gguf import quants

QUANTIZABLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
GGUF_CAN_QUANTIZE = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
DEQUANT_ONLY = ["Q2_K", "Q3_K"]
# Byte offsets of the f16 scale fields inside each block, so random block
# bytes can be made finite (gguf-py and we agree on NaN too, but a NaN
# scale would hide every other difference in that block).
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
# Upper bound of RMSE / RMS(x) on the Gaussian part of make_data(); measured
# values are ~20 % lower (Q4_0 .086, Q4_K .071, Q5_K .036, Q6_K .017, Q8_0 .0053).
RMSE_BOUND = {"Q4_0": 0.10, "Q4_1": 0.09, "Q5_0": 0.05, "Q5_1": 0.045, "Q8_0": 0.0065,
              "Q4_K": 0.08, "Q5_K": 0.042, "Q6_K": 0.021, "F16": 3e-4, "BF16": 2.2e-3, "F32": 0.0}


@pytest.fixture(scope="module")
def tool(build_dir):
    path = build_dir / "tests" / "tool_quant"
    assert path.exists(), f"{path} is not built; run `make build/tests/tool_quant`"
    return str(path)


def run_tool(tool, mode, name, n, data: bytes) -> bytes:
    r = subprocess.run([tool, mode, name, str(n)], input=data, capture_output=True, check=False)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def make_data(n=4096, seed=1234):
    """Gaussian rows plus the awkward blocks: zeros, a constant, a lone
    outlier, all-positive and all-negative runs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[0:256] = 0.0
    x[256:288] = 0.75
    x[512:768] *= 0.01
    x[700] = 40.0
    x[768:1024] = np.abs(x[768:1024]) + 1.0
    x[1024:1280] = -np.abs(x[1024:1280]) - 0.5
    return x


def bits_equal(a, b):
    a = np.asarray(a, dtype=np.float32).ravel()
    b = np.asarray(b, dtype=np.float32).ravel()
    same = a.view(np.uint32) == b.view(np.uint32)
    same |= np.isnan(a) & np.isnan(b)
    return bool(same.all()), int((~same).sum())


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_our_bytes_decode_identically(tool, name):
    x = make_data()
    qt = T[name]
    ours = run_tool(tool, "quant", name, x.size, x.tobytes())
    raw = np.frombuffer(ours, dtype=np.uint8)
    theirs = quants.dequantize(raw, qt).astype(np.float32).ravel()
    mine = np.frombuffer(run_tool(tool, "dequant", name, x.size, ours), dtype=np.float32)
    ok, bad = bits_equal(mine, theirs)
    assert ok, f"{name}: {bad} elements differ"
    rmse = float(np.sqrt(np.mean((mine[1280:] - x[1280:]) ** 2)) / np.sqrt(np.mean(x[1280:] ** 2)))
    assert rmse <= RMSE_BOUND[name], f"{name}: relative RMSE {rmse}"
    # Zero blocks must come back as exact zeros, constants nearly exact.
    assert np.all(mine[0:256] == 0.0)


@pytest.mark.parametrize("name", GGUF_CAN_QUANTIZE)
def test_quantize_bytes_match_gguf(tool, name):
    x = make_data(seed=99)
    ours = np.frombuffer(run_tool(tool, "quant", name, x.size, x.tobytes()), dtype=np.uint8)
    theirs = quants.quantize(x, T[name])
    theirs = np.ascontiguousarray(theirs).view(np.uint8).ravel()
    assert ours.size == theirs.size
    diff = np.nonzero(ours != theirs)[0]
    assert diff.size == 0, f"{name}: {diff.size} bytes differ, first at {diff[:8]}"


@pytest.mark.parametrize("name", QUANTIZABLE[1:] + DEQUANT_ONLY)
def test_random_blocks_decode_identically(tool, name):
    qt = T[name]
    blck, size = gguf.GGML_QUANT_SIZES[qt]
    nblk = 64
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(nblk, size), dtype=np.uint8)
    for off in F16_FIELDS.get(name, []):
        d = rng.uniform(-2.0, 2.0, size=nblk).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(nblk, 2)
    raw = raw.ravel()
    n = nblk * blck
    mine = np.frombuffer(run_tool(tool, "dequant", name, n, raw.tobytes()), dtype=np.float32)
    theirs = quants.dequantize(raw, qt).astype(np.float32).ravel()
    ok, bad = bits_equal(mine, theirs)
    assert ok, f"{name}: {bad} of {n} elements differ"


def test_bad_n_refused(tool):
    r = subprocess.run([tool, "quant", "Q4_K", "100"], input=b"\0" * 400, capture_output=True)
    assert r.returncode == 1
