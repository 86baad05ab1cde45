// C side of elasticserve's llama.cpp hooks: log routing, load progress, and the
// attention-capture eval callback. Kept in C so that the per-node callback never
// crosses into Go.
#ifndef ELASTICSERVE_HOOK_H
#define ELASTICSERVE_HOOK_H

#include <stdbool.h>
#include <stdint.h>
#include "ggml.h"

void es_log_install(int level);
void es_log_set_level(int level);

// Load progress: forwards to the Go export esProgress with the handle in user_data.
bool es_progress(float progress, void *user_data);
struct llama_model_params;
void es_set_progress(struct llama_model_params *p, uintptr_t handle);

// es_capture accumulates, per KV stream and layer, the head-averaged column sums of
// kq_soft_max-<layer> over every query row of every ubatch decoded while enabled.
// A ubatch of several sequences of a context with a stream per sequence carries
// each sequence's rows in its own stream: their sums stay apart. Cells past n_cells
// are ignored (n_kv is padded). It also records the attended range (n_kv) of the
// last graph.
typedef struct es_capture {
    int enabled;       // accumulate sums
    int n_layer;
    int n_cells;       // columns kept per layer and stream (cells of one stream)
    int n_stream;      // KV streams of the context (1: a unified cache)
    float *sums;       // [n_stream][n_layer][n_cells]
    int64_t *rows;     // [n_stream] query rows accumulated into layer 0
    float *scratch;    // host copy of a device tensor
    size_t scratch_size;
    int64_t last_n_kv; // attended range of the most recent graph (any layer 0 attention node)
    int bad_stream;    // set when a captured tensor's streams could not be told apart (unsupported)
} es_capture;

es_capture *es_capture_new(int n_layer, int n_cells, int n_stream);
void es_capture_free(es_capture *c);
void es_capture_reset(es_capture *c);
bool es_eval_cb(struct ggml_tensor *t, bool ask, void *user_data);

#endif
