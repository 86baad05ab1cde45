#include "elastic_hook.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"
#include "mtmd.h"

// ---- logging ----

static int es_min_level = GGML_LOG_LEVEL_WARN;
static int es_last_level = GGML_LOG_LEVEL_INFO;

static void es_log_cb(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    int lv = (int)level;
    if (lv == GGML_LOG_LEVEL_CONT) {
        lv = es_last_level;
    } else {
        es_last_level = lv;
    }
    if (lv >= es_min_level) {
        fputs(text, stderr);
    }
}

void es_log_install(int level) {
    es_min_level = level;
    llama_log_set(es_log_cb, NULL);
    mtmd_log_set(es_log_cb, NULL);
}

void es_log_set_level(int level) { es_min_level = level; }

// ---- load progress ----

extern bool esProgress(float progress, uintptr_t handle);

bool es_progress(float progress, void *user_data) {
    return esProgress(progress, (uintptr_t)user_data);
}

void es_set_progress(struct llama_model_params *p, uintptr_t handle) {
    p->progress_callback = es_progress;
    p->progress_callback_user_data = (void *)handle;
}

// ---- attention capture ----

es_capture *es_capture_new(int n_layer, int n_cells, int n_stream) {
    es_capture *c = calloc(1, sizeof(es_capture));
    if (!c) return NULL;
    c->n_layer = n_layer;
    c->n_cells = n_cells;
    c->n_stream = n_stream;
    c->sums = calloc((size_t)n_stream * (size_t)n_layer * (size_t)n_cells, sizeof(float));
    c->rows = calloc((size_t)n_stream, sizeof(int64_t));
    if (!c->sums || !c->rows) {
        es_capture_free(c);
        return NULL;
    }
    return c;
}

void es_capture_free(es_capture *c) {
    if (!c) return;
    free(c->sums);
    free(c->rows);
    free(c->scratch);
    free(c);
}

void es_capture_reset(es_capture *c) {
    memset(c->sums, 0, (size_t)c->n_stream * (size_t)c->n_layer * (size_t)c->n_cells * sizeof(float));
    memset(c->rows, 0, (size_t)c->n_stream * sizeof(int64_t));
    c->bad_stream = 0;
}

static const char kSoftMax[] = "kq_soft_max-";
static const char kFattn[] = "__fattn__-";
static const char kCacheK[] = "cache_k_l";

static int layer_of(const char *name, const char *prefix) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) return -1;
    const char *p = name + n;
    if (*p < '0' || *p > '9') return -1;
    return atoi(p);
}

// first_stream is the KV stream that the first stream of attention tensor t
// (kq_soft_max, [n_kv, n_tokens, n_head, n_stream]) attends. llama.cpp builds the
// K operand of the kq product as a view of the layer's cache tensor
// [n_embd, kv_size, n_stream] starting at stream s0, and the streams of one ubatch
// are consecutive (split_equal keeps increasing sequence ids when the cache is not
// unified). -1 when the graph is not shaped like that.
static int64_t first_stream(const struct ggml_tensor *t, int n_stream) {
    const struct ggml_tensor *kq = t->src[0];
    // soft-capping and a KQ bias put scale/tanh/add nodes between the product and
    // the softmax, with the product as their first operand
    for (int i = 0; kq && kq->op != GGML_OP_MUL_MAT && i < 8; i++) kq = kq->src[0];
    if (!kq || kq->op != GGML_OP_MUL_MAT || !kq->src[0]) return -1;
    const struct ggml_tensor *k = kq->src[0];
    const struct ggml_tensor *root = k->view_src;
    if (!root || layer_of(root->name, kCacheK) < 0 || root->ne[2] != n_stream || root->nb[2] == 0) return -1;
    if (k->view_offs % root->nb[2] != 0) return -1;
    return (int64_t)(k->view_offs / root->nb[2]);
}

bool es_eval_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    es_capture *c = (es_capture *)user_data;
    int il = layer_of(t->name, kSoftMax);
    if (ask) {
        if (il == 0) {
            c->last_n_kv = t->ne[0];
        } else if (layer_of(t->name, kFattn) == 0 && t->src[1]) {
            c->last_n_kv = t->src[1]->ne[1];
        }
        return c->enabled && il >= 0 && il < c->n_layer && t->type == GGML_TYPE_F32;
    }
    if (!c->enabled || il < 0 || il >= c->n_layer || t->type != GGML_TYPE_F32) {
        return true;
    }
    // t: [n_kv, n_tokens, n_head, n_stream]: the query rows of each stream of the
    // ubatch over the cells of that stream
    const int64_t n_kv = t->ne[0], n_tok = t->ne[1], n_head = t->ne[2], n_strm = t->ne[3];
    int64_t s0 = 0;
    if (c->n_stream > 1) {
        s0 = first_stream(t, c->n_stream);
    } else if (n_strm != 1) {
        s0 = -1;
    }
    if (s0 < 0 || s0 + n_strm > c->n_stream) {
        c->bad_stream = 1;
        return true;
    }
    const char *base = (const char *)t->data;
    if (!ggml_backend_buffer_is_host(t->buffer)) {
        size_t need = ggml_nbytes(t);
        if (need > c->scratch_size) {
            float *p = realloc(c->scratch, need);
            if (!p) return false;
            c->scratch = p;
            c->scratch_size = need;
        }
        ggml_backend_tensor_get(t, c->scratch, 0, need);
        base = (const char *)c->scratch;
    }
    const int64_t ncol = n_kv < c->n_cells ? n_kv : c->n_cells;
    const float inv = 1.0f / (float)n_head;
    for (int64_t s = 0; s < n_strm; s++) {
        const int64_t strm = s0 + s;
        float *dst = c->sums + ((size_t)strm * (size_t)c->n_layer + (size_t)il) * (size_t)c->n_cells;
        for (int64_t h = 0; h < n_head; h++) {
            for (int64_t i = 0; i < n_tok; i++) {
                const float *row = (const float *)(base + s * t->nb[3] + i * t->nb[1] + h * t->nb[2]);
                for (int64_t j = 0; j < ncol; j++) {
                    dst[j] += row[j] * inv;
                }
            }
        }
        if (il == 0) c->rows[strm] += n_tok;
    }
    return true;
}
