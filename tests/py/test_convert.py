"""`moed convert` as a user runs it, read back by llama.cpp's own gguf-py.

The numbers (logits against transformers for every architecture and
storage dtype) are held by tests/check_convert.c; here: the CLI contract
(exit codes, messages, no partial output) and that gguf-py reads the
files, with every tensor name one gguf-py lists for the architecture,
every <arch>.* key one of its keys, and the values equal to the
checkpoint's (safetensors read by numpy, an independent reader)."""
import json
import pathlib
import shutil
import struct
import subprocess

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, Keys

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "convert"
ARCH = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "mixtral": MODEL_ARCH.LLAMA,
        "qwen2moe": MODEL_ARCH.QWEN2MOE, "qwen3moe": MODEL_ARCH.QWEN3MOE, "deepseek2": MODEL_ARCH.DEEPSEEK2,
        "deepseek2lite": MODEL_ARCH.DEEPSEEK2, "deepseek3": MODEL_ARCH.DEEPSEEK2, "llama31": MODEL_ARCH.LLAMA}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "mixtral": "llama", "qwen2moe": "qwen2moe",
             "qwen3moe": "qwen3moe", "deepseek2": "deepseek2", "deepseek2lite": "deepseek2",
             "deepseek3": "deepseek2", "llama31": "llama"}
ST_DTYPE = {"F32": np.float32, "F16": np.float16}


def read_safetensors(d: pathlib.Path) -> dict[str, np.ndarray]:
    """All F32/F16/BF16 tensors of a checkpoint as float32 (a reader written
    from the format's definition, not moed's)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        hdr = json.loads(raw[8:8 + n])
        base = 8 + n
        for k, v in hdr.items():
            if k == "__metadata__":
                continue
            b, e = v["data_offsets"]
            buf = raw[base + b:base + e]
            if v["dtype"] == "BF16":
                a = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif v["dtype"] in ST_DTYPE:
                a = np.frombuffer(buf, ST_DTYPE[v["dtype"]]).astype(np.float32)
            else:
                continue
            out[k] = a.reshape(v["shape"])
    return out


def convert(moed_bin, src, out, *extra):
    return subprocess.run([moed_bin, "convert", str(src), str(out), *extra], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("name", list(ARCH))
def test_converted_file_read_by_gguf_py(moed_bin, tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    r = convert(moed_bin, FIX / name, out, "--type", "Q8_0")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (Q8_0)" in r.stdout
    assert not (tmp_path / f"{name}.gguf.tmp").exists()
    rd = GGUFReader(str(out))
    arch = GGUF_ARCH[name]
    fields = rd.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    n_layer = int(fields[f"{arch}.block_count"].parts[-1][0])
    allowed = set()
    for t in MODEL_TENSORS[ARCH[name]]:
        fmt = TENSOR_NAMES[t]
        allowed.update(fmt.format(bid=i) for i in range(n_layer)) if "{bid}" in fmt else allowed.add(fmt)
    for t in rd.tensors:
        assert t.name.rsplit(".", 1)[0] in allowed, f"{t.name} is not a gguf-py name for {arch}"
        if len(t.shape) == 1 or "ffn_gate_inp" in t.name:
            assert t.tensor_type.name == "F32", t.name
    keys = set()
    for group in (Keys.LLM, Keys.Attention, Keys.Rope):
        for v in vars(group).values():
            if isinstance(v, str) and "{arch}" in v:
                try:
                    keys.add(v.format(arch=arch))
                except KeyError:
                    pass
    for k in fields:
        if k.startswith(arch + "."):
            assert k in keys, f"{k} is not a gguf-py key"
    toks = fields["tokenizer.ggml.tokens"]
    assert len(toks.data) == 320
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert "tokenizer.chat_template" in fields


@pytest.mark.parametrize("name", ["qwen2", "mixtral", "deepseek2"])
def test_values_equal_checkpoint(moed_bin, tmp_path, name):
    """F32 output: tensors equal the checkpoint's values, moved as llama.cpp
    moves them (q/k rows permuted for llama, experts stacked, kv_b split)."""
    out = tmp_path / "m.gguf"
    assert convert(moed_bin, FIX / name, out, "--type", "F32").returncode == 0
    sd = read_safetensors(FIX / name)
    cfg = json.loads((FIX / name / "config.json").read_text())
    t = {x.name: np.asarray(x.data) for x in GGUFReader(str(out)).tensors}
    assert np.array_equal(t["token_embd.weight"], sd["model.embed_tokens.weight"])
    assert np.array_equal(t["blk.1.ffn_norm.weight"], sd["model.layers.1.post_attention_layernorm.weight"])
    if name == "mixtral":
        H, d = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
        q = sd["model.layers.0.self_attn.q_proj.weight"]
        # llama.cpp's permute: rows (h, 2, d/2) -> (h, d/2, 2)
        perm = q.reshape(H, 2, d // 2, -1).swapaxes(1, 2).reshape(q.shape)
        assert np.array_equal(t["blk.0.attn_q.weight"], perm)
        for j in range(cfg["num_local_experts"]):
            w1 = sd[f"model.layers.1.block_sparse_moe.experts.{j}.w1.weight"]
            w2 = sd[f"model.layers.1.block_sparse_moe.experts.{j}.w2.weight"]
            assert np.array_equal(t["blk.1.ffn_gate_exps.weight"][j], w1)
            assert np.array_equal(t["blk.1.ffn_down_exps.weight"][j], w2)
    if name == "qwen2":
        assert np.array_equal(t["blk.0.attn_q.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
        assert np.array_equal(t["blk.0.attn_k.bias"], sd["model.layers.0.self_attn.k_proj.bias"])
    if name == "deepseek2":
        H, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        kvb = sd["model.layers.2.self_attn.kv_b_proj.weight"].reshape(H, nope + v, -1)
        assert np.array_equal(t["blk.2.attn_k_b.weight"], kvb[:, :nope, :].transpose(0, 2, 1))
        assert np.array_equal(t["blk.2.attn_v_b.weight"], kvb[:, nope:, :])
        for j in range(cfg["n_routed_experts"]):
            assert np.array_equal(t["blk.2.ffn_up_exps.weight"][j], sd[f"model.layers.2.mlp.experts.{j}.up_proj.weight"])


def test_refusals_leave_nothing(moed_bin, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(FIX / "qwen2", src)
    out = tmp_path / "out.gguf"
    r = convert(moed_bin, src, out, "--type", "Q4_0")
    assert r.returncode == 2 and "--type 'Q4_0' is not one of F32, F16, BF16, Q8_0" in r.stderr
    r = subprocess.run([moed_bin, "convert", str(src)], capture_output=True, text=True)
    assert r.returncode == 2 and "HF_DIR and OUT.gguf are required" in r.stderr
    (src / "model.safetensors").write_bytes(b"\xff" * 16)
    r = convert(moed_bin, src, out)
    assert r.returncode == 1
    assert "model.safetensors" in r.stderr and "exceeds the limit" in r.stderr
    assert not out.exists() and not (tmp_path / "out.gguf.tmp").exists()
    r = convert(moed_bin, tmp_path / "nothing", out)
    assert r.returncode == 1 and "config.json" in r.stderr


def test_help(moed_bin):
    r = subprocess.run([moed_bin, "convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: moed convert HF_DIR OUT.gguf" in r.stdout
    r = subprocess.run([moed_bin, "--help"], capture_output=True, text=True)
    assert "convert" in r.stdout
