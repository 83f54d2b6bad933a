#!/usr/bin/env python3
"""Regenerate tests/fixtures/convert/: tiny Hugging Face checkpoints for
`moed convert`, and transformers' logits on them.

Each model of tests/gen_reference_fixtures.py (same config, seed and random
weights) is stored the way the Hub stores checkpoints - config.json,
model.safetensors or shards + model.safetensors.index.json, tokenizer.json,
tokenizer_config.json - in a storage dtype per model, so every reading path
of the converter is exercised:

    llama          F32                 llama-bpe pre-tokenizer, legacy rope_theta config
    qwen2          F16                 qwen2 pre-tokenizer, merges as ["a", "b"] pairs
    mixtral        BF16, 3 shards      gpt-2 (ByteLevel) pre-tokenizer
    qwen2moe       BF16                qwen2
    qwen3moe       F16, 2 shards       qwen2
    deepseek2      BF16                deepseek-llm, legacy rope_scaling config
    deepseek2lite  BF16                gpt-2
    deepseek3      FP8 e4m3 + 128x128 block scale_inv (F32), the rest BF16; deepseek-v3
    llama31        BF16                llama with Llama 3.1 rope scaling (rope_freqs)

The reference is transformers itself on the stored checkpoint: the weights
are rounded to the storage dtype (FP8: w = fp8 x scale_inv of its block,
dequantized here because transformers cannot run FP8 on a CPU), reloaded
with from_pretrained in float32, and run as gen_reference_fixtures.py runs
its models (prompt as one forward, then greedy decode through the cache).
NAME.ref.txt / NAME.logits.f32 / NAME.hidden.f32 have the format of
tests/fixtures/models/README.md.

CI never runs this (it needs torch + transformers); run it from a separate venv:

    python3 -m venv /tmp/cvtvenv
    /tmp/cvtvenv/bin/pip install torch transformers safetensors gguf numpy
    /tmp/cvtvenv/bin/python tests/gen_convert_fixtures.py [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_reference_fixtures as G  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "convert"
PRE = OUT / "pre"  # real pre_tokenizer objects of the families' tokenizer.json

# name -> (storage dtype, shards, pre-tokenizer, legacy config, chat template file)
STORE = {
    "llama": ("F32", 1, "llama-bpe", True, "llama3.jinja"),
    "qwen2": ("F16", 1, "qwen2", False, "qwen2.jinja"),
    "mixtral": ("BF16", 3, "gpt-2", False, "mixtral.jinja"),
    "qwen2moe": ("BF16", 1, "qwen2", True, "qwen2-instruct.jinja"),
    "qwen3moe": ("F16", 2, "qwen2", False, "qwen2-instruct.jinja"),
    "deepseek2": ("BF16", 1, "deepseek-llm", True, "deepseek2.jinja"),
    "deepseek2lite": ("BF16", 1, "gpt-2", False, "deepseek2.jinja"),
    "deepseek3": ("FP8", 1, "deepseek-v3", True, "deepseek3.jinja"),
    "llama31": ("BF16", 1, "llama-bpe", True, "llama3.jinja"),
}
# Models beyond gen_reference_fixtures.py's. llama31: with theta 5e5, head_dim
# 16 and an original context of 64 (Llama 3.1 has 8192: too long for a
# 15-token test to see), the pair wavelengths 6.3, 32, 167, 863, ... put pair
# 0 under orig/high (divisor 1), pair 1 in the blend and pairs 2-7 over
# orig/low (divisor = factor), and the rotation angles at positions up to 14
# are large enough for every branch to move the logits.
G.MODELS["llama31"] = ("llama", "llama", 109, dict(
    G.MODELS["llama"][3], max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
TDTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_BLOCK = 128


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float32 -> e4m3 weights and per-128x128-block scale_inv, as
    DeepSeek-V3's checkpoint stores them (w = fp8 * scale_inv)."""
    o, i = w.shape
    ro, ri = -(-o // FP8_BLOCK), -(-i // FP8_BLOCK)
    scale = torch.ones(ro, ri, dtype=torch.float32)
    q = torch.empty(o, i, dtype=torch.float8_e4m3fn)
    for a in range(ro):
        for b in range(ri):
            blk = w[a * FP8_BLOCK:(a + 1) * FP8_BLOCK, b * FP8_BLOCK:(b + 1) * FP8_BLOCK]
            amax = float(blk.abs().max())
            s = amax / 448.0 if amax > 0 else 1.0
            scale[a, b] = s
            q[a * FP8_BLOCK:(a + 1) * FP8_BLOCK, b * FP8_BLOCK:(b + 1) * FP8_BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:q.shape[0], :q.shape[1]]
    return q.to(torch.float32) * s


def is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    """The linear layers V3 stores in FP8: projections and experts, not the
    embeddings, lm_head, norms or the router."""
    return t.dim() == 2 and (name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"))


def tokenizer_files(d: pathlib.Path, pre: str, pairs: bool, template: str, add_bos: bool) -> None:
    tokens, types, merges = G.build_vocab()
    n_base = 256 + G.N_MERGES
    vocab = {tokens[i]: i for i in range(n_base)}
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if pre == "gpt-2":
        pt = dict(bl, use_regex=True)
    else:
        pt = json.loads((PRE / f"{pre}.json").read_text())
    tj = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": G.BOS, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True},
                         {"id": G.EOS, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": pt, "post_processor": dict(bl), "decoder": dict(bl),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in merges] if pairs else merges},
    }
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=1))
    tc = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos, "add_eos_token": False,
          "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast",
          "chat_template": (ROOT / "tests" / "fixtures" / "chat" / template).read_text()}
    (d / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=1))


def legacy_config(d: pathlib.Path) -> None:
    """transformers 5 writes rope_parameters; most Hub checkpoints still have
    rope_theta + rope_scaling, which the converter must read too."""
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rp.pop("rope_theta", 10000.0)
    rt = rp.pop("rope_type", "default")
    if rt != "default":
        cfg["rope_scaling"] = dict(rp, type=rt)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def shard(d: pathlib.Path, sd: dict[str, torch.Tensor], n: int) -> None:
    names = sorted(sd)
    if n == 1:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // n)
    wm = {}
    for k in range(n):
        fn = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        part = {x: sd[x] for x in names[k * per:(k + 1) * per]}
        save_file(part, str(d / fn), metadata={"format": "pt"})
        wm.update({x: fn for x in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))


def make(name: str, out: pathlib.Path) -> None:
    """Rounding to the storage dtype can make a near-tie of the greedy chain;
    then the next seed of gen_reference_fixtures' search is taken."""
    for k in range(10):
        if make_seed(name, out, G.MODELS[name][2] + 100000 * k):
            return
    raise RuntimeError(f"{name}: no seed survives rounding to {STORE[name][0]}")


def make_seed(name: str, out: pathlib.Path, seed: int) -> bool:
    model_type, arch, _, kw = G.MODELS[name]
    dtype, n_shards, pre, legacy, template = STORE[name]
    model, _, used_seed = G.build(model_type, kw, seed)
    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # float32, the Hub's per-expert tensor names
        sd = load_file(str(pathlib.Path(tmp) / "model.safetensors"))
        stored, deq = {}, {}
        for k, t in sd.items():
            if dtype == "FP8" and is_fp8_weight(k, t):
                q, s = fp8_quantize(t)
                stored[k], stored[k + "_scale_inv"] = q, s
                deq[k] = fp8_dequantize(q, s)
            else:
                st = TDTYPE["BF16" if dtype == "FP8" else dtype]
                stored[k] = t.to(st).contiguous()
                deq[k] = stored[k].to(torch.float32)
        # the reference model: transformers loading exactly the stored values
        save_file(deq, str(pathlib.Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        ref_model = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager",
                                                         experts_implementation="eager", dtype=torch.float32)
        ref_model.eval()
        ref = G.reference(ref_model)
        shutil.copy(pathlib.Path(tmp) / "config.json", d / "config.json")
    chain = ref["top1_margin"][len(G.PROMPT) - 1:]
    if min(chain) < G.MIN_CHAIN_MARGIN or len(set(ref["decode_input"])) < 3:
        return False
    if legacy:
        legacy_config(d)
    if dtype == "FP8":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    shard(d, stored, n_shards)
    tokenizer_files(d, pre, name == "qwen2", template, arch in ("llama", "deepseek2"))
    G.write_ref(out, name, [name], ref, json.loads((d / "config.json").read_text()), used_seed)
    (out / f"{name}.json").unlink()  # the config is in NAME/config.json
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"{name:14s} {dtype:4s} {size / 1024:7.1f} KiB  decode {ref['decode_input']}  "
          f"chain margin {min(chain):.3f}  seed {used_seed}")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    torch.set_num_threads(1)
    for name in STORE:
        if not only or name in only:
            make(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
