/* forward.c - the decoder forward pass, written once against backend.h.
 *
 * Everything a model file says (hyper-parameters, which tensors exist,
 * rope scaling, the architecture) is read by model.c; this file turns the
 * weight views into backend weights and runs the blocks. moe_fwd_run
 * reads as the reference pass does: embed, per layer attention (GQA or
 * MLA) and FFN (MoE or dense) around two residual adds, then the output
 * head. Profiling and traffic counting wrap the backend (opstats.c), so
 * the pass itself only calls ops.
 */
#include "forward.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "array.h"
#include "opstats.h"
#include "qblocks.h"
#include "quant.h"

typedef struct fwd_layer {
    bool is_moe;
    moe_weight attn_norm, ffn_norm;
    /* GQA */
    moe_weight wq, wk, wv, bq, bk, bv, q_norm, k_norm;
    /* MLA (wq is used when there is no q LoRA) */
    moe_weight q_a, q_a_norm, q_b, kv_a, kv_a_norm, k_b, v_b;
    moe_weight wo;
    /* dense FFN */
    moe_weight ffn_gate, ffn_up, ffn_down;
    /* MoE */
    moe_weight gate_inp, gate_exps, up_exps, down_exps, exp_probs_b;
    moe_weight gate_sh, up_sh, down_sh, gate_inp_sh;
    void *k_b_owned; /* backend buffers derived from attn_kv_b, or NULL */
    void *v_b_owned;
} fwd_layer;

/* Per-step scratch, kept across steps and grown only when a step has more
 * tokens (or sequences, or block-table entries) than any before, so a
 * steady-state decode step allocates nothing. */
typedef struct fwd_bufs {
    float *x;    /* (n_tok, n_embd) residual stream */
    float *h;    /* (n_tok, n_embd) normed */
    float *q;    /* (n_tok, H * dk) */
    float *k;    /* (n_tok, k_width) */
    float *v;    /* (n_tok, Hkv * dv) */
    float *att;  /* (n_tok, H * dv) */
    float *o;    /* (n_tok, n_embd) block output */
    float *ga;   /* (n_tok, wide) */
    float *up;   /* (n_tok, wide) */
    float *sh;   /* (n_tok, n_embd) */
    float *gl;   /* (n_tok) */
} fwd_bufs;

struct moe_fwd {
    const moe_model *model;
    const moe_hparams *hp;
    moe_backend be;    /* as given */
    moe_backend sbe;   /* be wrapped by st, used when profiling or counting */
    moe_opstats *st;
    bool prof, count_traffic;
    float *inv_freq;   /* host (n_rot / 2) */
    moe_weight tok_embd, out_norm, output;
    fwd_layer *layers; /* (n_layer) */
    const void **bound; /* every bind_weight result, for unbinding */
    int64_t n_bound, cap_bound;
    int64_t weight_bytes; /* moe_fwd_weight_bytes */
    int64_t wide;         /* widest FFN, router or q-LoRA row */
    float *hidden_out;
    int32_t *route_out;
    void (*layer_cb)(void *arg); /* moe_fwd_set_layer_cb */
    void *layer_arg;
    moe_fwd_traffic last;
    fwd_bufs B;
    int64_t cap;        /* tokens B holds */
    float *lg;          /* (lg_cap, n_vocab) logits */
    int64_t lg_cap;
    /* host per-step index arrays */
    int32_t *rows;      /* (cap) rows whose logits are wanted */
    int32_t *bt;        /* (bt_cap) flattened block tables */
    int64_t bt_cap;
    int64_t *boff;      /* (boff_cap) */
    int64_t boff_cap;
};

/* What one step's blocks share. */
typedef struct fwd_step {
    const struct moe_backend_ops *op;
    void *c;
    moe_kv_cache *cache;
    const moe_kv_view *kv;
    const int32_t *pos;
    int64_t n; /* tokens */
} fwd_step;

static int remember(moe_fwd *fw, const void *p) {
    MOE_TRY(moe_array_grow((void **)&fw->bound, &fw->cap_bound, fw->n_bound + 1, 64, sizeof(*fw->bound)));
    fw->bound[fw->n_bound++] = p;
    return MOE_OK;
}

static bool has(const moe_weight *w) { return w->data != NULL; }

/* Bytes of w's data (0 when absent). */
static int64_t wbytes(const moe_weight *w) {
    if (!has(w)) return 0;
    size_t ms = w->mat_stride ? w->mat_stride : (size_t)w->n_out * moe_row_size(w->type, w->n_in);
    return (int64_t)ms * (w->n_mat > 0 ? w->n_mat : 1);
}

/* Binds the view (shape and type checked by model.c) on the backend into
 * *w; an absent view leaves *w zeroed. Matrices must be a type the
 * backend computes with (MOE_EUNSUPPORTED naming the tensor). */
static int bind_view(moe_fwd *fw, const moe_tensor_view *v, moe_weight *w, char *err, size_t errsz) {
    memset(w, 0, sizeof(*w));
    if (!v->data) return MOE_OK;
    if (v->n_dims > 1 && !fw->be.ops->supports_type(fw->be.ctx, v->type)) {
        return moe_seterr(err, errsz, MOE_EUNSUPPORTED, "tensor '%s': the %s backend cannot compute with type %s", v->name, fw->be.ops->name,
                          moe_type_name(v->type));
    }
    const void *p = NULL;
    int rc = fw->be.ops->bind_weight(fw->be.ctx, v->data, (size_t)v->nbytes, &p);
    if (!rc && (rc = remember(fw, p))) fw->be.ops->unbind_weight(fw->be.ctx, p);
    if (rc) {
        return moe_seterr(err, errsz, rc, "tensor '%s': binding on the %s backend: %s", v->name, fw->be.ops->name, moe_strerror(rc));
    }
    *w = (moe_weight){.type = v->type, .data = p, .n_in = v->ne[0], .n_out = v->ne[1], .n_mat = v->ne[2]};
    return MOE_OK;
}

/* DeepSeek's original layout stores attn_kv_b (H*(nope+dv), kv_lora): MLA on
 * the latent cache wants per head k_b[h] (kv_lora rows of nope) = the
 * transpose of the k_nope block and v_b[h] = the V block, so derive both
 * once at load (what current convert_hf_to_gguf writes as attn_k_b/v_b). */
static int derive_kv_b(moe_fwd *fw, fwd_layer *L, const moe_tensor_view *t) {
    const moe_hparams *hp = fw->hp;
    int64_t H = hp->n_head, nope = hp->n_embd_head_qk_nope, dv = hp->n_embd_head_v, r = hp->kv_lora_rank;
    size_t rs = moe_row_size(t->type, r);
    float *row = malloc((size_t)r * sizeof(float));
    float *kb = malloc((size_t)H * (size_t)r * (size_t)nope * sizeof(float));
    int rc = (row && kb) ? MOE_OK : MOE_ENOMEM;
    for (int64_t h = 0; h < H && !rc; h++)
        for (int64_t n = 0; n < nope && !rc; n++) {
            rc = moe_dequantize_row(t->type, (const char *)t->data + (size_t)(h * (nope + dv) + n) * rs, row, r);
            for (int64_t c = 0; c < r && !rc; c++) kb[(h * r + c) * nope + n] = row[c];
        }
    /* Keep the file's precision class: exact transposition for F32/F16/BF16;
     * quantized kv_b is re-quantized to Q8_0 (a full-precision F32 copy would
     * be read every step and cost ~4x the bytes of the original). */
    int kt = MOE_TYPE_F32;
    if (t->type == MOE_TYPE_F16 || t->type == MOE_TYPE_BF16) kt = t->type;
    else if (t->type != MOE_TYPE_F32 && nope % moe_type_get(MOE_TYPE_Q8_0)->blck == 0) kt = MOE_TYPE_Q8_0;
    size_t krs = moe_row_size(kt, nope);
    size_t nb = (size_t)H * (size_t)r * krs;
    char *kq = rc ? NULL : malloc(nb);
    if (!rc && !kq) rc = MOE_ENOMEM;
    for (int64_t i = 0; i < H * r && !rc; i++) rc = moe_quantize_row(kt, kb + i * nope, kq + (size_t)i * krs, nope);
    /* V blocks copied packed (exact bytes), so both per-head stacks go
     * through one expert-batched product per step instead of one per head */
    size_t vnb = (size_t)H * (size_t)dv * rs;
    char *vq = rc ? NULL : malloc(vnb);
    if (!rc && !vq) rc = MOE_ENOMEM;
    for (int64_t h = 0; h < H && !rc; h++)
        memcpy(vq + (size_t)h * dv * rs, (const char *)t->data + (size_t)(h * (nope + dv) + nope) * rs, (size_t)dv * rs);
    if (!rc) {
        L->k_b_owned = fw->be.ops->alloc(fw->be.ctx, nb);
        L->v_b_owned = fw->be.ops->alloc(fw->be.ctx, vnb);
        if (!L->k_b_owned || !L->v_b_owned) rc = MOE_ENOMEM;
        if (!rc) rc = fw->be.ops->upload(fw->be.ctx, L->k_b_owned, kq, nb);
        if (!rc) rc = fw->be.ops->upload(fw->be.ctx, L->v_b_owned, vq, vnb);
    }
    free(kq);
    free(vq);
    if (!rc) {
        L->k_b = (moe_weight){.type = kt, .data = L->k_b_owned, .n_in = nope, .n_out = r, .n_mat = H};
        L->v_b = (moe_weight){.type = t->type, .data = L->v_b_owned, .n_in = r, .n_out = dv, .n_mat = H};
    }
    free(row);
    free(kb);
    return rc;
}

static void free_bufs(moe_fwd *fw) {
    float **all[] = {&fw->B.x, &fw->B.h, &fw->B.q, &fw->B.k, &fw->B.v, &fw->B.att, &fw->B.o,
                     &fw->B.ga, &fw->B.up, &fw->B.sh, &fw->B.gl, &fw->lg};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (*all[i]) fw->be.ops->free(fw->be.ctx, *all[i]);
        *all[i] = NULL;
    }
    free(fw->rows);
    fw->rows = NULL;
    fw->cap = fw->lg_cap = 0;
}

void moe_fwd_free(moe_fwd *fw) {
    if (!fw) return;
    if (fw->prof) moe_opstats_log_profile(fw->st);
    moe_opstats_free(fw->st);
    free_bufs(fw);
    for (int64_t i = 0; i < fw->n_bound; i++) fw->be.ops->unbind_weight(fw->be.ctx, fw->bound[i]);
    for (int64_t il = 0; fw->layers && il < fw->hp->n_layer; il++) {
        if (fw->layers[il].k_b_owned) fw->be.ops->free(fw->be.ctx, fw->layers[il].k_b_owned);
        if (fw->layers[il].v_b_owned) fw->be.ops->free(fw->be.ctx, fw->layers[il].v_b_owned);
    }
    free(fw->bound);
    free(fw->bt);
    free(fw->boff);
    free(fw->layers);
    free(fw->inv_freq);
    free(fw);
}

/* Binds one layer's views. The table pairs each view of model.h with its
 * backend weight; which of them exist is model.c's business. */
static int bind_layer(moe_fwd *fw, const moe_layer_weights *lw, fwd_layer *L, char *err, size_t errsz) {
    const struct {
        const moe_tensor_view *v;
        moe_weight *w;
    } map[] = {
        {&lw->attn_norm, &L->attn_norm}, {&lw->ffn_norm, &L->ffn_norm},     {&lw->wq, &L->wq},
        {&lw->wk, &L->wk},               {&lw->wv, &L->wv},                 {&lw->bq, &L->bq},
        {&lw->bk, &L->bk},               {&lw->bv, &L->bv},                 {&lw->q_norm, &L->q_norm},
        {&lw->k_norm, &L->k_norm},       {&lw->q_a, &L->q_a},               {&lw->q_a_norm, &L->q_a_norm},
        {&lw->q_b, &L->q_b},             {&lw->kv_a_mqa, &L->kv_a},         {&lw->kv_a_norm, &L->kv_a_norm},
        {&lw->k_b, &L->k_b},             {&lw->v_b, &L->v_b},               {&lw->wo, &L->wo},
        {&lw->ffn_gate, &L->ffn_gate},   {&lw->ffn_up, &L->ffn_up},         {&lw->ffn_down, &L->ffn_down},
        {&lw->gate_inp, &L->gate_inp},   {&lw->gate_exps, &L->gate_exps},   {&lw->up_exps, &L->up_exps},
        {&lw->down_exps, &L->down_exps}, {&lw->exp_probs_b, &L->exp_probs_b}, {&lw->gate_shexp, &L->gate_sh},
        {&lw->up_shexp, &L->up_sh},      {&lw->down_shexp, &L->down_sh},    {&lw->gate_inp_shexp, &L->gate_inp_sh},
    };
    L->is_moe = lw->is_moe;
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        int rc = bind_view(fw, map[i].v, map[i].w, err, errsz);
        if (rc) return rc;
        fw->weight_bytes += wbytes(map[i].w);
    }
    if (lw->kv_b.data) { /* the original DeepSeek layout: read at load only, never bound */
        int rc = derive_kv_b(fw, L, &lw->kv_b);
        if (rc) {
            return moe_seterr(err, errsz, rc, "tensor '%s': deriving k_b/v_b: %s", lw->kv_b.name, moe_strerror(rc));
        }
        fw->weight_bytes += wbytes(&L->k_b) + wbytes(&L->v_b);
    }
    int64_t w[] = {L->ffn_gate.n_out, L->gate_exps.n_out, L->gate_sh.n_out, L->q_a.n_out, L->gate_inp.n_out};
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++) fw->wide = w[i] > fw->wide ? w[i] : fw->wide;
    return MOE_OK;
}

moe_fwd *moe_fwd_create(const moe_model *m, const moe_backend *be, int *status, char *err, size_t errsz) {
    int st = MOE_EINVAL;
    moe_fwd *fw = NULL;
    if (!m || !be) {
        moe_seterr(err, errsz, st, "no model or backend");
        goto fail;
    }
    if ((st = moe_backend_check(be, err, errsz))) goto fail;
    st = MOE_ENOMEM;
    fw = calloc(1, sizeof(*fw));
    if (!fw) goto fail;
    fw->model = m;
    fw->hp = moe_model_hparams(m);
    fw->be = *be;
    const moe_hparams *hp = fw->hp;
    const moe_model_weights *mw = moe_model_weights_get(m);
    const char *pe = getenv("MOE_FWD_PROFILE");
    fw->prof = pe && *pe && strcmp(pe, "0");
    fw->st = moe_opstats_create(&fw->be, &fw->sbe);
    fw->inv_freq = malloc((size_t)(hp->n_rot / 2) * sizeof(float));
    fw->layers = calloc((size_t)hp->n_layer, sizeof(fwd_layer));
    if (!fw->st || !fw->inv_freq || !fw->layers) goto fail;
    /* the wrapper too: an op added to the table but not to opstats.c is named here, not hit mid-step */
    if ((st = moe_backend_check(&fw->sbe, err, errsz))) goto fail;
    st = MOE_ENOMEM;
    moe_model_rope_inv_freq(m, fw->inv_freq);
    fw->wide = hp->n_expert > 0 ? hp->n_expert : 1;
    if ((st = bind_view(fw, &mw->tok_embd, &fw->tok_embd, err, errsz))) goto fail;
    if ((st = bind_view(fw, &mw->output_norm, &fw->out_norm, err, errsz))) goto fail;
    if (hp->tied_output) fw->output = fw->tok_embd; /* one binding for both uses */
    else if ((st = bind_view(fw, &mw->output, &fw->output, err, errsz))) goto fail;
    fw->weight_bytes = wbytes(&fw->out_norm) + wbytes(&fw->output);
    for (int64_t il = 0; il < hp->n_layer; il++)
        if ((st = bind_layer(fw, &mw->layers[il], &fw->layers[il], err, errsz))) goto fail;
    if (status) *status = MOE_OK;
    return fw;
fail:
    moe_fwd_free(fw);
    if (status) *status = st;
    return NULL;
}

int64_t moe_fwd_n_vocab(const moe_fwd *fw) { return fw ? fw->hp->n_vocab : 0; }
int64_t moe_fwd_n_layer(const moe_fwd *fw) { return fw ? fw->hp->n_layer : 0; }
int64_t moe_fwd_n_embd(const moe_fwd *fw) { return fw ? fw->hp->n_embd : 0; }
int64_t moe_fwd_ctx_len(const moe_fwd *fw) { return fw ? fw->hp->n_ctx_train : 0; }
void moe_fwd_set_hidden_out(moe_fwd *fw, float *hidden) {
    if (fw) fw->hidden_out = hidden;
}

void moe_fwd_set_route_out(moe_fwd *fw, int32_t *ids) {
    if (fw) fw->route_out = ids;
}

int64_t moe_fwd_n_expert_used(const moe_fwd *fw) { return fw ? fw->hp->n_expert_used : 0; }

void moe_fwd_set_layer_cb(moe_fwd *fw, void (*cb)(void *arg), void *arg) {
    if (!fw) return;
    fw->layer_cb = cb;
    fw->layer_arg = arg;
}

void moe_fwd_set_count_traffic(moe_fwd *fw, bool on) {
    if (fw) fw->count_traffic = on;
}

int moe_fwd_last_traffic(const moe_fwd *fw, moe_fwd_traffic *out) {
    if (!fw || !out) return MOE_EINVAL;
    *out = fw->last;
    return MOE_OK;
}

int64_t moe_fwd_weight_bytes(const moe_fwd *fw) { return fw ? fw->weight_bytes : 0; }

int moe_fwd_kv_opts(const moe_fwd *fw, int64_t block_size, int64_t n_blocks, moe_kv_opts *out) {
    if (!fw || !out) return MOE_EINVAL;
    const moe_hparams *hp = fw->hp;
    out->n_layer = hp->n_layer;
    out->block_size = block_size;
    out->n_blocks = n_blocks;
    if (hp->is_mla) {
        out->k_width = hp->kv_lora_rank + hp->n_rot; /* the latent and the shared roped k_pe, nothing expanded */
        out->v_width = 0;
    } else {
        out->k_width = hp->n_head_kv * hp->n_embd_head_k;
        out->v_width = hp->n_head_kv * hp->n_embd_head_v;
    }
    return MOE_OK;
}

static moe_rope_params rope_params(const moe_fwd *fw) {
    return (moe_rope_params){.style = fw->hp->rope_neox ? MOE_ROPE_NEOX : MOE_ROPE_NORM, .n_rot = fw->hp->n_rot,
                             .inv_freq = fw->inv_freq, .attn_factor = fw->hp->rope_attn_factor};
}

/* Grouped-query attention of layer il: B.o = wo . attn(rope(q), rope(k), v)
 * of the normed B.h, with this step's k/v stored in the cache first. */
static int attn_gqa(moe_fwd *fw, const fwd_step *S, const fwd_layer *L, int64_t il) {
    const moe_hparams *hp = fw->hp;
    const struct moe_backend_ops *op = S->op;
    void *c = S->c;
    const fwd_bufs *B = &fw->B;
    int64_t n = S->n, H = hp->n_head, Hkv = hp->n_head_kv, dk = hp->n_embd_head_k, dv = hp->n_embd_head_v;
    moe_rope_params rp = rope_params(fw);
    MOE_TRY(op->matmul(c, &L->wq, B->h, n, has(&L->bq) ? L->bq.data : NULL, B->q));
    MOE_TRY(op->matmul(c, &L->wk, B->h, n, has(&L->bk) ? L->bk.data : NULL, B->k));
    MOE_TRY(op->matmul(c, &L->wv, B->h, n, has(&L->bv) ? L->bv.data : NULL, B->v));
    if (has(&L->q_norm)) MOE_TRY(op->rms_norm(c, B->q, dk, B->q, dk, n * H, dk, L->q_norm.data, hp->rms_eps));
    if (has(&L->k_norm)) MOE_TRY(op->rms_norm(c, B->k, dk, B->k, dk, n * Hkv, dk, L->k_norm.data, hp->rms_eps));
    MOE_TRY(op->rope(c, B->q, n, H * dk, H, dk, S->pos, &rp));
    MOE_TRY(op->rope(c, B->k, n, Hkv * dk, Hkv, dk, S->pos, &rp));
    float *kc = moe_kv_k(S->cache, il), *vc = moe_kv_v(S->cache, il);
    MOE_TRY(op->kv_store(c, S->kv, kc, vc, Hkv * dk, Hkv * dv, B->k, B->v));
    MOE_TRY(op->attention(c, S->kv, B->q, kc, vc, H, Hkv, dk, hp->attn_scale, B->att));
    return op->matmul(c, &L->wo, B->att, n, NULL, B->o);
}

/* DeepSeek's multi-head latent attention of layer il: the cache holds the
 * normed latent and the roped shared k_pe; k and v are never expanded. */
static int attn_mla(moe_fwd *fw, const fwd_step *S, const fwd_layer *L, int64_t il) {
    const moe_hparams *hp = fw->hp;
    const struct moe_backend_ops *op = S->op;
    void *c = S->c;
    const fwd_bufs *B = &fw->B;
    int64_t n = S->n, H = hp->n_head, dk = hp->n_embd_head_k, r = hp->kv_lora_rank, nope = hp->n_embd_head_qk_nope;
    int64_t kw = r + hp->n_rot;
    moe_rope_params rp = rope_params(fw);
    if (has(&L->wq)) {
        MOE_TRY(op->matmul(c, &L->wq, B->h, n, NULL, B->q));
    } else {
        int64_t ql = L->q_a.n_out;
        MOE_TRY(op->matmul(c, &L->q_a, B->h, n, NULL, B->ga));
        MOE_TRY(op->rms_norm(c, B->ga, ql, B->ga, ql, n, ql, L->q_a_norm.data, hp->rms_eps));
        MOE_TRY(op->matmul(c, &L->q_b, B->ga, n, NULL, B->q));
    }
    MOE_TRY(op->matmul(c, &L->kv_a, B->h, n, NULL, B->k));
    /* norm the latent only; k_pe (the last n_rot) is roped, not normed */
    MOE_TRY(op->rms_norm(c, B->k, kw, B->k, kw, n, r, L->kv_a_norm.data, hp->rms_eps));
    MOE_TRY(op->rope(c, B->k + r, n, kw, 1, kw, S->pos, &rp));
    MOE_TRY(op->rope(c, B->q + nope, n, H * dk, H, dk, S->pos, &rp));
    float *cache = moe_kv_k(S->cache, il);
    MOE_TRY(op->kv_store(c, S->kv, cache, NULL, kw, 0, B->k, NULL));
    MOE_TRY(op->mla_attention(c, S->kv, B->q, cache, r, hp->n_rot, nope, &L->k_b, &L->v_b, hp->attn_scale, B->att));
    return op->matmul(c, &L->wo, B->att, n, NULL, B->o);
}

/* y = down(silu(gate x) * up x); ga and ub hold (n, gate->n_out). */
static int ffn(const fwd_step *S, const moe_weight *gate, const moe_weight *up, const moe_weight *down, const float *x,
               float *ga, float *ub, float *y) {
    MOE_TRY(S->op->matmul(S->c, gate, x, S->n, NULL, ga));
    MOE_TRY(S->op->matmul(S->c, up, x, S->n, NULL, ub));
    MOE_TRY(S->op->swiglu(S->c, ga, ub, ga, S->n * gate->n_out));
    return S->op->matmul(S->c, down, ga, S->n, NULL, y);
}

static int ffn_dense(moe_fwd *fw, const fwd_step *S, const fwd_layer *L) {
    const fwd_bufs *B = &fw->B;
    return ffn(S, &L->ffn_gate, &L->ffn_up, &L->ffn_down, B->h, B->ga, B->up, B->o);
}

/* Routed experts of layer il plus the shared expert(s), if any:
 * B.o = moe(B.h) + [sigmoid(gate_inp_sh . h) *] shared_ffn(B.h). */
static int ffn_moe(moe_fwd *fw, const fwd_step *S, const fwd_layer *L, int64_t il) {
    const moe_hparams *hp = fw->hp;
    const struct moe_backend_ops *op = S->op;
    void *c = S->c;
    const fwd_bufs *B = &fw->B;
    int64_t n = S->n;
    moe_route_params r = {.gating = hp->expert_gating_func, .n_expert = hp->n_expert, .n_used = hp->n_expert_used,
                          .n_group = hp->n_expert_group, .n_group_used = hp->n_group_used,
                          .norm = hp->expert_weights_norm, .scale = (float)hp->expert_weights_scale,
                          .bias = has(&L->exp_probs_b) ? L->exp_probs_b.data : NULL};
    MOE_TRY(op->matmul(c, &L->gate_inp, B->h, n, NULL, B->ga));
    int32_t *ids = fw->route_out ? fw->route_out + il * n * hp->n_expert_used : NULL;
    MOE_TRY(op->moe(c, B->h, n, B->ga, &r, &L->gate_exps, &L->up_exps, &L->down_exps, B->o, ids, NULL));
    if (!has(&L->gate_sh)) return MOE_OK;
    MOE_TRY(ffn(S, &L->gate_sh, &L->up_sh, &L->down_sh, B->h, B->ga, B->up, B->sh));
    if (has(&L->gate_inp_sh)) {
        MOE_TRY(op->matmul(c, &L->gate_inp_sh, B->h, n, NULL, B->gl));
        MOE_TRY(op->sigmoid_scale(c, B->sh, B->gl, n, hp->n_embd));
    }
    return op->add(c, B->o, B->sh, n * hp->n_embd);
}

/* logits (host, n_out rows) = output . rms_norm(B.x rows[]). */
static int output_head(moe_fwd *fw, const fwd_step *S, int64_t n_out, float *logits) {
    const moe_hparams *hp = fw->hp;
    const fwd_bufs *B = &fw->B;
    int64_t E = hp->n_embd;
    MOE_TRY(S->op->get_rows(S->c, B->x, E, E, fw->rows, n_out, B->h));
    MOE_TRY(S->op->rms_norm(S->c, B->h, E, B->h, E, n_out, E, fw->out_norm.data, hp->rms_eps));
    MOE_TRY(S->op->matmul(S->c, &fw->output, B->h, n_out, NULL, fw->lg));
    return S->op->download(S->c, logits, fw->lg, (size_t)n_out * hp->n_vocab * sizeof(float));
}

/* Makes the scratch hold a step of n tokens, n_out logits rows and n_bt
 * block-table entries over n_seq sequences. */
static int reserve(moe_fwd *fw, int64_t n, int64_t n_out, int64_t n_bt, int64_t n_seq) {
    const moe_hparams *hp = fw->hp;
    const struct moe_backend_ops *op = fw->be.ops;
    void *c = fw->be.ctx;
    size_t fs = sizeof(float);
    MOE_TRY(moe_array_fit((void **)&fw->bt, &fw->bt_cap, n_bt ? n_bt : 1, sizeof(int32_t)));
    MOE_TRY(moe_array_fit((void **)&fw->boff, &fw->boff_cap, n_seq + 1, sizeof(int64_t)));
    if (n > fw->cap) {
        free_bufs(fw);
        int64_t E = hp->n_embd, H = hp->n_head, Hkv = hp->n_head_kv;
        int64_t kw = hp->is_mla ? hp->kv_lora_rank + hp->n_rot : Hkv * hp->n_embd_head_k;
        fwd_bufs *A = &fw->B;
        A->x = op->alloc(c, (size_t)n * E * fs);
        A->h = op->alloc(c, (size_t)n * E * fs);
        A->q = op->alloc(c, (size_t)n * H * hp->n_embd_head_k * fs);
        A->k = op->alloc(c, (size_t)n * kw * fs);
        A->v = op->alloc(c, (size_t)n * (Hkv * hp->n_embd_head_v) * fs);
        A->att = op->alloc(c, (size_t)n * H * hp->n_embd_head_v * fs);
        A->o = op->alloc(c, (size_t)n * E * fs);
        A->ga = op->alloc(c, (size_t)n * fw->wide * fs);
        A->up = op->alloc(c, (size_t)n * fw->wide * fs);
        A->sh = op->alloc(c, (size_t)n * E * fs);
        A->gl = op->alloc(c, (size_t)n * fs);
        fw->rows = malloc((size_t)n * sizeof(int32_t));
        if (!A->x || !A->h || !A->q || !A->k || !A->v || !A->att || !A->o || !A->ga || !A->up || !A->sh || !A->gl ||
            !fw->rows) {
            free_bufs(fw);
            return MOE_ENOMEM;
        }
        fw->cap = n;
    }
    if (n_out > fw->lg_cap) {
        if (fw->lg) op->free(c, fw->lg);
        fw->lg = op->alloc(c, (size_t)n_out * hp->n_vocab * fs);
        fw->lg_cap = fw->lg ? n_out : 0;
        if (!fw->lg) return MOE_ENOMEM;
    }
    return MOE_OK;
}

/* Checks the batch against the model and the cache; MOE_EINVAL when
 * anything is out of range. */
static int check_batch(const moe_fwd *fw, const moe_kv_cache *kvc, const moe_batch *b) {
    if (!fw || !kvc || !b || b->n_tok <= 0 || !b->ids || !b->pos || !b->seq || b->n_seq <= 0 || !b->seqs)
        return MOE_EINVAL;
    const moe_kv_opts *ko = moe_kv_get_opts(kvc);
    moe_kv_opts want;
    moe_fwd_kv_opts(fw, ko->block_size, ko->n_blocks, &want);
    if (ko->n_layer != want.n_layer || ko->k_width != want.k_width || ko->v_width != want.v_width) return MOE_EINVAL;
    for (int64_t t = 0; t < b->n_tok; t++) {
        if (b->ids[t] < 0 || b->ids[t] >= fw->hp->n_vocab || b->seq[t] < 0 || b->seq[t] >= b->n_seq || b->pos[t] < 0)
            return MOE_EINVAL;
        if (b->pos[t] / ko->block_size >= b->seqs[b->seq[t]].n_blocks) return MOE_EINVAL;
    }
    return MOE_OK;
}

/* Sizes the scratch for batch b and fills the host index arrays: the rows
 * whose logits are wanted (*n_out of them) and the flattened block tables
 * behind *kv. */
static int prepare_step(moe_fwd *fw, const moe_kv_cache *kvc, const moe_batch *b, moe_kv_view *kv, int64_t *n_out) {
    int64_t n = b->n_tok, n_bt = 0;
    *n_out = 0;
    for (int64_t t = 0; t < n; t++) *n_out += !b->want_logits || b->want_logits[t];
    for (int64_t s = 0; s < b->n_seq; s++) n_bt += b->seqs[s].n_blocks;
    MOE_TRY(reserve(fw, n, *n_out, n_bt, b->n_seq));
    for (int64_t t = 0, i = 0; t < n; t++)
        if (!b->want_logits || b->want_logits[t]) fw->rows[i++] = (int32_t)t;
    fw->boff[0] = 0;
    for (int64_t s = 0; s < b->n_seq; s++) {
        if (b->seqs[s].n_blocks)
            memcpy(fw->bt + fw->boff[s], b->seqs[s].blocks, (size_t)b->seqs[s].n_blocks * sizeof(int32_t));
        fw->boff[s + 1] = fw->boff[s] + b->seqs[s].n_blocks;
    }
    *kv = (moe_kv_view){.block_size = moe_kv_get_opts(kvc)->block_size, .n_seq = b->n_seq, .block_table = fw->bt,
                        .block_off = fw->boff, .seq = b->seq, .pos = b->pos, .n_tok = n};
    return MOE_OK;
}

int moe_fwd_run(moe_fwd *fw, moe_kv_cache *kvc, const moe_batch *b, float *logits) {
    if (!logits) return MOE_EINVAL;
    MOE_TRY(check_batch(fw, kvc, b));
    const moe_hparams *hp = fw->hp;
    int64_t n = b->n_tok, E = hp->n_embd, n_out;
    moe_kv_view kv;
    MOE_TRY(prepare_step(fw, kvc, b, &kv, &n_out));
    /* profiling and traffic counting: the same ops through the wrapper */
    bool wrap = fw->prof || fw->count_traffic;
    const moe_backend *be = wrap ? &fw->sbe : &fw->be;
    if (wrap) moe_opstats_begin_step(fw->st, n, fw->prof, fw->count_traffic);
    fwd_step S = {.op = be->ops, .c = be->ctx, .cache = kvc, .kv = &kv, .pos = b->pos, .n = n};
    const fwd_bufs *B = &fw->B;

    MOE_TRY(S.op->embed(S.c, &fw->tok_embd, b->ids, n, B->x));
    for (int64_t il = 0; il < hp->n_layer; il++) {
        const fwd_layer *L = &fw->layers[il];
        MOE_TRY(S.op->rms_norm(S.c, B->x, E, B->h, E, n, E, L->attn_norm.data, hp->rms_eps));
        MOE_TRY(hp->is_mla ? attn_mla(fw, &S, L, il) : attn_gqa(fw, &S, L, il));
        MOE_TRY(S.op->add(S.c, B->x, B->o, n * E));
        MOE_TRY(S.op->rms_norm(S.c, B->x, E, B->h, E, n, E, L->ffn_norm.data, hp->rms_eps));
        MOE_TRY(L->is_moe ? ffn_moe(fw, &S, L, il) : ffn_dense(fw, &S, L));
        MOE_TRY(S.op->add(S.c, B->x, B->o, n * E));
        if (fw->hidden_out) MOE_TRY(S.op->download(S.c, fw->hidden_out + il * n * E, B->x, (size_t)(n * E) * sizeof(float)));
        if (fw->layer_cb) fw->layer_cb(fw->layer_arg);
    }
    if (n_out) MOE_TRY(output_head(fw, &S, n_out, logits));
    if (fw->count_traffic) MOE_TRY(moe_opstats_traffic(fw->st, &fw->last));
    return MOE_OK;
}
