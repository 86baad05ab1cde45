// The KV hook's cell operations: elasticserve's C API over llama.cpp's own cache
// (llama_kv_cache, src/llama-kv-cache.h of the vendored llama.cpp). Rows are moved
// and merged by ggml graphs computed on the backend that holds the cache (CPU or a
// GPU), so no row crosses through host memory; cell metadata (positions, M-RoPE's
// extra components, sequence membership) is set directly in the cell table.
//
// Every call checks what it is asked against the cache before it changes anything:
// a call that returns an error has left the cache as it was.
#ifndef ELASTICSERVE_KVHOOK_H
#define ELASTICSERVE_KVHOOK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct llama_context;

// A cell of a sequence: its index in the sequence's stream, its position and, for
// M-RoPE models, the extra components (x, y) llama.cpp keeps per cell.
typedef struct es_kv_cell {
    int32_t cell;
    int32_t pos;
    int32_t x;
    int32_t y;
} es_kv_cell;

// es_kv_hook holds what the cell operations reuse between calls: one compute
// backend per device and its graph allocator. One per llama context; not safe for
// concurrent use (the engine's decode loop is its only caller).
typedef struct es_kv_hook es_kv_hook;

es_kv_hook *es_kv_hook_new(void);
void es_kv_hook_free(es_kv_hook *h);

// es_kv_hook_set_generic makes the CPU run the same graph as other devices instead
// of its fused merge (tests run both).
void es_kv_hook_set_generic(es_kv_hook *h, int on);

// es_kv_parts is the number of caches the context keeps: 1 (one llama_kv_cache) or
// 2 (a sliding-window model: part 0 the full-attention cache, part 1 the
// sliding-window one); 0 for memory the hook does not know (recurrent, hybrid).
int es_kv_parts(struct llama_context *ctx);

// es_kv_layers writes the model layer ids of part's cache layers, in cache order,
// and returns their count (-1: no such part).
int es_kv_layers(struct llama_context *ctx, int part, int32_t *out, int cap);

// es_kv_stream_size is the number of cells in one stream of part's cache.
int es_kv_stream_size(struct llama_context *ctx, int part);

// es_kv_seq_cells writes seq's cells in part, ascending by cell index, and returns
// their count; -1 when cap is too small or seq/part is unknown. A cell shared with
// another sequence counts as an error (-2): the hook never rewrites shared cells.
int es_kv_seq_cells(struct llama_context *ctx, int part, int32_t seq, es_kv_cell *out, int cap);

// es_kv_plan: what a sequence's cells in one part become. For cache layer l
// (l < n_layer), destination slot j (j < n_dst) takes the mean of the source cells
// src[src_off[l] + i] whose grp[src_off[l] + i] == j (each counted once per
// occurrence; every slot has at least one), computed in float32 and stored once in
// the destination cache's type. Slot j is written to cell dst_cell0 + j of the
// destination stream and gets position pos[j], and the M-RoPE components of source
// cell meta_cell[j]. A plan where every slot has exactly one source is a copy.
typedef struct es_kv_plan {
    int n_layer;
    int n_dst;
    const int32_t *src;
    const int32_t *grp;
    const int32_t *src_off;  // [n_layer + 1]
    const int32_t *meta_cell; // [n_dst]
    const int32_t *pos;       // [n_dst]
    int32_t dst_cell0;        // < 0: the first run of n_dst cells free (or the sequence's own)
} es_kv_plan;

// es_kv_rewrite replaces dst_seq's cells in part of dst with the plan's rows, read
// from src_seq's cells in part of src, and removes src_seq's cells from src. src
// and dst may be the same context (and then the same sequence): the rewrite in
// place. Both caches must hold the same layers with the same row widths on the same
// device; their row types and V orientation may differ (rows are converted). The
// first destination cell is returned in *cell0. Returns 0, or an error code with a
// message in err (the caches untouched).
int es_kv_rewrite(es_kv_hook *h, struct llama_context *src, int32_t src_seq, struct llama_context *dst,
                  int32_t dst_seq, int part, const es_kv_plan *plan, int32_t *cell0, char *err, size_t errlen);

// es_kv_evict removes cell of seq from part 0; in a sliding-window model's part 1
// it also removes the cells of seq at that cell's position (as llama_memory_seq_rm
// would). Returns 0, or an error code with a message in err.
int es_kv_evict(struct llama_context *ctx, int32_t seq, int32_t cell, char *err, size_t errlen);

// es_kv_read_rows reads layer l's (cache order) K (v == 0) or V rows of the given
// cells in part as float32, n_cells * width values, and returns width (-1 on error).
// For tests and invariant checks; it does not change the cache.
int es_kv_read_rows(es_kv_hook *h, struct llama_context *ctx, int part, int32_t seq, int l, int v,
                    const int32_t *cells, int n_cells, float *out, size_t cap);

// ---- cells to host memory and back ----
//
// A sequence's cells can be copied out of a cache part into host bytes in the
// cache's own row types and read back into a cache of the same layout (the same
// model, layer by layer the same row types, widths and V orientation). Nothing is
// converted either way, so a round trip gives the same rows bit for bit.

// es_kv_layer_info describes one layer of a cache part: its model layer, the GGML
// types and row widths (elements) of K and V, the bytes one cell takes in each
// (a transposed V: width_v elements, one per column), and V's orientation.
typedef struct es_kv_layer_info {
    int32_t layer;
    int32_t type_k, type_v;
    int32_t width_k, width_v;
    int32_t bytes_k, bytes_v;
    int32_t v_trans;
} es_kv_layer_info;

// es_kv_layout writes the layers of part's cache, in cache order, and returns
// their count (-1: no such part, or cap too small).
int es_kv_layout(struct llama_context *ctx, int part, es_kv_layer_info *out, int cap);

// es_kv_export copies the rows of n cells of seq's stream in part (each a cell of
// seq alone) into buf, layer by layer in cache order; per layer the K rows of the
// cells in the order given (n * bytes_k), then V: its rows (n * bytes_v) or, for a
// transposed V, width_v columns of n elements each. buf must hold cap bytes, at
// least n * sum(bytes_k + bytes_v). Returns 0, or an error code with a message in
// err. The cache is not changed. h runs the copies that need a graph (a
// transposed V off the host).
int es_kv_export(es_kv_hook *h, struct llama_context *ctx, int part, int32_t seq, const int32_t *cells, int n, void *buf, size_t cap,
                 char *err, size_t errlen);

// es_kv_import writes n cells in es_kv_export's format (len bytes, exported from
// a cache whose layers were layout[0..n_layer)) into the first run of n free cells
// of seq's stream in part, and gives cell j position pos[j] and M-RoPE components
// (x[j], y[j]); the cells join seq. The layout must be the cache's own, layer by
// layer. With dry_run set it only checks (and finds the run). The first cell is
// returned in *cell0. Returns 0, or an error code with a message in err (the cache
// untouched).
int es_kv_import(es_kv_hook *h, struct llama_context *ctx, int part, int32_t seq, const es_kv_layer_info *layout, int n_layer,
                 const void *buf, size_t len, int n, const int32_t *pos, const int32_t *x, const int32_t *y, int dry_run,
                 int32_t *cell0, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
