// The KV hook's cell operations (see kvhook.h), compiled against the vendored
// llama.cpp's internal headers from the Go module (reached through its include
// folder: ../src). llama_kv_cache keeps its cell table private; the three members the
// hook needs (the cells per stream, the search heads, the sequence-to-stream map)
// and the layer-id map are read through the explicit-instantiation rule (access
// checks do not apply to the arguments of an explicit instantiation), which needs
// no patch to llama.cpp. Row data is reached through the public get_k/get_v views.

#include "kvhook.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif
#include <map>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "../src/llama-kv-cache-iswa.h"
#include "../src/llama-kv-cache.h"

// ---- access to llama_kv_cache's private members ----

template <typename Tag, typename Tag::type M>
struct es_member_of {
    friend typename Tag::type es_member(Tag) { return M; }
};

struct es_tag_cells {
    using type = std::vector<llama_kv_cells> llama_kv_cache::*;
    friend type es_member(es_tag_cells);
};
struct es_tag_heads {
    using type = std::vector<uint32_t> llama_kv_cache::*;
    friend type es_member(es_tag_heads);
};
struct es_tag_streams {
    using type = std::vector<uint32_t> llama_kv_cache::*;
    friend type es_member(es_tag_streams);
};
struct es_tag_layer_ids {
    using type = std::unordered_map<int32_t, int32_t> llama_kv_cache::*;
    friend type es_member(es_tag_layer_ids);
};

template struct es_member_of<es_tag_cells, &llama_kv_cache::v_cells>;
template struct es_member_of<es_tag_heads, &llama_kv_cache::v_heads>;
template struct es_member_of<es_tag_streams, &llama_kv_cache::seq_to_stream>;
template struct es_member_of<es_tag_layer_ids, &llama_kv_cache::map_layer_ids>;

static std::vector<llama_kv_cells> &cells_of(llama_kv_cache *kv) { return kv->*es_member(es_tag_cells{}); }
static std::vector<uint32_t> &heads_of(llama_kv_cache *kv) { return kv->*es_member(es_tag_heads{}); }
static const std::vector<uint32_t> &streams_of(llama_kv_cache *kv) { return kv->*es_member(es_tag_streams{}); }

// ---- errors ----

struct es_error : std::runtime_error {
    int code;
    es_error(int c, const std::string &m) : std::runtime_error(m), code(c) {}
};

static std::string fmt(const char *f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

enum { ES_EINVAL = 1, ES_EUNSUPPORTED = 2, ES_ECOMPUTE = 3 };

static int report(const es_error &e, char *err, size_t errlen) {
    if (err && errlen) {
        snprintf(err, errlen, "%s", e.what());
    }
    return e.code;
}

// ---- caches ----

// part_of returns part (0 or 1) of the context's memory, or nullptr.
static llama_kv_cache *part_of(llama_context *ctx, int part) {
    llama_memory_i *mem = llama_get_memory(ctx);
    if (auto *kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return part == 0 ? kv : nullptr;
    }
    if (auto *iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return part == 0 ? iswa->get_base() : part == 1 ? iswa->get_swa() : nullptr;
    }
    return nullptr;
}

static llama_kv_cache *need_part(llama_context *ctx, int part) {
    llama_kv_cache *kv = part_of(ctx, part);
    if (!kv) {
        throw es_error(ES_EUNSUPPORTED, fmt("kv hook: the context has no cache part %d the hook knows", part));
    }
    return kv;
}

// layer_ids lists the model layers a cache holds, in cache order.
static std::vector<int32_t> layer_ids(llama_kv_cache *kv) {
    const auto &m = kv->*es_member(es_tag_layer_ids{});
    std::vector<int32_t> ids(m.size(), -1);
    for (const auto &[il, ikv] : m) {
        if (ikv < 0 || (size_t)ikv >= ids.size()) {
            throw es_error(ES_EUNSUPPORTED, "kv hook: the cache's layer map is not dense");
        }
        ids[ikv] = il;
    }
    return ids;
}

static uint32_t stream_of(llama_kv_cache *kv, int32_t seq) {
    const auto &s2s = streams_of(kv);
    if (seq < 0 || (size_t)seq >= s2s.size()) {
        throw es_error(ES_EINVAL, fmt("kv hook: sequence %d is not one of the context's %zu", seq, s2s.size()));
    }
    return s2s[seq];
}

// A layer's K and V cache tensors (all streams) and V's orientation.
struct layer_tensors {
    ggml_tensor *k, *v;
    bool v_trans;
};

static layer_tensors tensors_of(llama_kv_cache *kv, ggml_context *gctx, int32_t il) {
    llama_kv_cache::slot_info si;
    si.s0 = si.s1 = 0;
    si.resize(1);
    si.strm[0] = 0;
    si.idxs[0] = {0};
    ggml_tensor *kview = kv->get_k(gctx, il, kv->get_size(), si);
    ggml_tensor *vview = kv->get_v(gctx, il, kv->get_size(), si);
    if (!kview->view_src || !vview->view_src) {
        throw es_error(ES_EUNSUPPORTED, "kv hook: the cache's views have no source tensor");
    }
    // get_v's view of a transposed V steps over cells fastest (nb[1] > nb[2]).
    return {kview->view_src, vview->view_src, vview->nb[1] > vview->nb[2]};
}

// ---- the hook: backends and allocators ----

struct es_kv_hook {
    std::map<ggml_backend_dev_t, ggml_backend_t> backends;
    std::map<ggml_backend_t, bool> on_cpu;
    bool generic = false; // tests: the device graph on the CPU too
    std::map<ggml_backend_t, ggml_gallocr_t> allocs;

    ~es_kv_hook() {
        for (auto &[b, a] : allocs) ggml_gallocr_free(a);
        for (auto &[d, b] : backends) ggml_backend_free(b);
    }

    ggml_backend_t backend_for(ggml_tensor *t, int n_threads) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        if (!dev || ggml_backend_buft_is_host(buft)) {
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        }
        if (!dev) throw es_error(ES_EUNSUPPORTED, "kv hook: no device for the cache's buffer");
        auto it = backends.find(dev);
        ggml_backend_t b;
        if (it != backends.end()) {
            b = it->second;
        } else {
            b = ggml_backend_dev_init(dev, nullptr);
            if (!b) throw es_error(ES_EUNSUPPORTED, fmt("kv hook: cannot start backend %s", ggml_backend_dev_name(dev)));
            backends[dev] = b;
            on_cpu[b] = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
        }
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU && n_threads > 0) {
            ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
            auto set = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
            if (set) set(b, n_threads);
        }
        return b;
    }

    ggml_gallocr_t alloc_for(ggml_backend_t b) {
        auto it = allocs.find(b);
        if (it != allocs.end()) return it->second;
        ggml_gallocr_t a = ggml_gallocr_new(ggml_backend_get_default_buffer_type(b));
        allocs[b] = a;
        return a;
    }
};

// A graph under construction: tensor metadata in ctx, inputs listed with the host
// data to copy into them once allocated.
struct graph_build {
    ggml_context *ctx = nullptr;
    ggml_context *in = nullptr;
    ggml_cgraph *gf = nullptr;
    ggml_backend_buffer_t in_buf = nullptr;
    std::vector<std::pair<ggml_tensor *, std::vector<char>>> inputs;

    explicit graph_build(size_t n_tensors) {
        ggml_init_params p = {ggml_tensor_overhead() * n_tensors + ggml_graph_overhead_custom(n_tensors, false), nullptr, true};
        ctx = ggml_init(p);
        ggml_init_params pi = {ggml_tensor_overhead() * 1024, nullptr, true};
        in = ggml_init(pi);
        if (!ctx || !in) throw es_error(ES_ECOMPUTE, "kv hook: out of memory for a graph");
        gf = ggml_new_graph_custom(ctx, n_tensors, false);
    }
    ~graph_build() {
        if (in_buf) ggml_backend_buffer_free(in_buf);
        if (in) ggml_free(in);
        if (ctx) ggml_free(ctx);
    }

    template <typename T>
    ggml_tensor *input(ggml_type type, const std::vector<T> &data, int64_t ne0, int64_t ne1 = 1) {
        ggml_tensor *t = ggml_new_tensor_2d(in, type, ne0, ne1);
        std::vector<char> bytes(sizeof(T) * data.size());
        memcpy(bytes.data(), data.data(), bytes.size());
        inputs.emplace_back(t, std::move(bytes));
        return t;
    }

    // run allocates the inputs and intermediates on b and computes the graph.
    void run(es_kv_hook *h, ggml_backend_t b) {
        if (!inputs.empty()) {
            in_buf = ggml_backend_alloc_ctx_tensors(in, b);
            if (!in_buf) throw es_error(ES_ECOMPUTE, "kv hook: cannot allocate the graph's inputs");
            for (auto &[t, bytes] : inputs) ggml_backend_tensor_set(t, bytes.data(), 0, bytes.size());
        }
        if (!ggml_gallocr_alloc_graph(h->alloc_for(b), gf)) {
            throw es_error(ES_ECOMPUTE, "kv hook: cannot allocate the graph");
        }
        if (ggml_backend_graph_compute(b, gf) != GGML_STATUS_SUCCESS) {
            throw es_error(ES_ECOMPUTE, "kv hook: the backend failed to compute the graph");
        }
    }
};

// rows_2d views stream strm of a K (or untransposed V) cache tensor as
// [width, cells].
static ggml_tensor *rows_2d(ggml_context *ctx, ggml_tensor *t, uint32_t strm) {
    return ggml_view_2d(ctx, t, t->ne[0], t->ne[1], t->nb[1], strm * t->nb[2]);
}

// gather reads the given cells (a tensor of cell indices) of stream strm as float32
// rows [width, n]. A transposed V is first read over cells [0, used) and turned.
static ggml_tensor *gather(ggml_context *ctx, ggml_tensor *t, bool trans, uint32_t strm, int64_t used, ggml_tensor *idx) {
    if (!trans) {
        return ggml_get_rows(ctx, rows_2d(ctx, t, strm), idx);
    }
    const size_t esz = ggml_type_size(t->type);
    const int64_t width = t->ne[0], size = t->ne[1];
    ggml_tensor *el = ggml_view_2d(ctx, t, used, width, size * esz, strm * t->nb[2]); // [used, width]
    ggml_tensor *rows = ggml_cast(ctx, ggml_transpose(ctx, el), GGML_TYPE_F32);       // [width, used]
    return ggml_get_rows(ctx, rows, idx);
}

// scatter writes float32 rows m [width, n] into cells idx (= first..first+n) of
// stream strm, converting them to the cache's type.
static ggml_tensor *scatter(ggml_context *ctx, ggml_tensor *t, bool trans, uint32_t strm, int64_t first, ggml_tensor *m,
                            ggml_tensor *idx) {
    if (!trans) {
        return ggml_set_rows(ctx, rows_2d(ctx, t, strm), m, idx);
    }
    const size_t esz = ggml_type_size(t->type);
    const int64_t width = t->ne[0], size = t->ne[1];
    ggml_tensor *el = ggml_view_2d(ctx, t, m->ne[1], width, size * esz, strm * t->nb[2] + first * esz);
    return ggml_cpy(ctx, ggml_transpose(ctx, m), el);
}

// copy_runs copies rows between two caches of the same row type and orientation
// unconverted: source cells src[i] go to cell first+i, one copy per run of
// consecutive source cells.
static void copy_runs(ggml_context *ctx, ggml_cgraph *gf, ggml_tensor *ts, ggml_tensor *td, bool trans, uint32_t ss,
                      uint32_t sd, const std::vector<int32_t> &src, int64_t first) {
    const size_t esz = ggml_type_size(ts->type);
    for (size_t i = 0; i < src.size();) {
        size_t n = 1;
        while (i + n < src.size() && src[i + n] == src[i] + (int32_t)n) n++;
        const int64_t a = src[i], b = first + (int64_t)i;
        ggml_tensor *from, *to;
        if (!trans) {
            from = ggml_view_2d(ctx, ts, ts->ne[0], n, ts->nb[1], ss * ts->nb[2] + a * ts->nb[1]);
            to = ggml_view_2d(ctx, td, td->ne[0], n, td->nb[1], sd * td->nb[2] + b * td->nb[1]);
        } else {
            from = ggml_view_2d(ctx, ts, n, ts->ne[0], ts->ne[1] * esz, ss * ts->nb[2] + a * esz);
            to = ggml_view_2d(ctx, td, n, td->ne[0], td->ne[1] * esz, sd * td->nb[2] + b * esz);
        }
        ggml_build_forward_expand(gf, ggml_cpy(ctx, from, to));
        i += n;
    }
}

// ---- the CPU's fused merge ----
//
// On the CPU the device graph's float32 intermediates (get_rows to float32, the
// group sums, the scale) cost several passes over the prompt's rows. There a single
// custom operation reads each source row once and writes each merged row once, into
// a buffer in the destination's type where it can (then a plain copy puts it in
// place), split over the backend's threads. It is still a ggml graph on the same
// tensors; devices without custom operations (CUDA) run the generic graph.

struct fused_merge {
    const ggml_tensor *src; // a layer's K or V cache (all streams)
    uint32_t strm;
    bool trans;            // V stored element-major: [cells] per element
    int64_t used;          // trans: cells [0, used) are read per element
    const int32_t *off;    // [n + 1]: slot j's sources are cells[off[j] .. off[j+1])
    const int32_t *cells;
    const float *inv;      // [n]: 1 / number of sources
};

static void store_row(const float *x, void *dst, ggml_type t, int64_t n) {
    switch (t) {
    case GGML_TYPE_F16:
        ggml_fp32_to_fp16_row(x, (ggml_fp16_t *)dst, n);
        break;
    case GGML_TYPE_BF16:
        ggml_fp32_to_bf16_row(x, (ggml_bf16_t *)dst, n);
        break;
    default:
        memcpy(dst, x, n * sizeof(float));
    }
}

// Scratch of one thread's transposed-V merge.
struct trans_scratch {
    std::vector<float> row, blk, out;
    trans_scratch(int64_t used, int64_t n) : row(used), blk(used * 8), out(n * 8) {}
};

// trans_block merges element rows e0..e0+nr-1 (nr <= 8) of a transposed V: the
// rows are turned cell-major (blk[c][r]), so that a slot's sum runs over whole
// vectors of the block's rows.
static void trans_block(const fused_merge &a, ggml_tensor *dst, int64_t e0, int64_t nr, trans_scratch &sc) {
    const ggml_tensor *t = a.src;
    const auto to_float = ggml_get_type_traits(t->type)->to_float;
    const size_t esz = ggml_type_size(t->type);
    const char *base = (const char *)t->data + a.strm * t->nb[2];
    const int64_t n = dst->ne[0];
    std::fill(sc.blk.begin(), sc.blk.end(), 0.0f);
    for (int64_t r = 0; r < nr; r++) {
        to_float(base + (e0 + r) * t->ne[1] * esz, sc.row.data(), a.used);
        float *col = sc.blk.data() + r;
        for (int64_t c = 0; c < a.used; c++) col[c * 8] = sc.row[c];
    }
    for (int64_t j = 0; j < n; j++) {
        float acc[8] = {0};
        for (int32_t k = a.off[j]; k < a.off[j + 1]; k++) {
            const float *v = &sc.blk[a.cells[k] * 8];
            for (int r = 0; r < 8; r++) acc[r] += v[r];
        }
        const float w = a.inv[j];
        for (int r = 0; r < 8; r++) sc.out[r * n + j] = acc[r] * w;
    }
    for (int64_t r = 0; r < nr; r++) store_row(&sc.out[r * n], (char *)dst->data + (e0 + r) * dst->nb[1], dst->type, n);
}

#if defined(__AVX2__) && defined(__F16C__)
// transpose8 turns an 8x8 block of floats (r[i] holds row i) into its transpose.
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// trans_block_avx2 is trans_block for 8 rows of f16 into f16, turning 8x8 tiles
// in registers on the way in and on the way out.
static void trans_block_avx2(const fused_merge &a, ggml_tensor *dst, int64_t e0, trans_scratch &sc) {
    const ggml_tensor *t = a.src;
    const char *base = (const char *)t->data + a.strm * t->nb[2];
    const ggml_fp16_t *rows[8];
    for (int r = 0; r < 8; r++) rows[r] = (const ggml_fp16_t *)(base + (e0 + r) * t->ne[1] * sizeof(ggml_fp16_t));
    float *blk = sc.blk.data();
    int64_t c = 0;
    for (; c + 8 <= a.used; c += 8) {
        __m256 v[8];
        for (int r = 0; r < 8; r++) v[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rows[r] + c)));
        transpose8(v);
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(blk + (c + k) * 8, v[k]);
    }
    for (; c < a.used; c++) {
        for (int r = 0; r < 8; r++) blk[c * 8 + r] = _cvtsh_ss(rows[r][c]);
    }
    const int64_t n = dst->ne[0];
    ggml_fp16_t *out[8];
    for (int r = 0; r < 8; r++) out[r] = (ggml_fp16_t *)((char *)dst->data + (e0 + r) * dst->nb[1]);
    int64_t j0 = 0;
    for (; j0 < n; j0 += 8) {
        const int64_t m = std::min<int64_t>(8, n - j0);
        __m256 acc[8];
        for (int64_t jj = 0; jj < 8; jj++) {
            acc[jj] = _mm256_setzero_ps();
            if (jj >= m) continue;
            const int64_t j = j0 + jj;
            for (int32_t k = a.off[j]; k < a.off[j + 1]; k++) acc[jj] = _mm256_add_ps(acc[jj], _mm256_loadu_ps(blk + a.cells[k] * 8));
            acc[jj] = _mm256_mul_ps(acc[jj], _mm256_set1_ps(a.inv[j]));
        }
        transpose8(acc); // acc[r]: row r's slots j0..j0+7
        for (int r = 0; r < 8; r++) {
            const __m128i h = _mm256_cvtps_ph(acc[r], _MM_FROUND_TO_NEAREST_INT);
            if (m == 8) {
                _mm_storeu_si128((__m128i *)(out[r] + j0), h);
            } else {
                alignas(16) ggml_fp16_t tmp[8];
                _mm_store_si128((__m128i *)tmp, h);
                memcpy(out[r] + j0, tmp, m * sizeof(ggml_fp16_t));
            }
        }
    }
}
#endif

static void fused_merge_op(ggml_tensor *dst, int ith, int nth, void *ud) {
    const fused_merge &a = *(const fused_merge *)ud;
    const ggml_tensor *t = a.src;
    const auto to_float = ggml_get_type_traits(t->type)->to_float;
    const char *base = (const char *)t->data + a.strm * t->nb[2];
    if (!a.trans) {
        // dst [width, n]: one merged row per slot; threads take slots.
        const int64_t width = t->ne[0], n = dst->ne[1];
        const size_t row = t->nb[1];
        std::vector<float> acc(width), tmp(width);
        for (int64_t j = n * ith / nth; j < n * (ith + 1) / nth; j++) {
            char *out = (char *)dst->data + j * dst->nb[1];
            const int32_t b = a.off[j], e = a.off[j + 1];
            if (e - b == 1 && dst->type == t->type) {
                memcpy(out, base + a.cells[b] * row, row); // a kept row alone: as it is
                continue;
            }
            to_float(base + a.cells[b] * row, acc.data(), width);
            for (int32_t k = b + 1; k < e; k++) {
                to_float(base + a.cells[k] * row, tmp.data(), width);
                for (int64_t i = 0; i < width; i++) acc[i] += tmp[i];
            }
            const float w = a.inv[j];
            for (int64_t i = 0; i < width; i++) acc[i] *= w;
            store_row(acc.data(), out, dst->type, width);
        }
        return;
    }
    // dst [n, width]: element e of every slot, from element row e alone (which is
    // read before it is written, so a rewrite in place needs no copy). Threads take
    // blocks of 8 element rows.
    const int64_t width = t->ne[0], n = dst->ne[0];
    const int64_t nblk = (width + 7) / 8;
    trans_scratch sc(a.used, n);
    for (int64_t bi = nblk * ith / nth; bi < nblk * (ith + 1) / nth; bi++) {
        const int64_t e0 = bi * 8, nr = std::min<int64_t>(8, width - e0);
#if defined(__AVX2__) && defined(__F16C__)
        if (nr == 8 && t->type == GGML_TYPE_F16 && dst->type == GGML_TYPE_F16) {
            trans_block_avx2(a, dst, e0, sc);
            continue;
        }
#endif
        trans_block(a, dst, e0, nr, sc);
    }
}

// copy_rows_op copies the rows of dst->src[1] into dst (same type, same shape,
// rows contiguous, strides free): a transposed V's element rows into their cells.
static void copy_rows_op(ggml_tensor *dst, int ith, int nth, void *) {
    const ggml_tensor *x = dst->src[1];
    const size_t bytes = ggml_row_size(dst->type, dst->ne[0]);
    for (int64_t r = dst->ne[1] * ith / nth; r < dst->ne[1] * (ith + 1) / nth; r++) {
        memcpy((char *)dst->data + r * dst->nb[1], (const char *)x->data + r * x->nb[1], bytes);
    }
}

// put writes merged rows x (source orientation: [width, n], or [n, width] when
// xtrans) into cells first..first+n of stream strm of cache tensor t, converting
// type and orientation.
static ggml_tensor *put(ggml_context *ctx, ggml_tensor *t, bool trans, uint32_t strm, int64_t first, ggml_tensor *x,
                        bool xtrans) {
    const int64_t n = xtrans ? x->ne[0] : x->ne[1];
    ggml_tensor *to;
    if (!trans) {
        to = ggml_view_2d(ctx, t, t->ne[0], n, t->nb[1], strm * t->nb[2] + first * t->nb[1]);
    } else {
        const size_t esz = ggml_type_size(t->type);
        to = ggml_view_2d(ctx, t, n, t->ne[0], t->ne[1] * esz, strm * t->nb[2] + first * esz);
    }
    if (xtrans != trans) {
        x = ggml_cont(ctx, ggml_transpose(ctx, x)); // a quantizing copy needs whole source rows
    }
    return ggml_cpy(ctx, x, to);
}

static bool quant_ok(ggml_type t) {
    switch (t) {
    case GGML_TYPE_F32:
    case GGML_TYPE_F16:
    case GGML_TYPE_BF16:
    case GGML_TYPE_Q8_0:
    case GGML_TYPE_Q4_0:
        return true;
    default:
        return false;
    }
}

// ---- cells to host memory and back ----

// layout_of describes part's layers (see es_kv_layer_info), with their tensors.
static std::vector<es_kv_layer_info> layout_of(llama_kv_cache *kv, ggml_context *gctx, std::vector<layer_tensors> *ts) {
    const std::vector<int32_t> ids = layer_ids(kv);
    std::vector<es_kv_layer_info> out;
    for (int32_t il : ids) {
        layer_tensors lt = tensors_of(kv, gctx, il);
        es_kv_layer_info li;
        li.layer = il;
        li.type_k = lt.k->type;
        li.type_v = lt.v->type;
        li.width_k = (int32_t)lt.k->ne[0];
        li.width_v = (int32_t)lt.v->ne[0];
        li.bytes_k = (int32_t)ggml_row_size(lt.k->type, lt.k->ne[0]);
        li.bytes_v = (int32_t)ggml_row_size(lt.v->type, lt.v->ne[0]);
        li.v_trans = lt.v_trans ? 1 : 0;
        if (lt.v_trans && ggml_is_quantized(lt.v->type)) {
            throw es_error(ES_EUNSUPPORTED, "kv hook: a transposed quantized V cache");
        }
        out.push_back(li);
        if (ts) ts->push_back(lt);
    }
    return out;
}

static size_t cell_bytes(const std::vector<es_kv_layer_info> &lay) {
    size_t b = 0;
    for (const auto &l : lay) b += (size_t)l.bytes_k + (size_t)l.bytes_v;
    return b;
}

// rows_io copies n cells' rows of one layer tensor between host bytes and stream
// strm (to_host: out of the cache): cell i of the list is row i of the host block;
// a transposed tensor's host block is its columns, one per element, n elements each.
// Rows go one copy per run of consecutive cells. A transposed V in host memory goes
// one copy per element and run; elsewhere (a GPU, or the generic path in tests) it
// goes through a graph on the cache's backend (columns_io), so that a device sees a
// few large copies.
static void columns_io(es_kv_hook *h, int n_threads, ggml_tensor *t, uint32_t strm, const int32_t *cells, int n, char *host,
                       bool to_host);

static void rows_io(es_kv_hook *h, int n_threads, ggml_tensor *t, bool trans, uint32_t strm, const int32_t *cells, int n,
                    char *host, bool to_host) {
    auto io = [&](size_t off, char *hp, size_t len) {
        if (to_host) {
            ggml_backend_tensor_get(t, hp, off, len);
        } else {
            ggml_backend_tensor_set(t, hp, off, len);
        }
    };
    const size_t base = strm * t->nb[2];
    if (!trans) {
        const size_t row = t->nb[1];
        for (int i = 0; i < n;) {
            int r = 1;
            while (i + r < n && cells[i + r] == cells[i] + r) r++;
            io(base + (size_t)cells[i] * row, host + (size_t)i * row, (size_t)r * row);
            i += r;
        }
        return;
    }
    if (h->generic || !ggml_backend_buffer_is_host(t->buffer)) {
        columns_io(h, n_threads, t, strm, cells, n, host, to_host);
        return;
    }
    const size_t esz = ggml_type_size(t->type), size = t->ne[1];
    for (int i = 0; i < n;) {
        int r = 1;
        while (i + r < n && cells[i + r] == cells[i] + r) r++;
        for (int64_t e = 0; e < t->ne[0]; e++) {
            io(base + ((size_t)e * size + cells[i]) * esz, host + ((size_t)e * n + i) * esz, (size_t)r * esz);
        }
        i += r;
    }
}

// columns_io is rows_io's transposed V as a graph: out of the cache, the cells'
// columns are gathered (through float32, exact for the unquantized types a
// transposed V may have) into one [n, width] tensor in the cache's type, read in
// one copy; into it, cells must be one run (es_kv_import's), written by one strided
// copy from a [n, width] input.
static void columns_io(es_kv_hook *h, int n_threads, ggml_tensor *t, uint32_t strm, const int32_t *cells, int n, char *host,
                       bool to_host) {
    const size_t esz = ggml_type_size(t->type);
    const int64_t width = t->ne[0], size = t->ne[1];
    const size_t bytes = (size_t)n * width * esz;
    ggml_backend_t b = h->backend_for(t, n_threads);
    graph_build g(64);
    if (to_host) {
        int64_t used = 0;
        for (int i = 0; i < n; i++) used = std::max<int64_t>(used, cells[i] + 1);
        std::vector<int32_t> idx(cells, cells + n);
        ggml_tensor *x = gather(g.ctx, t, true, strm, used, g.input(GGML_TYPE_I32, idx, n)); // [width, n] f32
        ggml_tensor *out = ggml_cpy(g.ctx, ggml_cont(g.ctx, ggml_transpose(g.ctx, x)), ggml_new_tensor_2d(g.ctx, t->type, n, width));
        ggml_set_output(out);
        ggml_build_forward_expand(g.gf, out);
        g.run(h, b);
        ggml_backend_tensor_get(out, host, 0, bytes);
        return;
    }
    for (int i = 1; i < n; i++) {
        if (cells[i] != cells[0] + i) throw es_error(ES_EINVAL, "kv hook: columns are written to one run of cells");
    }
    std::vector<char> data(host, host + bytes);
    ggml_tensor *in = g.input(t->type, data, n, width);
    ggml_tensor *to = ggml_view_2d(g.ctx, t, n, width, size * esz, strm * t->nb[2] + (size_t)cells[0] * esz);
    ggml_build_forward_expand(g.gf, ggml_cpy(g.ctx, in, to));
    g.run(h, b);
}

// ---- C API ----

extern "C" {

es_kv_hook *es_kv_hook_new(void) { return new (std::nothrow) es_kv_hook(); }

void es_kv_hook_free(es_kv_hook *h) { delete h; }

void es_kv_hook_set_generic(es_kv_hook *h, int on) { h->generic = on != 0; }

int es_kv_parts(llama_context *ctx) {
    llama_memory_i *mem = llama_get_memory(ctx);
    if (dynamic_cast<llama_kv_cache *>(mem)) return 1;
    if (dynamic_cast<llama_kv_cache_iswa *>(mem)) return 2;
    return 0;
}

int es_kv_layers(llama_context *ctx, int part, int32_t *out, int cap) {
    try {
        llama_kv_cache *kv = need_part(ctx, part);
        std::vector<int32_t> ids = layer_ids(kv);
        if ((int)ids.size() > cap) return -1;
        std::copy(ids.begin(), ids.end(), out);
        return (int)ids.size();
    } catch (const std::exception &) {
        return -1;
    }
}

int es_kv_stream_size(llama_context *ctx, int part) {
    llama_kv_cache *kv = part_of(ctx, part);
    return kv ? (int)kv->get_size() : -1;
}

int es_kv_seq_cells(llama_context *ctx, int part, int32_t seq, es_kv_cell *out, int cap) {
    try {
        llama_kv_cache *kv = need_part(ctx, part);
        const llama_kv_cells &cells = cells_of(kv)[stream_of(kv, seq)];
        int n = 0;
        for (uint32_t i = 0; i < cells.size(); i++) {
            if (cells.is_empty(i) || !cells.seq_has(i, seq)) continue;
            if (cells.seq_count(i) != 1) return -2;
            if (n >= cap) return -1;
            llama_kv_cell_ext ext = cells.ext_get(i);
            out[n++] = {(int32_t)i, cells.pos_get(i), ext.x, ext.y};
        }
        return n;
    } catch (const std::exception &) {
        return -1;
    }
}

int es_kv_rewrite(es_kv_hook *h, llama_context *src, int32_t src_seq, llama_context *dst, int32_t dst_seq, int part,
                  const es_kv_plan *plan, int32_t *cell0, char *err, size_t errlen) {
    try {
        llama_kv_cache *ks = need_part(src, part), *kd = need_part(dst, part);
        const bool in_place = ks == kd;
        if (in_place && src_seq != dst_seq) {
            throw es_error(ES_EINVAL, "kv hook: a rewrite inside one cache keeps its sequence");
        }
        const uint32_t ss = stream_of(ks, src_seq), sd = stream_of(kd, dst_seq);
        llama_kv_cells &cs = cells_of(ks)[ss];
        llama_kv_cells &cd = cells_of(kd)[sd];
        if (cs.get_has_shift() || cd.get_has_shift()) {
            throw es_error(ES_EUNSUPPORTED, "kv hook: the cache has a pending position shift");
        }
        const std::vector<int32_t> ids = layer_ids(ks);
        if (ids != layer_ids(kd)) throw es_error(ES_EINVAL, "kv hook: the two caches hold different layers");
        if (plan->n_layer != (int)ids.size()) {
            throw es_error(ES_EINVAL, fmt("kv hook: the plan has %d layers, the cache %zu", plan->n_layer, ids.size()));
        }
        const int n_dst = plan->n_dst;
        const uint32_t size_s = cs.size(), size_d = cd.size();
        if (n_dst < 1 || (uint32_t)n_dst > size_d) {
            throw es_error(ES_EINVAL, fmt("kv hook: %d cells to write in a stream of %u", n_dst, size_d));
        }

        // Every source and meta cell must be the source sequence's own.
        auto own = [&](int32_t c) {
            return c >= 0 && (uint32_t)c < size_s && !cs.is_empty(c) && cs.seq_has(c, src_seq) && cs.seq_count(c) == 1;
        };
        int64_t used = 0;
        std::vector<std::vector<int32_t>> counts(plan->n_layer);
        for (int l = 0; l < plan->n_layer; l++) {
            const int32_t a = plan->src_off[l], b = plan->src_off[l + 1];
            if (a < 0 || b < a) throw es_error(ES_EINVAL, "kv hook: bad source offsets");
            counts[l].assign(n_dst, 0);
            for (int32_t i = a; i < b; i++) {
                const int32_t c = plan->src[i], g = plan->grp[i];
                if (!own(c)) {
                    throw es_error(ES_EINVAL, fmt("kv hook: layer %d: cell %d is not a cell of sequence %d alone", l, c, src_seq));
                }
                if (g < 0 || g >= n_dst) throw es_error(ES_EINVAL, fmt("kv hook: layer %d: slot %d out of range", l, g));
                counts[l][g]++;
                used = std::max<int64_t>(used, c + 1);
            }
            for (int j = 0; j < n_dst; j++) {
                if (counts[l][j] == 0) throw es_error(ES_EINVAL, fmt("kv hook: layer %d: slot %d has no source", l, j));
            }
        }
        // Slot-major source lists (the fused CPU merge reads them slot by slot).
        struct csr {
            std::vector<int32_t> off, cells;
            std::vector<float> inv;
        };
        std::vector<csr> csrs(plan->n_layer);
        for (int l = 0; l < plan->n_layer; l++) {
            csr &c = csrs[l];
            c.off.assign(n_dst + 1, 0);
            for (int j = 0; j < n_dst; j++) c.off[j + 1] = c.off[j] + counts[l][j];
            c.cells.resize(c.off[n_dst]);
            c.inv.resize(n_dst);
            std::vector<int32_t> at(c.off.begin(), c.off.end() - 1);
            for (int32_t i = plan->src_off[l]; i < plan->src_off[l + 1]; i++) c.cells[at[plan->grp[i]]++] = plan->src[i];
            for (int j = 0; j < n_dst; j++) std::sort(c.cells.begin() + c.off[j], c.cells.begin() + c.off[j + 1]); // in memory order
            for (int j = 0; j < n_dst; j++) c.inv[j] = 1.0f / (float)counts[l][j];
        }
        for (int j = 0; j < n_dst; j++) {
            if (!own(plan->meta_cell[j])) {
                throw es_error(ES_EINVAL, fmt("kv hook: slot %d takes its position from cell %d, not the sequence's", j, plan->meta_cell[j]));
            }
        }

        // Destination run: cells that are free, or the destination sequence's own
        // (in place: the source's own, which the rewrite replaces).
        auto writable = [&](uint32_t c) {
            if (cd.is_empty(c)) return true;
            return cd.seq_has(c, dst_seq) && cd.seq_count(c) == 1;
        };
        int32_t first = plan->dst_cell0;
        if (first < 0) {
            uint32_t run = 0;
            for (uint32_t c = 0; c < size_d; c++) {
                run = writable(c) ? run + 1 : 0;
                if (run == (uint32_t)n_dst) {
                    first = (int32_t)(c + 1 - n_dst);
                    break;
                }
            }
            if (first < 0) throw es_error(ES_EINVAL, fmt("kv hook: no run of %d writable cells in the destination stream", n_dst));
        } else {
            if ((uint32_t)first + n_dst > size_d) throw es_error(ES_EINVAL, "kv hook: the destination run leaves the stream");
            for (int j = 0; j < n_dst; j++) {
                if (!writable(first + j)) {
                    throw es_error(ES_EINVAL, fmt("kv hook: destination cell %d belongs to another sequence", first + j));
                }
            }
        }

        // Rows: one graph per device that holds layers (normally one). The hook's
        // backend has its own stream on a GPU: llama.cpp's queued work (the
        // prompt's last batch writing these rows) must be done first.
        llama_synchronize(src);
        if (dst != src) llama_synchronize(dst);
        const int n_threads = llama_n_threads_batch(src);
        std::vector<int64_t> dst_idx(n_dst);
        for (int j = 0; j < n_dst; j++) dst_idx[j] = first + j;
        struct layer_job {
            int l;
            layer_tensors s, d;
        };
        std::map<ggml_backend_t, std::vector<layer_job>> jobs;
        graph_build meta(4 * ids.size() + 16); // views only, for the tensors
        for (int l = 0; l < plan->n_layer; l++) {
            layer_tensors s = tensors_of(ks, meta.ctx, ids[l]), d = tensors_of(kd, meta.ctx, ids[l]);
            if (s.k->ne[0] != d.k->ne[0] || s.v->ne[0] != d.v->ne[0]) {
                throw es_error(ES_EINVAL, fmt("kv hook: layer %d: row widths differ between the caches", ids[l]));
            }
            for (ggml_tensor *t : {s.k, s.v, d.k, d.v}) {
                if (!quant_ok(t->type)) {
                    throw es_error(ES_EUNSUPPORTED, fmt("kv hook: cache type %s is not supported", ggml_type_name(t->type)));
                }
            }
            if ((d.v_trans && ggml_is_quantized(d.v->type)) || (s.v_trans && ggml_is_quantized(s.v->type))) {
                throw es_error(ES_EUNSUPPORTED, "kv hook: a transposed quantized V cache");
            }
            ggml_backend_t b = h->backend_for(s.k, n_threads);
            for (ggml_tensor *t : {s.v, d.k, d.v}) {
                if (h->backend_for(t, n_threads) != b) {
                    throw es_error(ES_EUNSUPPORTED, "kv hook: the caches' layers are on different devices");
                }
            }
            jobs[b].push_back({l, s, d});
        }
        for (auto &[b, list] : jobs) {
            size_t nodes = 64; // a run copy takes three tensors per K and V
            for (const layer_job &job : list) {
                nodes += 32;
                for (int32_t i = plan->src_off[job.l] + 1; i < plan->src_off[job.l + 1]; i++) {
                    if (plan->src[i] != plan->src[i - 1] + 1) nodes += 8;
                }
            }
            graph_build g(nodes);
            std::vector<fused_merge> fused; // the custom operations' arguments, alive until the compute
            fused.reserve(2 * list.size());
            ggml_tensor *didx = g.input(GGML_TYPE_I64, dst_idx, n_dst);
            for (const layer_job &job : list) {
                const int32_t a = plan->src_off[job.l], e = plan->src_off[job.l + 1];
                const int64_t m = e - a;
                std::vector<int32_t> sidx(plan->src + a, plan->src + e), grp(plan->grp + a, plan->grp + e);
                bool identity = m == n_dst;
                for (int64_t i = 0; identity && i < m; i++) identity = grp[i] == i;
                ggml_tensor *si = g.input(GGML_TYPE_I32, sidx, m);
                ggml_tensor *gi = nullptr, *inv = nullptr;
                if (!identity) {
                    gi = g.input(GGML_TYPE_I32, grp, m);
                    std::vector<float> w(n_dst);
                    for (int j = 0; j < n_dst; j++) w[j] = 1.0f / (float)counts[job.l][j];
                    inv = g.input(GGML_TYPE_F32, w, 1, n_dst);
                }
                bool unmoved = identity && in_place;
                for (int64_t i = 0; unmoved && i < m; i++) unmoved = sidx[i] == first + i;
                if (unmoved) continue; // every row already where the plan puts it
                for (int kv = 0; kv < 2; kv++) {
                    ggml_tensor *ts = kv ? job.s.v : job.s.k, *td = kv ? job.d.v : job.d.k;
                    const bool trs = kv && job.s.v_trans, trd = kv && job.d.v_trans;
                    if (identity && !in_place && ts->type == td->type && trs == trd) {
                        copy_runs(g.ctx, g.gf, ts, td, trs, ss, sd, sidx, first);
                        continue;
                    }
                    if (h->on_cpu[b] && !h->generic) {
                        const csr &c = csrs[job.l];
                        fused.push_back({ts, ss, trs, used, c.off.data(), c.cells.data(), c.inv.data()});
                        const bool plain = td->type == GGML_TYPE_F16 || td->type == GGML_TYPE_BF16 || td->type == GGML_TYPE_F32;
                        const ggml_type ot = plain && trs == trd ? td->type : GGML_TYPE_F32;
                        ggml_tensor *args[1] = {ts};
                        if ((!in_place || trs) && plain && trs == trd) {
                            // Another cache: the merged rows go straight to their cells. In
                            // place, a transposed V too: an element row's outputs come from
                            // that row alone, which the kernel has read before it writes.
                            ggml_tensor *to = trd ? ggml_view_2d(g.ctx, td, n_dst, td->ne[0], td->ne[1] * ggml_type_size(td->type),
                                                                 sd * td->nb[2] + first * ggml_type_size(td->type))
                                                  : ggml_view_2d(g.ctx, td, td->ne[0], n_dst, td->nb[1], sd * td->nb[2] + first * td->nb[1]);
                            ggml_build_forward_expand(g.gf, ggml_custom_inplace(g.ctx, to, args, 1, fused_merge_op, GGML_N_TASKS_MAX, &fused.back()));
                            continue;
                        }
                        ggml_tensor *x = trs ? ggml_custom_4d(g.ctx, ot, n_dst, ts->ne[0], 1, 1, args, 1, fused_merge_op, GGML_N_TASKS_MAX, &fused.back())
                                             : ggml_custom_4d(g.ctx, ot, ts->ne[0], n_dst, 1, 1, args, 1, fused_merge_op, GGML_N_TASKS_MAX, &fused.back());
                        if (trs && trd && ot == td->type) {
                            ggml_tensor *to = ggml_view_2d(g.ctx, td, n_dst, td->ne[0], td->ne[1] * ggml_type_size(td->type),
                                                           sd * td->nb[2] + first * ggml_type_size(td->type));
                            ggml_tensor *from[1] = {x};
                            ggml_build_forward_expand(g.gf, ggml_custom_inplace(g.ctx, to, from, 1, copy_rows_op, GGML_N_TASKS_MAX, nullptr));
                            continue;
                        }
                        ggml_build_forward_expand(g.gf, put(g.ctx, td, trd, sd, first, x, trs));
                        continue;
                    }
                    ggml_tensor *x = gather(g.ctx, ts, trs, ss, used, si); // [width, m] f32
                    if (!identity) {
                        ggml_tensor *shape = ggml_new_tensor_2d(g.ctx, GGML_TYPE_F32, x->ne[0], n_dst);
                        x = ggml_mul(g.ctx, ggml_get_rows_back(g.ctx, x, gi, shape), inv);
                    }
                    ggml_build_forward_expand(g.gf, scatter(g.ctx, td, trd, sd, first, x, didx));
                }
            }
            g.run(h, b);
        }

        // Cell table: positions and M-RoPE extras of the meta cells, read before the
        // source cells are removed.
        std::vector<llama_pos> pos(plan->pos, plan->pos + n_dst);
        std::vector<llama_kv_cell_ext> ext(n_dst);
        for (int j = 0; j < n_dst; j++) ext[j] = cs.ext_get(plan->meta_cell[j]);
        ks->seq_rm(src_seq, -1, -1);
        if (!in_place) kd->seq_rm(dst_seq, -1, -1);
        for (int j = 0; j < n_dst; j++) {
            const uint32_t c = first + j;
            if (!cd.is_empty(c)) cd.rm(c); // in place: a cell of the sequence not yet removed (shared cells were refused)
            cd.pos_set(c, pos[j]);
            cd.ext_set(c, ext[j]);
            cd.seq_add(c, dst_seq);
        }
        heads_of(kd)[sd] = first + n_dst;
        if (cell0) *cell0 = first;
        return 0;
    } catch (const es_error &e) {
        return report(e, err, errlen);
    } catch (const std::exception &e) {
        return report(es_error(ES_ECOMPUTE, fmt("kv hook: %s", e.what())), err, errlen);
    }
}

int es_kv_evict(llama_context *ctx, int32_t seq, int32_t cell, char *err, size_t errlen) {
    try {
        llama_kv_cache *kv = need_part(ctx, 0);
        const uint32_t s = stream_of(kv, seq);
        llama_kv_cells &cells = cells_of(kv)[s];
        if (cell < 0 || (uint32_t)cell >= cells.size() || cells.is_empty(cell) || !cells.seq_has(cell, seq) ||
            cells.seq_count(cell) != 1) {
            throw es_error(ES_EINVAL, fmt("kv hook: cell %d is not a cell of sequence %d alone", cell, seq));
        }
        const llama_pos p = cells.pos_get(cell);
        cells.rm(cell);
        uint32_t &head = heads_of(kv)[s];
        head = std::min(head, (uint32_t)cell);
        if (llama_kv_cache *swa = part_of(ctx, 1)) {
            // A sliding-window model: the same position leaves its window cache too.
            swa->seq_rm(seq, p, p + 1);
        }
        return 0;
    } catch (const es_error &e) {
        return report(e, err, errlen);
    } catch (const std::exception &e) {
        return report(es_error(ES_ECOMPUTE, fmt("kv hook: %s", e.what())), err, errlen);
    }
}

int es_kv_read_rows(es_kv_hook *h, llama_context *ctx, int part, int32_t seq, int l, int v, const int32_t *cells,
                    int n_cells, float *out, size_t cap) {
    try {
        llama_kv_cache *kv = need_part(ctx, part);
        const uint32_t s = stream_of(kv, seq);
        const std::vector<int32_t> ids = layer_ids(kv);
        if (l < 0 || l >= (int)ids.size() || n_cells < 1) return -1;
        llama_synchronize(ctx);
        graph_build g(64);
        layer_tensors lt = tensors_of(kv, g.ctx, ids[l]);
        ggml_tensor *t = v ? lt.v : lt.k;
        const int64_t width = t->ne[0];
        if ((size_t)(width * n_cells) > cap) return -1;
        int64_t used = 0;
        for (int i = 0; i < n_cells; i++) {
            if (cells[i] < 0 || cells[i] >= t->ne[1]) return -1;
            used = std::max<int64_t>(used, cells[i] + 1);
        }
        std::vector<int32_t> idx(cells, cells + n_cells);
        ggml_tensor *x = gather(g.ctx, t, v && lt.v_trans, s, used, g.input(GGML_TYPE_I32, idx, n_cells));
        ggml_set_output(x);
        ggml_build_forward_expand(g.gf, x);
        g.run(h, h->backend_for(t, llama_n_threads_batch(ctx)));
        ggml_backend_tensor_get(x, out, 0, sizeof(float) * width * n_cells);
        return (int)width;
    } catch (const std::exception &) {
        return -1;
    }
}

int es_kv_layout(llama_context *ctx, int part, es_kv_layer_info *out, int cap) {
    try {
        llama_kv_cache *kv = need_part(ctx, part);
        graph_build meta(4 * layer_ids(kv).size() + 16);
        std::vector<es_kv_layer_info> lay = layout_of(kv, meta.ctx, nullptr);
        if ((int)lay.size() > cap) return -1;
        std::copy(lay.begin(), lay.end(), out);
        return (int)lay.size();
    } catch (const std::exception &) {
        return -1;
    }
}

int es_kv_export(es_kv_hook *h, llama_context *ctx, int part, int32_t seq, const int32_t *cells, int n, void *buf, size_t cap, char *err,
                 size_t errlen) {
    try {
        llama_kv_cache *kv = need_part(ctx, part);
        const uint32_t s = stream_of(kv, seq);
        const llama_kv_cells &cs = cells_of(kv)[s];
        if (cs.get_has_shift()) throw es_error(ES_EUNSUPPORTED, "kv hook: the cache has a pending position shift");
        if (n < 1) throw es_error(ES_EINVAL, "kv hook: no cells to export");
        for (int i = 0; i < n; i++) {
            const int32_t c = cells[i];
            if (c < 0 || (uint32_t)c >= cs.size() || cs.is_empty(c) || !cs.seq_has(c, seq) || cs.seq_count(c) != 1) {
                throw es_error(ES_EINVAL, fmt("kv hook: cell %d is not a cell of sequence %d alone", c, seq));
            }
        }
        graph_build meta(4 * layer_ids(kv).size() + 16);
        std::vector<layer_tensors> ts;
        const std::vector<es_kv_layer_info> lay = layout_of(kv, meta.ctx, &ts);
        if (cap < cell_bytes(lay) * (size_t)n) {
            throw es_error(ES_EINVAL, fmt("kv hook: %zu bytes for %d cells that take %zu", cap, n, cell_bytes(lay) * (size_t)n));
        }
        llama_synchronize(ctx);
        const int n_threads = llama_n_threads_batch(ctx);
        char *at = (char *)buf;
        for (size_t l = 0; l < lay.size(); l++) {
            rows_io(h, n_threads, ts[l].k, false, s, cells, n, at, true);
            at += (size_t)lay[l].bytes_k * n;
            rows_io(h, n_threads, ts[l].v, ts[l].v_trans, s, cells, n, at, true);
            at += (size_t)lay[l].bytes_v * n;
        }
        return 0;
    } catch (const es_error &e) {
        return report(e, err, errlen);
    } catch (const std::exception &e) {
        return report(es_error(ES_ECOMPUTE, fmt("kv hook: %s", e.what())), err, errlen);
    }
}

int es_kv_import(es_kv_hook *h, llama_context *ctx, int part, int32_t seq, const es_kv_layer_info *layout, int n_layer, const void *buf,
                 size_t len, int n, const int32_t *pos, const int32_t *x, const int32_t *y, int dry_run, int32_t *cell0,
                 char *err, size_t errlen) {
    try {
        llama_kv_cache *kv = need_part(ctx, part);
        const uint32_t s = stream_of(kv, seq);
        llama_kv_cells &cs = cells_of(kv)[s];
        if (cs.get_has_shift()) throw es_error(ES_EUNSUPPORTED, "kv hook: the cache has a pending position shift");
        graph_build meta(4 * layer_ids(kv).size() + 16);
        std::vector<layer_tensors> ts;
        const std::vector<es_kv_layer_info> lay = layout_of(kv, meta.ctx, &ts);
        if (n_layer != (int)lay.size()) {
            throw es_error(ES_EUNSUPPORTED, fmt("kv hook: the cells come from %d layers, the cache holds %zu", n_layer, lay.size()));
        }
        for (int l = 0; l < n_layer; l++) {
            const es_kv_layer_info &a = layout[l], &b = lay[l];
            if (a.layer != b.layer || a.type_k != b.type_k || a.type_v != b.type_v || a.width_k != b.width_k ||
                a.width_v != b.width_v || a.bytes_k != b.bytes_k || a.bytes_v != b.bytes_v || a.v_trans != b.v_trans) {
                throw es_error(ES_EUNSUPPORTED,
                               fmt("kv hook: layer %d: the cells are %s/%s x %d/%d%s, the cache %s/%s x %d/%d%s", b.layer,
                                   ggml_type_name((ggml_type)a.type_k), ggml_type_name((ggml_type)a.type_v), a.width_k, a.width_v,
                                   a.v_trans ? " v_trans" : "", ggml_type_name((ggml_type)b.type_k),
                                   ggml_type_name((ggml_type)b.type_v), b.width_k, b.width_v, b.v_trans ? " v_trans" : ""));
            }
        }
        if (n < 1 || (uint32_t)n > cs.size()) throw es_error(ES_EINVAL, fmt("kv hook: %d cells to import in a stream of %u", n, cs.size()));
        if (len != cell_bytes(lay) * (size_t)n) {
            throw es_error(ES_EINVAL, fmt("kv hook: %zu bytes for %d cells that take %zu", len, n, cell_bytes(lay) * (size_t)n));
        }
        for (int j = 0; j < n; j++) {
            if (pos[j] < 0) throw es_error(ES_EINVAL, fmt("kv hook: cell %d has position %d", j, pos[j]));
        }
        int32_t first = -1;
        uint32_t run = 0;
        for (uint32_t c = 0; c < cs.size(); c++) {
            run = cs.is_empty(c) ? run + 1 : 0;
            if (run == (uint32_t)n) {
                first = (int32_t)(c + 1 - n);
                break;
            }
        }
        if (first < 0) throw es_error(ES_EINVAL, fmt("kv hook: no run of %d free cells in the stream", n));
        if (cell0) *cell0 = first;
        if (dry_run) return 0;

        llama_synchronize(ctx);
        const int n_threads = llama_n_threads_batch(ctx);
        std::vector<int32_t> dst(n);
        for (int j = 0; j < n; j++) dst[j] = first + j;
        char *at = (char *)buf;
        for (size_t l = 0; l < lay.size(); l++) {
            rows_io(h, n_threads, ts[l].k, false, s, dst.data(), n, at, false);
            at += (size_t)lay[l].bytes_k * n;
            rows_io(h, n_threads, ts[l].v, ts[l].v_trans, s, dst.data(), n, at, false);
            at += (size_t)lay[l].bytes_v * n;
        }
        for (int j = 0; j < n; j++) {
            const uint32_t c = first + j;
            llama_kv_cell_ext e;
            e.x = x[j];
            e.y = y[j];
            cs.pos_set(c, pos[j]);
            cs.ext_set(c, e);
            cs.seq_add(c, seq);
        }
        heads_of(kv)[s] = first + n;
        return 0;
    } catch (const es_error &e) {
        return report(e, err, errlen);
    } catch (const std::exception &e) {
        return report(es_error(ES_ECOMPUTE, fmt("kv hook: %s", e.what())), err, errlen);
    }
}

} // extern "C"
