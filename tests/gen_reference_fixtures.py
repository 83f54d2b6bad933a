#!/usr/bin/env python3
"""Regenerate the reference fixtures in tests/fixtures/models/.

Builds tiny random-weight models with Hugging Face transformers' own modeling
classes (fixed seeds, float32, eager attention, eager experts), writes each as
a GGUF file with llama.cpp's architecture names, metadata keys and tensor
names, and saves transformers' logits for a fixed prompt (every position, one
forward) followed by greedy decode steps that use the KV cache.

CI never runs this: the outputs are committed. It needs more than the test
venv (torch, transformers), so run it from a separate one:

    python3 -m venv /tmp/fixvenv
    /tmp/fixvenv/bin/pip install torch transformers gguf numpy
    /tmp/fixvenv/bin/python tests/gen_reference_fixtures.py

Options: --out DIR (default tests/fixtures/models), --only NAME[,NAME].
Everything written is documented in tests/fixtures/models/README.md; change
both together. tests/py/test_fixtures.py re-derives every logit from the GGUF
alone with numpy, following the README's conventions, so a mistake in either
this script's conversion or the README fails there.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import sys

import numpy as np
import torch
import transformers
import gguf
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "models"

VOCAB = 320
N_MERGES = 60
BOS, EOS = 316, 317  # after the 256 byte tokens and the 60 merges
# A fixed prompt of token ids: BOS, byte tokens and merge tokens. The forward
# tests feed ids directly, so what they spell does not matter.
PROMPT = [BOS, 72, 105, 32, 261, 109, 280, 101, 33, 300]
N_DECODE = 5

# The DeepSeek-V2-Lite / V3 rope scaling, kept exactly (factor 40 over a 4096
# training context): with a rope dimension of 8 and base 10000 the YaRN ramp
# covers pair 0 extrapolated, pairs 1-2 blended and pair 3 interpolated, so
# every branch of the formula shows up in the logits.
YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
           "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
           "mscale": 0.707, "mscale_all_dim": 0.707}
YARN_V3 = dict(YARN_V2, mscale=1.0, mscale_all_dim=1.0)

COMMON = dict(vocab_size=VOCAB, hidden_size=64, rms_norm_eps=1e-6, bos_token_id=BOS,
              eos_token_id=EOS, pad_token_id=None, tie_word_embeddings=False,
              hidden_act="silu", use_cache=True)

# name -> (model_type, gguf arch, seed, HF config kwargs)
MODELS: dict[str, tuple[str, str, int, dict]] = {
    "llama": ("llama", "llama", 101, dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False, mlp_bias=False)),
    "qwen2": ("qwen2", "qwen2", 102, dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral": ("mixtral", "llama", 103, dict(
        COMMON, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
        sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2moe": ("qwen2_moe", "qwen2moe", 104, dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, use_sliding_window=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], qkv_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3moe": ("qwen3_moe", "qwen3moe", 105, dict(
        COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # DeepSeek-V2 (the 236B layout): q LoRA, softmax gating, group-limited
    # greedy top-k (score of a group = its best expert), routed scaling != 1.
    # top-k (3) > topk_group (2), as in V2 (6 > 3): otherwise limiting to the
    # groups of the best experts can never change the choice.
    "deepseek2": ("deepseek_v2", "deepseek2", 106, dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=163840,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=False, scoring_func="softmax", attention_bias=False,
        rope_parameters=YARN_V2)),
    # DeepSeek-V2-Lite layout: no q LoRA (plain q_proj), plain greedy top-k.
    "deepseek2lite": ("deepseek_v2", "deepseek2", 107, dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=163840,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, scoring_func="softmax", attention_bias=False,
        rope_parameters=YARN_V2)),
    # DeepSeek-V3: sigmoid scores + e_score_correction_bias for the choice,
    # group score = sum of the top-2 biased scores in the group, weights from
    # the unbiased scores, normalised, then routed scaling. 16 experts in 4
    # groups so "top-2 of a group" is a real choice.
    "deepseek3": ("deepseek_v3", "deepseek2", 108, dict(
        COMMON, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=163840,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=True, attention_bias=False, rope_parameters=YARN_V3)),
}
# Models also written in the newer llama.cpp MLA layout (attn_k_b/attn_v_b
# instead of attn_kv_b, different attention.* keys); same reference logits.
MLA_TOO = {"deepseek3"}


# --- weights --------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and buffer that is a weight with random values.

    Scales keep activations O(1) through the stack and logits spread (std ~3)
    so greedy choices are not near-ties; norms are random around 1 (never
    exactly 1, so a forgotten norm weight shows), biases are small but real.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                val = 0.6 + 0.8 * torch.rand(*shape, generator=g)
            elif name.endswith(".bias"):
                val = 0.2 * randn(*shape)
            elif "embed_tokens" in name:
                val = randn(*shape)
            elif name == "lm_head.weight":
                val = randn(*shape) * (3.0 / math.sqrt(shape[-1]))
            elif name.endswith("gate.weight") and p.dim() == 2 and "proj" not in name:
                # routers (and Qwen2-MoE's shared_expert_gate): decisive routing
                val = randn(*shape) * (2.0 / math.sqrt(shape[-1]))
            elif p.dim() >= 2:
                val = randn(*shape) * (1.0 / math.sqrt(shape[-1]))
            else:
                raise RuntimeError(f"no init rule for {name} {shape}")
            p.copy_(val)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # same order of magnitude as the spread of sigmoid scores, so
                # the bias changes which experts win
                b.copy_(0.3 * (torch.rand(*b.shape, generator=g) - 0.5))


def state(model) -> dict[str, np.ndarray]:
    sd = {}
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            sd[k] = v.detach().to(torch.float32).cpu().numpy().copy()
    return sd


# --- tokenizer ------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character map (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


TRAIN_TEXT = ("the quick brown fox jumps over the lazy dog. mixture of experts models route each "
              "token to a few experts; the router picks the top experts and the rest stay idle. "
              "in the beginning the engine reads the weights, then the tokens, then the next token.")


def build_vocab() -> tuple[list[str], list[int], list[str]]:
    """A valid byte-level BPE vocab: 256 byte tokens, N_MERGES learned merges,
    BOS/EOS, padding. Learned greedily on TRAIN_TEXT so every merge's result is
    itself in the vocab, as a gpt2 tokenizer expects."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    words = []
    for i, w in enumerate(TRAIN_TEXT.split(" ")):
        w = (" " if i else "") + w
        words.append([b2u[b] for b in w.encode()])
    merges = []
    while len(merges) < N_MERGES:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        best = max(sorted(counts), key=lambda p: counts[p])  # sorted: deterministic ties
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                else:
                    i += 1
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += ["<s>", "</s>"]
    types += [gguf.TokenType.CONTROL] * 2
    while len(tokens) < VOCAB:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf.TokenType.UNUSED)
    assert tokens[BOS] == "<s>" and tokens[EOS] == "</s>" and len(tokens) == VOCAB
    return tokens, [int(t) for t in types], merges


# --- GGUF -----------------------------------------------------------------

def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate_half rope pairs row j with row j + d/2 of each head; ggml's
    "normal" rope (the llama arch) pairs rows 2i, 2i+1. Reorder the rows of a
    q/k projection (weight or bias) so row 2i+t of a head is old row t*d/2+i."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors_for(name: str, arch: str, cfg, sd: dict[str, np.ndarray],
                mla: bool) -> tuple[list[tuple[str, np.ndarray]], set[str]]:
    """GGUF (name, array) pairs for one model, and the HF tensor names used."""
    out: list[tuple[str, np.ndarray]] = [
        ("token_embd.weight", sd["model.embed_tokens.weight"]),
        ("output_norm.weight", sd["model.norm.weight"]),
        ("output.weight", sd["lm_head.weight"]),
    ]
    H = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        t = []
        t.append(("attn_norm.weight", sd[p + "input_layernorm.weight"]))
        t.append(("ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]))
        a = p + "self_attn."
        if arch == "deepseek2":
            if cfg.q_lora_rank is None:
                t.append(("attn_q.weight", sd[a + "q_proj.weight"]))
            else:
                t.append(("attn_q_a.weight", sd[a + "q_a_proj.weight"]))
                t.append(("attn_q_a_norm.weight", sd[a + "q_a_layernorm.weight"]))
                t.append(("attn_q_b.weight", sd[a + "q_b_proj.weight"]))
            t.append(("attn_kv_a_mqa.weight", sd[a + "kv_a_proj_with_mqa.weight"]))
            t.append(("attn_kv_a_norm.weight", sd[a + "kv_a_layernorm.weight"]))
            kv_b = sd[a + "kv_b_proj.weight"]  # (H*(nope+v), kv_lora)
            if mla:
                nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
                kv_b3 = kv_b.reshape(H, nope + v, kv_b.shape[-1])
                t.append(("attn_k_b.weight", np.ascontiguousarray(kv_b3[:, :nope, :].transpose(0, 2, 1))))
                t.append(("attn_v_b.weight", np.ascontiguousarray(kv_b3[:, nope:, :])))
            else:
                t.append(("attn_kv_b.weight", kv_b))
            t.append(("attn_output.weight", sd[a + "o_proj.weight"]))
        else:
            wq, wk = sd[a + "q_proj.weight"], sd[a + "k_proj.weight"]
            bq, bk = sd.get(a + "q_proj.bias"), sd.get(a + "k_proj.bias")
            if arch == "llama":
                wq, wk = permute_rows(wq, H), permute_rows(wk, cfg.num_key_value_heads)
                assert bq is None and bk is None
            t.append(("attn_q.weight", wq))
            t.append(("attn_k.weight", wk))
            t.append(("attn_v.weight", sd[a + "v_proj.weight"]))
            t.append(("attn_output.weight", sd[a + "o_proj.weight"]))
            if bq is not None:
                t.append(("attn_q.bias", bq))
                t.append(("attn_k.bias", bk))
                t.append(("attn_v.bias", sd[a + "v_proj.bias"]))
            if a + "q_norm.weight" in sd:
                t.append(("attn_q_norm.weight", sd[a + "q_norm.weight"]))
                t.append(("attn_k_norm.weight", sd[a + "k_norm.weight"]))
        m = p + "mlp."
        if m + "gate_proj.weight" in sd:  # dense FFN (dense models, DeepSeek's leading layers)
            t.append(("ffn_gate.weight", sd[m + "gate_proj.weight"]))
            t.append(("ffn_up.weight", sd[m + "up_proj.weight"]))
            t.append(("ffn_down.weight", sd[m + "down_proj.weight"]))
        else:
            t.append(("ffn_gate_inp.weight", sd[m + "gate.weight"]))
            gu = sd[m + "experts.gate_up_proj"]  # (E, 2*F, n_embd): gate rows then up rows
            f = gu.shape[1] // 2
            t.append(("ffn_gate_exps.weight", np.ascontiguousarray(gu[:, :f, :])))
            t.append(("ffn_up_exps.weight", np.ascontiguousarray(gu[:, f:, :])))
            t.append(("ffn_down_exps.weight", sd[m + "experts.down_proj"]))  # (E, n_embd, F)
            if m + "gate.e_score_correction_bias" in sd:
                t.append(("exp_probs_b.bias", sd[m + "gate.e_score_correction_bias"]))
            for hf, gg in (("shared_experts", "shexp"), ("shared_expert", "shexp")):
                if m + hf + ".gate_proj.weight" in sd:
                    t.append((f"ffn_gate_{gg}.weight", sd[m + hf + ".gate_proj.weight"]))
                    t.append((f"ffn_up_{gg}.weight", sd[m + hf + ".up_proj.weight"]))
                    t.append((f"ffn_down_{gg}.weight", sd[m + hf + ".down_proj.weight"]))
            if m + "shared_expert_gate.weight" in sd:
                t.append(("ffn_gate_inp_shexp.weight", sd[m + "shared_expert_gate.weight"]))  # (1, n_embd)
        out += [(b + n, w) for n, w in t]
    used = {k for k in sd if not k.endswith("inv_freq")}
    return out, used


def check_names(arch: str, names: list[str]) -> None:
    """Every tensor name must be one gguf-py declares for this architecture."""
    march = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    allowed = set()
    for t in gguf.MODEL_TENSORS[march]:
        fmt = gguf.TENSOR_NAMES[t]
        for i in range(8):
            allowed.add(fmt.format(bid=i))
    for n in names:
        base = n.rsplit(".", 1)[0]
        if base not in allowed:
            raise RuntimeError(f"{arch}: tensor {n} is not a gguf-py name for this arch")


def write_gguf(path: pathlib.Path, name: str, arch: str, cfg, tensors, vocab, mla: bool) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"moed-fixture-{name}")
    w.add_type("model")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if arch == "deepseek2":
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        if cfg.q_lora_rank is not None:
            w.add_q_lora_rank(cfg.q_lora_rank)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        if mla:
            # current convert_hf_to_gguf.py: MLA run as MQA over the latent
            w.add_head_count_kv(1)
            w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            w.add_value_length(cfg.kv_lora_rank)
            w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
            w.add_value_length_mla(cfg.v_head_dim)
        else:
            # the original (2024) deepseek2 layout: expanded per-head K/V sizes
            w.add_head_count_kv(cfg.num_key_value_heads)
            w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
            w.add_value_length(cfg.v_head_dim)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:  # convert writes the key only when true
            w.add_expert_weights_norm(True)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        sigmoid = cfg.model_type == "deepseek_v3"
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if arch in ("llama",):
            w.add_rope_dimension_count(head_dim)
        if arch == "qwen3moe":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if arch == "llama" and getattr(cfg, "num_local_experts", None):
            w.add_expert_count(cfg.num_local_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch in ("qwen2moe", "qwen3moe"):
            w.add_expert_count(cfg.num_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    tokens, types, merges = vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_add_bos_token(arch in ("llama", "deepseek2"))
    for tname, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- reference logits -----------------------------------------------------

def reference(model) -> dict:
    """Prompt logits (all positions, one forward), then N_DECODE greedy steps
    through the KV cache; cross-checked against one uncached forward over the
    whole sequence."""
    # transformers 5.x renamed past_key_values to cache (the old name warns)
    ckw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    ids = torch.tensor([PROMPT], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = cache_of(out)
        prompt_logits = out.logits[0].float().numpy().copy()
        nxt = int(prompt_logits[-1].argmax())
        dec_in, dec_arg, dec_logits = [], [], []
        for step in range(N_DECODE):
            pos = torch.tensor([[len(PROMPT) + step]], dtype=torch.long)
            out = model(input_ids=torch.tensor([[nxt]]), position_ids=pos, use_cache=True, **{ckw: cache})
            cache = cache_of(out)
            row = out.logits[0, -1].float().numpy().copy()
            dec_in.append(nxt)
            nxt = int(row.argmax())
            dec_arg.append(nxt)
            dec_logits.append(row)
        # One uncached forward over prompt + decode inputs: the cross-check,
        # and the per-layer residual stream and expert choices for debugging.
        routes: dict[int, tuple] = {}
        hooks = []
        for mname, mod in model.named_modules():
            if mname.endswith("mlp.gate") and mname.startswith("model.layers."):
                il = int(mname.split(".")[2])
                hooks.append(mod.register_forward_hook(
                    lambda _m, _i, o, il=il: routes.__setitem__(il, (o[1].numpy().copy(), o[2].numpy().copy()))))
        # decoder-layer outputs from hooks: HF's hidden_states tuple ends with
        # the final-norm output instead of the last layer's raw residual
        layer_out: dict[int, np.ndarray] = {}
        for il, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_hook(
                lambda _m, _i, o, il=il: layer_out.__setitem__(
                    il, (o[0] if isinstance(o, tuple) else o)[0].numpy().copy())))
        fo = model(input_ids=torch.tensor([PROMPT + dec_in]), use_cache=False)
        for h in hooks:
            h.remove()
        full = fo.logits[0].numpy()
        hidden = np.stack([layer_out[i] for i in range(len(layer_out))]).astype(np.float32)
    logits = np.concatenate([prompt_logits, np.stack(dec_logits)], axis=0).astype(np.float32)
    err = np.abs(full - logits).max() / np.abs(logits).max()
    if err > 1e-5:
        raise RuntimeError(f"cached decode disagrees with the full forward: rel err {err:.2e}")
    srt = np.sort(logits, axis=1)
    margins = (srt[:, -1] - srt[:, -2]).tolist()
    routing = {}
    for il, (w, idx) in sorted(routes.items()):
        order = np.argsort(-w, axis=1, kind="stable")
        routing[str(il)] = {"experts": np.take_along_axis(idx, order, 1).tolist(),
                            "weights": np.round(np.take_along_axis(w, order, 1).astype(np.float64), 6).tolist()}
    return dict(logits=logits, hidden=hidden, routing=routing, decode_input=dec_in, decode_argmax=dec_arg,
                prompt_argmax=[int(x) for x in prompt_logits.argmax(axis=1)],
                top1_margin=margins, cache_vs_full_rel_err=float(err))


def write_ref(out: pathlib.Path, name: str, ggufs: list[str], ref: dict, cfg_dict: dict, seed: int) -> None:
    logits = ref["logits"]
    (out / f"{name}.logits.f32").write_bytes(logits.astype("<f4").tobytes())
    (out / f"{name}.hidden.f32").write_bytes(ref["hidden"].astype("<f4").tobytes())
    n_rows, n_vocab = logits.shape
    lines = [
        "# moed reference logits v1: see README.md. Rows of n_vocab little-endian f32;",
        "# rows 0..n_prompt-1 = prompt positions, then one row per decode step.",
        f"gguf {' '.join(ggufs)}",
        f"logits {name}.logits.f32",
        f"n_vocab {n_vocab}",
        f"n_prompt {len(PROMPT)}",
        "prompt " + " ".join(map(str, PROMPT)),
        f"n_decode {N_DECODE}",
        "decode_input " + " ".join(map(str, ref["decode_input"])),
        "decode_argmax " + " ".join(map(str, ref["decode_argmax"])),
        f"n_rows {n_rows}",
        f"hidden {name}.hidden.f32",
        f"n_layer {ref['hidden'].shape[0]}",
        f"n_embd {ref['hidden'].shape[2]}",
    ]
    (out / f"{name}.ref.txt").write_text("\n".join(lines) + "\n")
    meta = {
        "name": name, "seed": seed, "gguf": ggufs, "logits_file": f"{name}.logits.f32",
        "logits_dtype": "float32-le", "logits_shape": [n_rows, n_vocab],
        "prompt": PROMPT, "n_decode": N_DECODE,
        "decode_input": ref["decode_input"], "decode_argmax": ref["decode_argmax"],
        "prompt_argmax": ref["prompt_argmax"], "top1_margin": ref["top1_margin"],
        "cache_vs_full_rel_err": ref["cache_vs_full_rel_err"],
        "hidden_file": f"{name}.hidden.f32", "hidden_shape": list(ref["hidden"].shape),
        "routing": ref["routing"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": getattr(gguf, "__version__", None) or _gguf_version()},
        "hf_config": cfg_dict,
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


# The greedy chain must survive small numeric differences (moed's F16/Q8_0
# runs are compared against the same chain), so a seed is accepted only when
# every row that picks a decode token has a clear winner, and the chain is not
# one token repeated.
MIN_CHAIN_MARGIN = 0.1


def build(model_type: str, kw: dict, seed: int):
    for attempt in range(50):
        s = seed + 1000 * attempt
        cfg = transformers.AutoConfig.for_model(model_type, **kw)
        torch.manual_seed(s)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                 experts_implementation="eager",
                                                 dtype=torch.float32)
        model.eval()
        randomize(model, s)
        ref = reference(model)
        chain = ref["top1_margin"][len(PROMPT) - 1:]
        if min(chain) >= MIN_CHAIN_MARGIN and len(set(ref["decode_input"])) >= 3:
            return model, ref, s
    raise RuntimeError(f"{model_type}: no seed gave a clear greedy chain")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # bit-stable regeneration
    vocab = build_vocab()
    for name, (model_type, arch, seed, kw) in MODELS.items():
        if only and name not in only:
            continue
        model, ref, used_seed = build(model_type, kw, seed)
        cfg = model.config
        assert cfg._attn_implementation == "eager"
        sd = state(model)
        ggufs = []
        for mla in ([False, True] if name in MLA_TOO else [False]):
            tensors, used = tensors_for(name, arch, cfg, sd, mla)
            check_names(arch, [n for n, _ in tensors])
            if not mla:
                # every weight of the HF model must reach the GGUF, once
                missing = _missing(sd, used, tensors)
                if missing:
                    raise RuntimeError(f"{name}: HF weights not written: {sorted(missing)}")
            fname = f"{name}{'-mla' if mla else ''}.gguf"
            write_gguf(args.out / fname, name, arch, cfg, tensors, vocab, mla)
            ggufs.append(fname)
        cfg_dict = {k: v for k, v in cfg.to_dict().items()
                    if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
        write_ref(args.out, name, ggufs, ref, cfg_dict, used_seed)
        m = ref["top1_margin"]
        print(f"{name:14s} seed {used_seed:5d} {arch:9s} {sum((args.out / g).stat().st_size for g in ggufs) / 1024:7.1f} KiB "
              f"decode {ref['decode_input']} -> {ref['decode_argmax'][-1]}  "
              f"chain margin {min(m[len(PROMPT) - 1:]):.3f}  cache/full {ref['cache_vs_full_rel_err']:.1e}")
    return 0


def _missing(sd: dict[str, np.ndarray], used: set[str], tensors) -> set[str]:
    """HF tensors whose values appear in no GGUF tensor (by sum of squares, a
    cheap fingerprint: a wrong mapping or a forgotten tensor is a miss)."""
    have = {}
    for _, a in tensors:
        have.setdefault(round(float(np.square(a.astype(np.float64)).sum()), 6), 0)
    missing = set()
    for k in used:
        v = sd[k]
        if k.endswith("gate_up_proj"):
            continue  # split in two; its halves are checked through the model's outputs
        if round(float(np.square(v.astype(np.float64)).sum()), 6) not in have:
            missing.add(k)
    return missing


if __name__ == "__main__":
    sys.exit(main())
