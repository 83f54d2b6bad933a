"""GGUF interop between moed's reader/writer (engine/gguf.c) and llama.cpp's
gguf-py package, the reference implementation of the format.

(a) files written by gguf.GGUFWriter are dumped by build/tests/tool_gguf_dump
    and must match what was written, field by field;
(b) the file written by build/tests/tool_gguf_write (moed's writer) is read by
    gguf.GGUFReader and must hold exactly the recipe in that tool;
(c) every fixture model and fuzz seed dumps identically through both readers.

Binaries come from MOED_BUILD (default build/); build them with
`make CUDA=0 build/tests/tool_gguf_dump build/tests/tool_gguf_write`.
"""
import json
import pathlib
import subprocess

import gguf
import numpy as np
import pytest

from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

ROOT = pathlib.Path(__file__).resolve().parents[2]


def fnv1a(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def tool(build_dir, name):
    path = pathlib.Path(build_dir) / "tests" / name
    assert path.exists(), f"{path} is not built; run `make {path}` (`make pytest` builds it)"
    return path


def dump(build_dir, path):
    """Runs tool_gguf_dump: returns (header, {key: (type, value)}, [kv keys in order], [tensor dicts])."""
    out = subprocess.run([str(tool(build_dir, "tool_gguf_dump")), str(path)], capture_output=True, check=False)
    lines = [json.loads(line) for line in out.stdout.decode("utf-8").splitlines() if line]
    if out.returncode != 0:
        return lines[0], None, None, None
    header, kvs, order, tensors = lines[0], {}, [], []
    for line in lines[1:]:
        if "kv" in line:
            kvs[line["kv"]] = (line["type"], line["value"])
            order.append(line["kv"])
        else:
            tensors.append(line)
    assert header["n_kv"] == len(kvs) and header["n_tensors"] == len(tensors)
    return header, kvs, order, tensors


# ---- expected canonical values (what tool_gguf_dump prints) ----

def canon(vtype, value, sub_type=None):
    """The dump's JSON value for `value` written as `vtype`."""
    if vtype == VT.ARRAY:
        etype = sub_type if sub_type is not None else VT.get_type(value[0])
        return {"etype": etype.name, "items": [canon(etype, v) for v in value]}
    if vtype == VT.STRING:
        return value.decode("utf-8") if isinstance(value, bytes) else value
    if vtype == VT.BOOL:
        return bool(value)
    if vtype in (VT.FLOAT32, VT.FLOAT64):
        return float(value)
    return int(value)


def same(vtype_name, got, want):
    """Compares dump values; FLOAT32 printed with %.9g is compared as float32."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got["etype"] == want["etype"], (got, want)
        assert len(got["items"]) == len(want["items"])
        for g, w in zip(got["items"], want["items"]):
            same(want["etype"], g, w)
    elif vtype_name == "FLOAT32":
        assert np.float32(got) == np.float32(want) or (np.isnan(got) and np.isnan(want)), (got, want)
    else:
        assert type(got) is type(want) and got == want, (vtype_name, got, want)


# ---- (a) gguf-py writes, moed reads ----

PY_RECIPE = [
    ("t.u8", VT.UINT8, 255, None),
    ("t.i8", VT.INT8, -128, None),
    ("t.u16", VT.UINT16, 65535, None),
    ("t.i16", VT.INT16, -32768, None),
    ("t.u32", VT.UINT32, 4294967295, None),
    ("t.i32", VT.INT32, -2147483648, None),
    ("t.f32", VT.FLOAT32, 1.0e-3, None),
    ("t.bool_t", VT.BOOL, True, None),
    ("t.bool_f", VT.BOOL, False, None),
    ("t.str", VT.STRING, "moed \u2713 \u00fcnicode", None),
    ("t.str_nul", VT.STRING, "nul\x00inside", None),
    ("t.u64", VT.UINT64, 2**64 - 1, None),
    ("t.i64", VT.INT64, -(2**63), None),
    ("t.f64", VT.FLOAT64, 1.0 / 3.0, None),
    ("a.u8", VT.ARRAY, [0, 7, 255], VT.UINT8),
    ("a.i8", VT.ARRAY, [-128, 127], VT.INT8),
    ("a.u16", VT.ARRAY, [1, 65535], VT.UINT16),
    ("a.i16", VT.ARRAY, [-32768, 5], VT.INT16),
    ("a.u32", VT.ARRAY, [4294967295, 0, 3], VT.UINT32),
    ("a.i32", VT.ARRAY, [-1, 2, -3], VT.INT32),
    ("a.f32", VT.ARRAY, [0.1, -2.5, 1e30], VT.FLOAT32),
    ("a.bool", VT.ARRAY, [True, False, False], VT.BOOL),
    ("a.u64", VT.ARRAY, [2**64 - 1, 2**40], VT.UINT64),
    ("a.i64", VT.ARRAY, [-(2**63), 2**63 - 1], VT.INT64),
    ("a.f64", VT.ARRAY, [0.1, -1e-300], VT.FLOAT64),
    ("a.str", VT.ARRAY, ["<s>", "</s>", "\u2581the", ""], VT.STRING),
    ("a.nested", VT.ARRAY, [[1, 2], [3, 4, 5]], None),
    ("a.nested_str", VT.ARRAY, [["a"], ["b", "c"]], None),
    ("a.nested3", VT.ARRAY, [[[1.5]], [[2.5, 3.5]]], None),
]


def py_tensors():
    rng = np.random.default_rng(1234)
    raw = lambda n: rng.integers(0, 256, size=n, dtype=np.uint8)  # noqa: E731
    return [
        ("token_embd.weight", rng.standard_normal((3, 8)).astype(np.float32), None),
        ("h16", rng.standard_normal((2, 16)).astype(np.float16), None),
        ("i8", np.arange(-5, 5, dtype=np.int8), None),
        ("i16", np.arange(12, dtype=np.int16).reshape(3, 4), None),
        ("i32", np.arange(24, dtype=np.int32).reshape(2, 3, 4), None),
        ("i64", np.arange(16, dtype=np.int64).reshape(2, 2, 2, 2), None),
        ("f64", rng.standard_normal(5), None),
        ("blk.0.attn_q.weight", raw((2, 34 * 2)), QT.Q8_0),
        ("blk.0.ffn_down.weight", raw((3, 144)), QT.Q4_K),
        ("blk.0.ffn_up.weight", raw((1, 210 * 2)), QT.Q6_K),
        ("blk.0.q4_0", raw((2, 18)), QT.Q4_0),
        ("bf16", raw((2, 64)), QT.BF16),
    ]


def test_gguf_py_written_file_reads_identically(build_dir, tmp_path):
    path = tmp_path / "py.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(128)
    for key, vtype, value, sub in PY_RECIPE:
        w.add_key_value(key, value, vtype, sub_type=sub)
    tensors = py_tensors()
    for name, arr, raw_dtype in tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    header, kvs, _, got_tensors = dump(build_dir, path)
    assert kvs is not None, header
    assert header["version"] == 3
    assert header["alignment"] == 128
    assert header["data_offset"] % 128 == 0
    want = {"general.architecture": ("STRING", "llama"), "general.alignment": ("UINT32", 128)}
    for key, vtype, value, sub in PY_RECIPE:
        want[key] = (vtype.name, canon(vtype, value, sub))
    assert set(kvs) == set(want)
    for key, (vtype, value) in want.items():
        assert kvs[key][0] == vtype, key
        same(vtype, kvs[key][1], value)

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    assert [t["tensor"] for t in got_tensors] == [n for n, _, _ in tensors]
    for t, (name, arr, raw_dtype) in zip(got_tensors, tensors):
        data = np.ascontiguousarray(arr).tobytes()
        qtype = raw_dtype if raw_dtype is not None else by_name[name].tensor_type
        assert t["type"] == qtype.name and t["type_id"] == int(qtype)
        assert t["ne"] == [int(x) for x in by_name[name].shape]
        if raw_dtype is None:
            assert t["ne"] == list(reversed(arr.shape))
        assert t["nbytes"] == len(data)
        assert t["fnv1a"] == fnv1a(data), name
        assert t["offset"] % 128 == 0
        assert header["data_offset"] + t["offset"] == by_name[name].data_offset


# ---- (b) moed writes, gguf-py reads ----

def moed_pattern(k, n):
    i = np.arange(n, dtype=np.int64)
    return ((i * 131 + k * 17 + 7 + (i >> 8)) & 0xFF).astype(np.uint8).tobytes()


# Mirrors tests/tool_gguf_write.c.
MOED_SCALARS = [
    ("general.architecture", VT.STRING, "llama"),
    ("general.alignment", VT.UINT32, 64),
    ("t.u8", VT.UINT8, 200),
    ("t.i8", VT.INT8, -100),
    ("t.u16", VT.UINT16, 60000),
    ("t.i16", VT.INT16, -30000),
    ("t.u32", VT.UINT32, 4000000000),
    ("t.i32", VT.INT32, -2000000000),
    ("t.f32", VT.FLOAT32, np.float32(0.1)),
    ("t.bool", VT.BOOL, True),
    ("t.str", VT.STRING, "h\u00e9llo w\u00f6rld \u2713"),
    ("t.str_nul", VT.STRING, "a\x00b"),
    ("t.str_empty", VT.STRING, ""),
    ("t.u64", VT.UINT64, 9223372036854775813),
    ("t.i64", VT.INT64, -4611686018427387907),
    ("t.f64", VT.FLOAT64, 2.718281828459045),
]
MOED_ARRAYS = [
    ("a.u8", VT.UINT8, [0, 1, 255]),
    ("a.i8", VT.INT8, [-128, 0, 127]),
    ("a.u16", VT.UINT16, [0, 65535]),
    ("a.i16", VT.INT16, [-32768, 32767]),
    ("a.u32", VT.UINT32, [0, 4294967295]),
    ("a.i32", VT.INT32, [-(2**31), 2**31 - 1, 0]),
    ("a.f32", VT.FLOAT32, [0.5, -1.25, float(np.float32(3.4028234663852886e38))]),
    ("a.bool", VT.BOOL, [True, False, True]),
    ("a.u64", VT.UINT64, [2**64 - 1, 0]),
    ("a.i64", VT.INT64, [-(2**63), 2**63 - 1]),
    ("a.f64", VT.FLOAT64, [0.1, -1e308]),
    ("a.str", VT.STRING, ["alpha", "", "\u00fcn\u00ef"]),
]
MOED_TENSORS = [
    ("tok", QT.F32, [8, 3]),
    ("h", QT.F16, [16]),
    ("b", QT.BF16, [32, 2]),
    ("q8", QT.Q8_0, [64, 2]),
    ("q4k", QT.Q4_K, [256, 2]),
    ("q6k", QT.Q6_K, [256]),
    ("i32", QT.I32, [4, 2, 3]),
    ("f64", QT.F64, [2, 2, 1, 2]),
]


def test_moed_written_file_reads_in_gguf_py(build_dir, tmp_path):
    path = tmp_path / "moed.gguf"
    subprocess.run([str(tool(build_dir, "tool_gguf_write")), str(path)], check=True)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert int(fields["GGUF.version"].parts[-1][0]) == 3
    assert reader.alignment == 64
    user_keys = [k for k in fields if not k.startswith("GGUF.")]
    expected_keys = [k for k, _, _ in MOED_SCALARS] + [k for k, _, _ in MOED_ARRAYS] + [
        "a.empty", "a.nested", "a.nested_str"]
    assert user_keys == expected_keys

    for key, vtype, value in MOED_SCALARS:
        f = fields[key]
        assert f.types == [vtype], key
        got = f.contents()
        if vtype == VT.FLOAT32:
            assert np.float32(got) == value
        else:
            assert got == value and type(got) is type(value), (key, got, value)
    for key, etype, values in MOED_ARRAYS:
        f = fields[key]
        assert f.types == [VT.ARRAY, etype], key
        assert f.contents() == values, key

    # Empty array: no element parts, but the element type is stored.
    f = fields["a.empty"]
    assert f.types == [VT.ARRAY]
    assert int(f.parts[3][0]) == VT.INT32 and int(f.parts[4][0]) == 0
    # Nested arrays: gguf-py flattens them to their leaves.
    f = fields["a.nested"]
    assert f.types == [VT.ARRAY, VT.ARRAY, VT.INT32]
    assert [int(f.parts[i][0]) for i in f.data] == [1, 2, 3]
    assert int(f.parts[4][0]) == 2  # outer length
    f = fields["a.nested_str"]
    assert f.types == [VT.ARRAY, VT.ARRAY, VT.STRING]
    assert [bytes(f.parts[i]).decode() for i in f.data] == ["x", "y", "z"]

    raw = path.read_bytes()
    assert [t.name for t in reader.tensors] == [n for n, _, _ in MOED_TENSORS]
    for k, (t, (name, qtype, ne)) in enumerate(zip(reader.tensors, MOED_TENSORS)):
        bsz, tsz = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(ne)) // bsz * tsz
        assert t.tensor_type == qtype, name
        assert [int(x) for x in t.shape] == ne, name
        assert t.n_bytes == nbytes, name
        assert t.data_offset % 64 == 0, name
        want = moed_pattern(k, nbytes)
        assert raw[t.data_offset:t.data_offset + nbytes] == want, name
        assert np.ascontiguousarray(t.data).tobytes() == want, name
    # The last tensor is padded to the alignment, like gguf-py does.
    assert len(raw) % 64 == 0

    # And moed reads its own file back the same way.
    header, kvs, _, tensors = dump(build_dir, path)
    assert header["alignment"] == 64
    assert kvs["a.empty"] == ("ARRAY", {"etype": "INT32", "items": []})
    assert kvs["a.nested"][1] == {"etype": "ARRAY", "items": [
        {"etype": "INT32", "items": [1, 2]}, {"etype": "INT32", "items": [3]}]}
    for k, t in enumerate(tensors):
        assert t["fnv1a"] == fnv1a(moed_pattern(k, t["nbytes"]))


# ---- (c) both readers agree on real files ----

def py_field_canon(f):
    """Canonical dump value of a gguf-py ReaderField (nested arrays flattened to leaves)."""
    t0 = f.types[0]
    if t0 != VT.ARRAY:
        v = f.contents()
        return t0.name, canon(t0, v)
    if len(f.types) > 2 and f.types[1] == VT.ARRAY:
        leaf = f.types[-1]
        if leaf == VT.STRING:
            return "ARRAY", ("nested", [bytes(f.parts[i]).decode("utf-8") for i in f.data])
        return "ARRAY", ("nested", [canon(leaf, f.parts[i][0]) for i in f.data])
    etype = f.types[1] if len(f.types) > 1 else VT(int(f.parts[3][0]))
    return "ARRAY", {"etype": etype.name, "items": [canon(etype, v) for v in f.contents()]}


def leaves(v):
    if isinstance(v, dict):
        return [x for item in v["items"] for x in leaves(item)]
    return [v]


FILES = sorted((ROOT / "tests" / "fixtures" / "models").glob("*.gguf")) + sorted(
    (ROOT / "tests" / "fuzz" / "seeds").glob("*.gguf"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_readers_agree(build_dir, path):
    header, kvs, order, tensors = dump(build_dir, path)
    assert kvs is not None, header
    reader = gguf.GGUFReader(str(path))
    py_keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert order == py_keys
    assert header["alignment"] == reader.alignment
    for key in py_keys:
        vtype, want = py_field_canon(reader.fields[key])
        assert kvs[key][0] == vtype, key
        if isinstance(want, tuple):  # nested: compare the leaves
            got = leaves(kvs[key][1])
            assert len(got) == len(want[1]), key
            for g, w in zip(got, want[1]):
                assert g == w or np.float32(g) == np.float32(w), key
        else:
            same(vtype, kvs[key][1], want)
    raw = path.read_bytes()
    assert [t["tensor"] for t in tensors] == [t.name for t in reader.tensors]
    for t, rt in zip(tensors, reader.tensors):
        assert t["type_id"] == int(rt.tensor_type), t["tensor"]
        assert t["ne"] == [int(x) for x in rt.shape]
        assert t["nbytes"] == int(rt.n_bytes)
        assert header["data_offset"] + t["offset"] == rt.data_offset
        assert t["fnv1a"] == fnv1a(raw[rt.data_offset:rt.data_offset + rt.n_bytes])


# ---- refusals reach the tool's JSON ----

def test_truncated_file_is_refused(build_dir, tmp_path):
    seed = ROOT / "tests" / "fuzz" / "seeds" / "basic.gguf"
    full, _, _, tensors = dump(build_dir, seed)
    last = tensors[-1]
    end = full["data_offset"] + last["offset"] + last["nbytes"]
    path = tmp_path / "cut.gguf"
    path.write_bytes(seed.read_bytes()[:end - 1])  # one byte short of the last tensor
    header, kvs, _, _ = dump(build_dir, path)
    assert kvs is None
    assert header["error"] == "EFORMAT"
    assert f"tensor '{last['tensor']}'" in header["message"]
    assert "past end of file" in header["message"]
