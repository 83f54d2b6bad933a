"""`moed mkmodel` files read by llama.cpp's own gguf-py: every tensor name
is one gguf-py lists for the architecture, every <arch>.* key is one of its
LLM keys, 1-D tensors are F32, and the vocabulary is a consistent GPT-2
byte-level BPE (byte tokens, merges whose parts and result are tokens)."""
import subprocess

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, Keys

ARCHS = {
    "deepseek2": MODEL_ARCH.DEEPSEEK2,
    "qwen2moe": MODEL_ARCH.QWEN2MOE,
    "qwen3moe": MODEL_ARCH.QWEN3MOE,
    "mixtral": MODEL_ARCH.LLAMA,
    "llama": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
}


def gpt2_byte_map():
    """GPT-2's bytes_to_unicode, written from its definition."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def valid_tensor_names(arch, n_layer):
    names = set()
    for t in MODEL_TENSORS[arch]:
        fmt = TENSOR_NAMES[t]
        if "{bid}" in fmt:
            names.update(fmt.format(bid=i) for i in range(n_layer))
        else:
            names.add(fmt)
    return names


def llm_keys(arch_name):
    keys = set()
    for group in (Keys.LLM, Keys.Attention, Keys.Rope):
        for k, v in vars(group).items():
            if isinstance(v, str) and "{arch}" in v:
                try:
                    keys.add(v.format(arch=arch_name))
                except KeyError:  # keys with other placeholders ({dense} ...)
                    pass
    return keys


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("qtype", ["F16", "Q4_0"])
def test_mkmodel_readable_by_gguf_py(moed_bin, tmp_path, arch, qtype):
    out = tmp_path / f"{arch}.gguf"
    subprocess.run([moed_bin, "mkmodel", "--arch", arch, "--preset", "tiny", "--type", qtype, "-o", out],
                   check=True, capture_output=True)
    r = GGUFReader(out)
    arch_name = MODEL_ARCH_NAMES[ARCHS[arch]]
    f = r.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == arch_name
    n_layer = int(f[f"{arch_name}.block_count"].parts[-1][0])

    valid = valid_tensor_names(ARCHS[arch], n_layer)
    names = {t.name for t in r.tensors}
    assert names <= {n + ".weight" for n in valid} | {n + ".bias" for n in valid}, names - valid
    has_exps = any("_exps" in n for n in names)
    assert has_exps == (arch not in ("llama", "qwen2"))
    for t in r.tensors:
        if len([d for d in t.shape if d > 1]) <= 1 or "ffn_gate_inp" in t.name:
            assert t.tensor_type.name == "F32", t.name  # norms, biases, routers
        else:
            assert t.tensor_type.name == qtype, t.name

    allowed = llm_keys(arch_name)
    arch_keys = {k for k in f if k.startswith(arch_name + ".")}
    assert arch_keys <= allowed, arch_keys - allowed

    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode() for i in f["tokenizer.ggml.merges"].data]
    assert len(toks) == len(types) == int(f[f"{arch_name}.vocab_size"].parts[-1][0])
    assert len(set(toks)) == len(toks)
    bm = gpt2_byte_map()
    assert set(bm.values()) <= set(toks)
    vocab = set(toks)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    bos = int(f["tokenizer.ggml.bos_token_id"].parts[-1][0])
    eos = int(f["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert types[bos] == 3 and types[eos] == 3  # CONTROL
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert int(emb.shape[1]) == len(toks)
    tmpl = bytes(f["tokenizer.chat_template"].parts[-1]).decode()
    assert "messages" in tmpl and "add_generation_prompt" in tmpl
    norm = next(t for t in r.tensors if t.name == "output_norm.weight")
    assert np.all(np.asarray(norm.data) == 1.0)


def test_v3_routing_names(moed_bin, tmp_path):
    """DeepSeek-V3-style routing: exp_probs_b and the group keys are names
    gguf-py knows for deepseek2."""
    out = tmp_path / "v3.gguf"
    subprocess.run([moed_bin, "mkmodel", "--arch", "deepseek2", "--gating", "sigmoid", "--groups", "4",
                    "--groups-used", "2", "--norm-topk", "1", "--routed-scale", "2.5", "-o", out],
                   check=True, capture_output=True)
    r = GGUFReader(out)
    f = r.fields
    assert int(f["deepseek2.expert_gating_func"].parts[-1][0]) == 2
    assert int(f["deepseek2.expert_group_count"].parts[-1][0]) == 4
    assert int(f["deepseek2.expert_group_used_count"].parts[-1][0]) == 2
    assert bool(f["deepseek2.expert_weights_norm"].parts[-1][0])
    assert {k for k in f if k.startswith("deepseek2.")} <= llm_keys("deepseek2")
    n_layer = int(f["deepseek2.block_count"].parts[-1][0])
    valid = valid_tensor_names(MODEL_ARCH.DEEPSEEK2, n_layer)
    names = {t.name for t in r.tensors}
    assert "blk.1.exp_probs_b.bias" in names
    assert names <= {n + ".weight" for n in valid} | {n + ".bias" for n in valid}


def test_v2lite_vocab_is_exact(moed_bin, tmp_path):
    """v2-lite pads the vocabulary to DeepSeek-V2's exact 102400 tokens
    (written with one layer and a narrow embedding to keep the file small)."""
    out = tmp_path / "v2l.gguf"
    subprocess.run([moed_bin, "mkmodel", "--arch", "deepseek2", "--preset", "v2-lite", "--type", "Q4_0",
                    "--layers", "1", "--embd", "64", "-o", out], check=True, capture_output=True)
    r = GGUFReader(out)
    f = r.fields
    assert len(f["tokenizer.ggml.tokens"].data) == 102400
    assert int(f["deepseek2.expert_count"].parts[-1][0]) == 64
    assert int(f["deepseek2.attention.kv_lora_rank"].parts[-1][0]) == 512
    info = subprocess.run([moed_bin, "info", "--no-tensors", out], check=True, capture_output=True, text=True)
    assert "n_vocab 102400" in info.stdout
