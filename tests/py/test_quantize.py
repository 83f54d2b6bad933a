"""`moed quantize` against llama.cpp's own gguf-py.

- Q8_0 / Q4_0 blocks are bit-identical to gguf.quants.quantize() on the same
  F32 input (both follow llama.cpp's reference round-to-nearest).
- gguf-py has no K-quant quantizer, so Q4_K / Q5_K / Q6_K are bounded: the
  error of gguf-py's *dequantization* of our bytes against the F32 input.
- Which tensor gets which type is checked against hand-written tables of
  llama.cpp's llama_tensor_get_type rules for an 8-layer llama and the
  8-expert mixtral fixture.
- Outputs load in gguf-py and `moed info`; metadata is copied; bad arguments
  fail with a message naming the cause and leave no file behind.
"""
import os
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "models")
# llama_ftype numbers (general.file_type)
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K": 14, "Q4_K_S": 14, "Q4_K_M": 15,
             "Q5_K": 16, "Q5_K_M": 17, "Q6_K": 18}
# RMSE / RMS(x) bounds for Gaussian weights, as in test_quant_ref.py.
RMSE_BOUND = {"Q4_K": 0.08, "Q5_K": 0.042, "Q6_K": 0.021}


def run(moed_bin, *args, check=True):
    r = subprocess.run([str(moed_bin), *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def l8(moed_bin, tmp_path_factory):
    """An 8-layer F32 llama whose n_embd (256) suits K-quants and whose
    n_ff (352) and attention width (64) do not: ffn_down and attn_output
    exercise the shape fallback."""
    d = tmp_path_factory.mktemp("quant")
    path = d / "l8.gguf"
    run(moed_bin, "mkmodel", "--arch", "llama", "--type", "F32", "--layers", 8, "--embd", 256, "--ff", 352,
        "--vocab", 512, "--heads", 4, "--heads-kv", 2, "--seed", 7, "-o", path)
    return path


def quantize(moed_bin, src, dst, qtype, *extra):
    r = run(moed_bin, "quantize", src, dst, qtype, *extra)
    assert os.path.exists(dst)
    return r


def tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def types(path):
    return {n: t.tensor_type.name for n, t in tensors(path).items()}


def f32_of(t):
    assert t.tensor_type == T.F32
    return np.asarray(t.data, dtype=np.float32).reshape(-1)


def raw_bytes(t):
    return np.asarray(t.data).view(np.uint8).tobytes()


def is_matrix(t):
    return sum(1 for n in t.shape if n > 1) >= 2 and not t.name.endswith("_norm.weight")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_blocks_bit_identical_to_gguf_py(moed_bin, l8, tmp_path, qtype):
    out = tmp_path / f"{qtype}.gguf"
    quantize(moed_bin, l8, out, qtype, "--pure")
    src, dst = tensors(l8), tensors(out)
    n_checked = 0
    for name, s in src.items():
        d = dst[name]
        if not is_matrix(s):
            assert d.tensor_type == T.F32 and raw_bytes(d) == raw_bytes(s), name
            continue
        assert d.tensor_type == T[qtype], name
        rows = f32_of(s).reshape(-1, int(s.shape[0]))
        ref = quants.quantize(rows, T[qtype])
        assert raw_bytes(d) == ref.tobytes(), f"{name}: blocks differ from gguf-py's"
        n_checked += 1
    assert n_checked == 2 + 8 * 7  # token_embd, output, and 7 matrices per layer

@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_error_bounded_by_gguf_py_dequantization(moed_bin, l8, tmp_path, qtype):
    out = tmp_path / f"{qtype}.gguf"
    quantize(moed_bin, l8, out, qtype, "--pure")
    src, dst = tensors(l8), tensors(out)
    n = 0
    for name, s in src.items():
        d = dst[name]
        if d.tensor_type != T[qtype]:
            continue
        x = f32_of(s)
        y = quants.dequantize(np.asarray(d.data), T[qtype]).astype(np.float32).reshape(-1)
        rel = np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2))
        assert 0 < rel < RMSE_BOUND[qtype], f"{name}: relative RMSE {rel:.4f}"
        n += 1
    # every 256-wide matrix: token_embd, output, and q, k, v, gate, up per layer
    assert n == 2 + 8 * 5


def expected_l8(qtype):
    """llama.cpp's choice per tensor for the 8-layer model, written out by
    hand from llama_tensor_get_type. use_more_bits(i, 8) holds for layers
    0, 3, 6, 7. Rows of 352 (ffn_down) and 64 (attn_output) elements are not
    multiples of 256, so Q4_K falls back to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0."""
    more = {0, 3, 6, 7}
    fb = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q4_K": "Q4_K"}.get(qtype, qtype)
    e = {"token_embd.weight": base, "output_norm.weight": "F32",
         "output.weight": "Q8_0" if qtype == "Q8_0" else "Q6_K"}
    for i in range(8):
        b = f"blk.{i}."
        e[b + "attn_norm.weight"] = e[b + "ffn_norm.weight"] = "F32"
        for n in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            e[b + n + ".weight"] = base
        v = down = base
        if qtype in ("Q4_K_M", "Q5_K_M"):
            v = down = "Q6_K" if i in more else base
        if qtype == "Q4_K":  # llama.cpp's Q4_K_S
            v = "Q5_K" if i < 4 else base
            down = "Q5_K" if i < 1 else base
        e[b + "attn_v.weight"] = v
        e[b + "ffn_down.weight"] = fb.get(down, down)
        e[b + "attn_output.weight"] = fb.get(base, base)
    return e


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q5_K_M", "Q4_K", "Q4_0", "Q8_0", "Q6_K"])
def test_mix_matches_hand_table(moed_bin, l8, tmp_path, qtype):
    out = tmp_path / f"{qtype}.gguf"
    r = quantize(moed_bin, l8, out, qtype)
    got = types(out)
    want = expected_l8(qtype)
    assert got == want, {k: (got.get(k), want.get(k)) for k in want if got.get(k) != want.get(k)}
    n_fb = sum(1 for k, t in want.items() if k.endswith(("ffn_down.weight", "attn_output.weight"))
               and t in ("Q5_0", "Q5_1", "Q8_0") and qtype not in ("Q4_0", "Q8_0"))
    if n_fb:
        assert f"warning: {n_fb} of 58 matrices have rows" in r.stderr, r.stderr
    else:
        assert "warning" not in r.stderr, r.stderr
    r = GGUFReader(str(out))
    assert int(r.fields["general.file_type"].parts[-1][0]) == FILE_TYPE[qtype]


def test_mix_eight_experts(moed_bin, tmp_path):
    """Mixtral (expert_count 8): attn_v and attn_k get Q8_0, attn_output
    Q5_K (64-wide rows here: falls back to Q5_1), the router stays F32."""
    src = os.path.join(FIXTURES, "mixtral.gguf")
    out = tmp_path / "m.gguf"
    quantize(moed_bin, src, out, "Q4_K_M")
    got = types(out)
    for name, t in got.items():
        if name.endswith(("attn_v.weight", "attn_k.weight")):
            assert t == "Q8_0", name
        elif name.endswith("attn_output.weight"):
            assert t == "Q5_1", name
        elif "ffn_gate_inp" in name or "norm" in name:
            assert t == "F32", name
    assert any("ffn_gate_inp" in n for n in got)


def test_outputs_load_and_keep_metadata(moed_bin, l8, tmp_path):
    out = tmp_path / "q.gguf"
    quantize(moed_bin, l8, out, "Q4_K_M")
    src, dst = GGUFReader(str(l8)), GGUFReader(str(out))
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k in ("general.file_type",):
            continue
        assert k in dst.fields, k
        g = dst.fields[k]
        assert [bytes(np.asarray(p).tobytes()) for p in f.parts] == [bytes(np.asarray(p).tobytes()) for p in g.parts], k
    assert int(dst.fields["general.quantization_version"].parts[-1][0]) == 2
    info = run(moed_bin, "info", out).stdout
    assert "Q4_K" in info and "Q6_K" in info
    # and the engine runs it
    g = run(moed_bin, "generate", "-m", out, "-n", 3, "-p", "hello")
    assert g.returncode == 0


def test_threads_do_not_change_output(moed_bin, l8, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize(moed_bin, l8, a, "Q5_K_M", "--threads", 1)
    quantize(moed_bin, l8, b, "Q5_K_M", "--threads", 3)
    assert a.read_bytes() == b.read_bytes()


def test_requantizing_warns(moed_bin, l8, tmp_path):
    q8 = tmp_path / "q8.gguf"
    quantize(moed_bin, l8, q8, "Q8_0")
    r = quantize(moed_bin, q8, tmp_path / "q4.gguf", "Q4_0")
    assert "already quantized" in r.stderr
    assert "already quantized" not in run(moed_bin, "quantize", l8, tmp_path / "x.gguf", "Q4_0").stderr


@pytest.mark.parametrize("args,code,msg", [
    (["IN", "OUT", "Q3_Z"], 2, "unknown TYPE 'Q3_Z'"),
    (["IN", "OUT"], 2, "want IN.gguf OUT.gguf TYPE"),
    (["IN", "OUT", "Q4_0", "--threads", "0"], 2, "--threads wants an integer"),
    (["IN", "OUT", "Q4_0", "--bogus"], 2, "unrecognized option '--bogus'"),
    (["MISSING", "OUT", "Q4_0"], 1, "MISSING"),
    (["TEXT", "OUT", "Q4_0"], 1, "TEXT"),
    (["IN", "DIR", "Q4_0"], 2, "not a regular file"),
    (["IN", "IN", "Q4_0"], 2, "same file as IN"),
    (["IN", "NODIR", "Q4_0"], 1, "cannot create"),
])
def test_bad_arguments_write_nothing(moed_bin, l8, tmp_path, args, code, msg):
    (tmp_path / "text.txt").write_text("not a gguf file\n")
    (tmp_path / "dir").mkdir()
    before = l8.read_bytes()
    names = {"IN": str(l8), "OUT": str(tmp_path / "out.gguf"), "MISSING": str(tmp_path / "missing.gguf"),
             "TEXT": str(tmp_path / "text.txt"), "DIR": str(tmp_path / "dir"),
             "NODIR": str(tmp_path / "nodir" / "out.gguf")}
    r = run(moed_bin, "quantize", *[names.get(a, a) for a in args], check=False)
    assert r.returncode == code, r.stderr
    want = names.get(msg, msg)
    assert want in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["dir", "text.txt"]
    assert l8.read_bytes() == before


def test_attn_v_counted_in_layer_order_not_file_order(moed_bin, tmp_path):
    """Files are often sorted by name (blk.10 before blk.2). llama.cpp counts
    attn_v tensors by layer number, so Q4_K_M's Q6_K attn_v layers are
    use_more_bits(layer, 12): 0, 3, 6, 9, 11 - whatever the file order."""
    import gguf
    path = tmp_path / "sorted.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(12)
    rng = np.random.default_rng(5)
    names = [f"blk.{i}.attn_v.weight" for i in range(12)] + [f"blk.{i}.ffn_down.weight" for i in range(12)]
    for n in sorted(names):
        w.add_tensor(n, rng.standard_normal((32, 256)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    order = [t.name for t in GGUFReader(str(path)).tensors if "attn_v" in t.name]
    assert order[:3] == ["blk.0.attn_v.weight", "blk.1.attn_v.weight", "blk.10.attn_v.weight"]
    out = tmp_path / "q.gguf"
    quantize(moed_bin, path, out, "Q4_K_M")
    got = types(out)
    more = {0, 3, 6, 9, 11}  # i < 12/8 or i >= 7*12/8 (=10) or (i - 1) % 3 == 2
    for i in range(12):
        want = "Q6_K" if i in more or i >= 10 else "Q4_K"
        assert got[f"blk.{i}.attn_v.weight"] == want, i
        assert got[f"blk.{i}.ffn_down.weight"] == want, i


@pytest.mark.parametrize("src_type", ["F16", "BF16"])
def test_half_precision_sources(moed_bin, l8, tmp_path, src_type):
    """An F16/BF16 file is decoded exactly and quantized like F32: blocks
    equal gguf-py's quantizer applied to the decoded values."""
    half = tmp_path / "half.gguf"
    quantize(moed_bin, l8, half, src_type)
    out = tmp_path / "q8.gguf"
    r = quantize(moed_bin, half, out, "Q8_0", "--pure")
    assert "already quantized" not in r.stderr
    src, dst = tensors(half), tensors(out)
    name = "blk.3.ffn_up.weight"
    assert src[name].tensor_type == T[src_type]
    x = quants.dequantize(np.asarray(src[name].data), T[src_type]).astype(np.float32)
    x = x.reshape(-1, int(src[name].shape[0]))
    assert raw_bytes(dst[name]) == quants.quantize(x, T.Q8_0).tobytes()
