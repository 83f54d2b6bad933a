"""The transformers reference fixtures in tests/fixtures/models/ are sound.

Three things are checked for every fixture, with numpy and gguf-py only (no
torch): the files parse and agree with each other (the GGUF with gguf-py, the
logits file has the shape the .ref.txt sidecar gives, the greedy decode chain
is consistent with the logits); every GGUF uses llama.cpp's names for its
architecture; and an independent numpy forward pass, written from
tests/fixtures/models/README.md and reading nothing but the GGUF, reproduces
transformers' logits. The last one is what makes the fixtures trustworthy: a
conversion slip in tests/gen_reference_fixtures.py (a missing q/k
permutation, a wrong expert split, a YaRN key) or a wrong sentence in the
README fails here rather than in the C engine's tests.
"""
import json
import math
import pathlib

import gguf
import numpy as np
import pytest


FIXDIR = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "models"
REFS = sorted(p.name[: -len(".ref.txt")] for p in FIXDIR.glob("*.ref.txt"))
EXPECTED = {"llama", "qwen2", "mixtral", "qwen2moe", "qwen3moe", "deepseek2", "deepseek2lite", "deepseek3"}
ARCH = {"llama": "llama", "qwen2": "qwen2", "mixtral": "llama", "qwen2moe": "qwen2moe",
        "qwen3moe": "qwen3moe", "deepseek2": "deepseek2", "deepseek2lite": "deepseek2",
        "deepseek3": "deepseek2"}
# numpy (float64) against transformers (float32): measured ~1e-6; the C
# engine's own F32 bound is 1e-3, so 1e-4 here leaves no room for a real bug.
REL_TOL = 1e-4


def read_ref(name):
    ref = {}
    for line in (FIXDIR / f"{name}.ref.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.partition(" ")
        vals = rest.split()
        ref[key] = vals
    out = {
        "gguf": ref["gguf"], "logits": ref["logits"][0],
        "n_vocab": int(ref["n_vocab"][0]), "n_prompt": int(ref["n_prompt"][0]),
        "prompt": [int(x) for x in ref["prompt"]], "n_decode": int(ref["n_decode"][0]),
        "decode_input": [int(x) for x in ref["decode_input"]],
        "decode_argmax": [int(x) for x in ref["decode_argmax"]], "n_rows": int(ref["n_rows"][0]),
        "hidden": ref["hidden"][0], "n_layer": int(ref["n_layer"][0]), "n_embd": int(ref["n_embd"][0]),
    }
    raw = np.fromfile(FIXDIR / out["logits"], dtype="<f4")
    out["rows"] = raw
    return out


def all_ggufs():
    return [(n, g) for n in REFS for g in read_ref(n)["gguf"]]


def test_all_families_present():
    assert set(REFS) == EXPECTED


def test_total_size_small():
    total = sum(p.stat().st_size for p in FIXDIR.iterdir() if p.is_file())
    assert total < 8 * 1024 * 1024, f"fixtures grew to {total} bytes"


@pytest.mark.parametrize("name", REFS)
def test_sidecars_agree(name):
    ref = read_ref(name)
    meta = json.loads((FIXDIR / f"{name}.json").read_text())
    n_rows = ref["n_prompt"] + ref["n_decode"]
    assert ref["n_rows"] == n_rows
    assert ref["rows"].size == n_rows * ref["n_vocab"], "logits file has the wrong size"
    hidden = np.fromfile(FIXDIR / ref["hidden"], dtype="<f4")
    assert meta["hidden_shape"] == [ref["n_layer"], n_rows, ref["n_embd"]]
    assert hidden.size == ref["n_layer"] * n_rows * ref["n_embd"], "hidden file has the wrong size"
    assert meta["logits_shape"] == [n_rows, ref["n_vocab"]]
    assert meta["prompt"] == ref["prompt"] and len(ref["prompt"]) == ref["n_prompt"]
    assert meta["decode_input"] == ref["decode_input"] and meta["decode_argmax"] == ref["decode_argmax"]
    assert meta["gguf"] == ref["gguf"]
    logits = ref["rows"].reshape(n_rows, ref["n_vocab"])
    assert np.isfinite(logits).all()
    # greedy chain: each decode input is the argmax of the row before it
    am = logits.argmax(axis=1)
    assert ref["decode_input"][0] == am[ref["n_prompt"] - 1]
    for i in range(ref["n_decode"]):
        assert ref["decode_argmax"][i] == am[ref["n_prompt"] + i]
        if i + 1 < ref["n_decode"]:
            assert ref["decode_input"][i + 1] == ref["decode_argmax"][i]
    # logits are spread, not saturated or flat
    std = logits.std(axis=1)
    assert (std > 0.5).all() and (std < 20).all(), std


def load(path):
    r = gguf.GGUFReader(str(path))
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        kv[k] = f.contents()
    t = {}
    for ti in r.tensors:
        assert ti.tensor_type == gguf.GGMLQuantizationType.F32, ti.name
        t[ti.name] = np.asarray(ti.data, dtype=np.float64).reshape([int(x) for x in reversed(ti.shape)])
    return kv, t


@pytest.mark.parametrize("name,fname", all_ggufs())
def test_gguf_llama_cpp_names(name, fname):
    kv, t = load(FIXDIR / fname)
    arch = kv["general.architecture"]
    assert arch == ARCH[name]
    march = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    allowed = {gguf.TENSOR_NAMES[x].format(bid=i) for x in gguf.MODEL_TENSORS[march] for i in range(8)}
    for n in t:
        assert n.rsplit(".", 1)[0] in allowed, n
    ref = read_ref(name)
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert len(kv["tokenizer.ggml.tokens"]) == ref["n_vocab"] == kv[f"{arch}.vocab_size"]
    assert len(kv["tokenizer.ggml.token_type"]) == ref["n_vocab"]
    toks = kv["tokenizer.ggml.tokens"]
    for m in kv["tokenizer.ggml.merges"]:  # every merge result is a token
        a, b = m.split(" ")
        assert a + b in toks, m
    n_layer = kv[f"{arch}.block_count"]
    for i in range(n_layer):
        assert f"blk.{i}.attn_norm.weight" in t and f"blk.{i}.ffn_norm.weight" in t
    assert t["token_embd.weight"].shape == (ref["n_vocab"], kv[f"{arch}.embedding_length"])
    assert t["output.weight"].shape == t["token_embd.weight"].shape


# --- the numpy forward pass, written from README.md ------------------------

def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rope(x, pos, inv_freq, style):
    """x (T, H, d); pairs (2i, 2i+1) for "norm", (i, i+d/2) for "neox"."""
    ang = pos[:, None] * inv_freq[None, :]  # (T, d/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if style == "norm":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def yarn_inv_freq(dim, base, factor, orig_ctx, beta_fast, beta_slow):
    extra = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    inter = extra / factor

    def corr(nrot):
        return dim * math.log(orig_ctx / (nrot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return inter * ramp + extra * (1 - ramp)


def attend(q, k, v, scale):
    """q (T,H,dk) k (T,H,dk) v (T,H,dv), causal."""
    T = q.shape[0]
    s = np.einsum("thd,uhd->htu", q, k) * scale
    s = s + np.triu(np.full((T, T), -np.inf), 1)[None]
    p = softmax(s)
    return np.einsum("htu,uhd->thd", p, v).reshape(T, -1)


def ffn(h, gate, up, down):
    return (silu(h @ gate.T) * (h @ up.T)) @ down.T


def moe(h, t, kv, arch, b, trace=None):
    E = kv[f"{arch}.expert_count"]
    k = kv[f"{arch}.expert_used_count"]
    logits = h @ t[b + "ffn_gate_inp.weight"].T  # (T, E)
    gating = kv.get(f"{arch}.expert_gating_func", 1)
    scores = softmax(logits) if gating == 1 else 1.0 / (1.0 + np.exp(-logits))
    choice = scores + t[b + "exp_probs_b.bias"] if b + "exp_probs_b.bias" in t else scores.copy()
    n_group = kv.get(f"{arch}.expert_group_count", 1)
    if n_group > 1:
        g = choice.reshape(len(h), n_group, E // n_group)
        if b + "exp_probs_b.bias" in t:  # V3: sum of the top-2 in each group
            gs = np.sort(g, axis=-1)[..., -2:].sum(-1)
        else:  # V2 group_limited_greedy: the best in each group
            gs = g.max(-1)
        keep = np.argsort(-gs, axis=-1)[:, : kv[f"{arch}.expert_group_used_count"]]
        mask = np.full(gs.shape, True)
        np.put_along_axis(mask, keep, False, axis=-1)
        choice = np.where(np.repeat(mask, E // n_group, axis=-1), -np.inf, choice)
    idx = np.argsort(-choice, axis=-1)[:, :k]
    w = np.take_along_axis(scores, idx, axis=-1)
    if trace is not None:
        trace["experts"].append(idx)
    norm = {"llama": True, "qwen3moe": True, "qwen2moe": False}.get(arch)
    if norm is None:
        norm = bool(kv.get(f"{arch}.expert_weights_norm", False))
    if norm:
        w = w / w.sum(-1, keepdims=True)
    w = w * kv.get(f"{arch}.expert_weights_scale", 1.0)
    gate, up, down = (t[b + f"ffn_{x}_exps.weight"] for x in ("gate", "up", "down"))
    out = np.zeros_like(h)
    for ti in range(len(h)):
        for j in range(k):
            e = idx[ti, j]
            out[ti] += w[ti, j] * ffn(h[ti:ti + 1], gate[e], up[e], down[e])[0]
    if b + "ffn_gate_shexp.weight" in t:
        sh = ffn(h, t[b + "ffn_gate_shexp.weight"], t[b + "ffn_up_shexp.weight"], t[b + "ffn_down_shexp.weight"])
        if b + "ffn_gate_inp_shexp.weight" in t:  # Qwen2-MoE: sigmoid-gated shared expert
            sh = sh * (1.0 / (1.0 + np.exp(-(h @ t[b + "ffn_gate_inp_shexp.weight"].T))))
        out += sh
    return out


def forward(kv, t, tokens, trace=None):
    """Logits (T, n_vocab) for tokens at positions 0..T-1, causal. If trace is
    a dict, the residual stream after each layer is appended to
    trace["hidden"] and each MoE layer's chosen experts to trace["experts"]."""
    arch = kv["general.architecture"]
    A = lambda key, d=None: kv.get(f"{arch}.{key}", d)  # noqa: E731
    eps = A("attention.layer_norm_rms_epsilon")
    H = A("attention.head_count")
    Hkv = A("attention.head_count_kv")
    n_embd = A("embedding_length")
    base = A("rope.freq_base")
    pos = np.arange(len(tokens), dtype=np.float64)
    x = t["token_embd.weight"][tokens]
    for il in range(A("block_count")):
        b = f"blk.{il}."
        h = rms(x, t[b + "attn_norm.weight"], eps)
        T = len(tokens)
        if arch == "deepseek2":
            n_rot = A("rope.dimension_count")
            kv_lora = A("attention.kv_lora_rank")
            if A("attention.key_length_mla") is not None:
                dk, dv = A("attention.key_length_mla"), A("attention.value_length_mla")
            else:
                dk, dv = A("attention.key_length"), A("attention.value_length")
            nope = dk - n_rot
            if b + "attn_q.weight" in t:
                q = h @ t[b + "attn_q.weight"].T
            else:
                q = rms(h @ t[b + "attn_q_a.weight"].T, t[b + "attn_q_a_norm.weight"], eps) @ t[b + "attn_q_b.weight"].T
            q = q.reshape(T, H, dk)
            kva = h @ t[b + "attn_kv_a_mqa.weight"].T
            c = rms(kva[:, :kv_lora], t[b + "attn_kv_a_norm.weight"], eps)  # the cached latent
            factor = A("rope.scaling.factor", 1.0)
            inv = yarn_inv_freq(n_rot, base, factor, A("rope.scaling.original_context_length"),
                                A("rope.scaling.yarn_beta_fast", 32.0), A("rope.scaling.yarn_beta_slow", 1.0))
            k_pe = rope(kva[:, None, kv_lora:], pos, inv, "norm")  # (T, 1, n_rot), shared by all heads
            q_pe = rope(q[..., nope:], pos, inv, "norm")
            if b + "attn_kv_b.weight" in t:
                kvb = (c @ t[b + "attn_kv_b.weight"].T).reshape(T, H, nope + dv)
                k_nope, v = kvb[..., :nope], kvb[..., nope:]
            else:
                k_nope = np.einsum("tc,hcn->thn", c, t[b + "attn_k_b.weight"])
                v = np.einsum("tc,hvc->thv", c, t[b + "attn_v_b.weight"])
            mscale = 1.0 + A("rope.scaling.yarn_log_multiplier", 0.0) * math.log(factor) if factor > 1 else 1.0
            qq = np.concatenate([q[..., :nope], q_pe], -1)
            kk = np.concatenate([k_nope, np.repeat(k_pe, H, axis=1)], -1)
            att = attend(qq, kk, v, mscale * mscale / math.sqrt(dk))
        else:
            d = A("attention.key_length") or n_embd // H
            q = h @ t[b + "attn_q.weight"].T
            k = h @ t[b + "attn_k.weight"].T
            v = h @ t[b + "attn_v.weight"].T
            if b + "attn_q.bias" in t:
                q, k, v = q + t[b + "attn_q.bias"], k + t[b + "attn_k.bias"], v + t[b + "attn_v.bias"]
            q, k, v = q.reshape(T, H, d), k.reshape(T, Hkv, d), v.reshape(T, Hkv, d)
            if b + "attn_q_norm.weight" in t:
                q, k = rms(q, t[b + "attn_q_norm.weight"], eps), rms(k, t[b + "attn_k_norm.weight"], eps)
            inv = 1.0 / base ** (np.arange(0, d, 2) / d)
            style = "norm" if arch == "llama" else "neox"
            q, k = rope(q, pos, inv, style), rope(k, pos, inv, style)
            rep = H // Hkv
            att = attend(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1), 1.0 / math.sqrt(d))
        x = x + att @ t[b + "attn_output.weight"].T
        h = rms(x, t[b + "ffn_norm.weight"], eps)
        if b + "ffn_gate.weight" in t:
            x = x + ffn(h, t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"], t[b + "ffn_down.weight"])
        else:
            x = x + moe(h, t, kv, arch, b, trace)
        if trace is not None:
            trace["hidden"].append(x.copy())
    return rms(x, t["output_norm.weight"], eps) @ t["output.weight"].T


@pytest.mark.parametrize("name,fname", all_ggufs())
def test_numpy_forward_reproduces_transformers(name, fname):
    ref = read_ref(name)
    kv, t = load(FIXDIR / fname)
    tokens = ref["prompt"] + ref["decode_input"]
    want = ref["rows"].reshape(ref["n_rows"], ref["n_vocab"]).astype(np.float64)
    trace = {"hidden": [], "experts": []}
    got = forward(kv, t, tokens, trace)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= REL_TOL, f"{fname}: max rel err {err:.3e}"
    # the debugging aids agree too: residual stream per layer, expert choices
    meta = json.loads((FIXDIR / f"{name}.json").read_text())
    hidden = np.fromfile(FIXDIR / meta["hidden_file"], dtype="<f4").reshape(meta["hidden_shape"])
    assert len(trace["hidden"]) == hidden.shape[0] == kv[kv["general.architecture"] + ".block_count"]
    for il, (h_got, h_want) in enumerate(zip(trace["hidden"], hidden)):
        e = np.abs(h_got - h_want).max() / np.abs(h_want).max()
        assert e <= REL_TOL, f"{fname}: layer {il} residual rel err {e:.3e}"
    moe_layers = sorted(int(k) for k in meta["routing"])
    assert len(moe_layers) == len(trace["experts"])
    for il, idx in zip(moe_layers, trace["experts"]):
        want_sets = [sorted(r) for r in meta["routing"][str(il)]["experts"]]
        assert [sorted(r) for r in idx.tolist()] == want_sets, f"{fname}: layer {il} expert choice"


# Each detail that is easy to get wrong must actually move these fixtures'
# logits; otherwise an engine could get it wrong and still pass. Each case
# changes one thing in the numpy model and expects a clear miss (> 1 %).
TRAPS = [
    ("deepseek2", "group-limited top-k ignored", {"deepseek2.expert_group_count": 1}, None),
    ("deepseek2", "routed_scaling_factor ignored", {"deepseek2.expert_weights_scale": 1.0}, None),
    ("deepseek2", "top-k weights normalised (V2 must not)", {"deepseek2.expert_weights_norm": True}, None),
    ("deepseek2", "YaRN mscale^2 on the softmax scale ignored", {"deepseek2.rope.scaling.yarn_log_multiplier": 0.0}, None),
    ("deepseek2", "YaRN frequency ramp ignored", {"deepseek2.rope.scaling.original_context_length": 10**9}, None),
    ("deepseek2lite", "YaRN mscale^2 ignored (no q LoRA)", {"deepseek2.rope.scaling.yarn_log_multiplier": 0.0}, None),
    ("deepseek3", "group-limited top-k ignored", {"deepseek2.expert_group_count": 1}, None),
    ("deepseek3", "e_score_correction_bias ignored", None, "exp_probs_b"),
    ("deepseek3", "top-k weights not normalised", {"deepseek2.expert_weights_norm": False}, None),
    ("deepseek3", "routed_scaling_factor ignored", {"deepseek2.expert_weights_scale": 1.0}, None),
    ("qwen2moe", "shared-expert sigmoid gate ignored", None, "ffn_gate_inp_shexp"),
    ("qwen3moe", "q/k norm ignored", None, "attn_q_norm"),
]


@pytest.mark.parametrize("name,what,kv_change,drop", TRAPS, ids=[f"{t[0]}: {t[1]}" for t in TRAPS])
def test_fixture_exercises(name, what, kv_change, drop):
    ref = read_ref(name)
    kv, t = load(FIXDIR / f"{name}.gguf")
    kv.update(kv_change or {})
    for n in [n for n in t if drop and drop in n]:
        del t[n]
    want = ref["rows"].reshape(ref["n_rows"], ref["n_vocab"])
    got = forward(kv, t, ref["prompt"] + ref["decode_input"])
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err > 1e-2, f"{name}: '{what}' changes the logits by only {err:.1e}"
