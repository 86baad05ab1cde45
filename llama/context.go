package llama

/*
#include <stdlib.h>
#include "llama.h"
#include "elastic_hook.h"
#include "kvhook.h"
#include "teardown.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"
)

// ContextParams configures a llama context.
type ContextParams struct {
	NCtx      int // total cells; with Unified false each sequence gets NCtx/NSeqMax
	NBatch    int
	NUBatch   int
	NSeqMax   int
	Threads   int
	FlashAttn bool
	// Unified puts all sequences in one cell pool; false gives one stream per sequence.
	Unified bool
	// Capture installs the attention-capture hook. It is idle until enabled per decode,
	// but it requires FlashAttn false to see attention probabilities.
	Capture bool
	// TypeK / TypeV: "f16" (default), "f32", "bf16", "q8_0" or "q4_0". A quantized
	// V needs FlashAttn (llama.cpp stores V transposed without it, and never
	// quantizes a transposed V).
	TypeK, TypeV string
}

// Context is a llama context: the KV cache and the decode state. Not safe for concurrent use.
type Context struct {
	c       *C.struct_llama_context
	model   *Model
	params  ContextParams
	capture *C.es_capture
	// hook holds the cell operations' backends and graph allocator (kvhook.go).
	hook    *C.es_kv_hook
	nCtxSeq int
}

// The cache type ids kvstate.go uses are ggml's (a constant index out of range
// does not compile).
var (
	_ = [1]int{}[C.GGML_TYPE_F32-typeF32]
	_ = [1]int{}[C.GGML_TYPE_F16-typeF16]
	_ = [1]int{}[C.GGML_TYPE_BF16-typeBF16]
	_ = [1]int{}[C.GGML_TYPE_Q8_0-typeQ8_0]
	_ = [1]int{}[C.GGML_TYPE_Q4_0-typeQ4_0]
)

func ggmlType(s string) (C.enum_ggml_type, error) {
	t, ok := typeByName(s)
	if !ok {
		return 0, fmt.Errorf("unsupported KV cache type %q (f16, f32, bf16, q8_0, q4_0)", s)
	}
	return C.enum_ggml_type(t), nil
}

// NewContext creates a context on the model.
func NewContext(m *Model, p ContextParams) (*Context, error) {
	if p.NSeqMax < 1 {
		p.NSeqMax = 1
	}
	if p.NBatch <= 0 {
		p.NBatch = 512
	}
	if p.NUBatch <= 0 || p.NUBatch > p.NBatch {
		p.NUBatch = p.NBatch
	}
	if p.Capture && p.FlashAttn {
		return nil, errors.New("attention capture needs flash attention off")
	}
	tk, tv, err := cacheTypes(m, p)
	if err != nil {
		return nil, err
	}
	cp := C.llama_context_default_params()
	cp.n_ctx = C.uint32_t(p.NCtx)
	cp.n_batch = C.uint32_t(p.NBatch)
	cp.n_ubatch = C.uint32_t(p.NUBatch)
	cp.n_seq_max = C.uint32_t(p.NSeqMax)
	if p.Threads > 0 {
		cp.n_threads = C.int32_t(p.Threads)
		cp.n_threads_batch = C.int32_t(p.Threads)
	}
	cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
	if p.FlashAttn {
		cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
	}
	cp.kv_unified = C.bool(p.Unified)
	cp.type_k, cp.type_v = tk, tv
	cp.no_perf = true

	ctx := &Context{model: m, params: p}
	// The hook is always installed: besides capture it records the attended range.
	nCells, nStream := p.streamCells()
	ctx.capture = C.es_capture_new(C.int(m.info.Layers), C.int(nCells), C.int(nStream))
	if ctx.capture == nil {
		return nil, errors.New("allocate capture buffer")
	}
	cp.cb_eval = C.ggml_backend_sched_eval_callback(C.es_eval_cb)
	cp.cb_eval_user_data = unsafe.Pointer(ctx.capture)

	ctx.hook = C.es_kv_hook_new()
	if ctx.hook == nil {
		C.es_capture_free(ctx.capture)
		return nil, errors.New("allocate the KV hook")
	}
	ctx.c = C.llama_init_from_model(m.c, cp)
	if ctx.c == nil {
		C.es_capture_free(ctx.capture)
		C.es_kv_hook_free(ctx.hook)
		return nil, fmt.Errorf("llama.cpp could not create a context (n_ctx=%d, n_seq_max=%d)", p.NCtx, p.NSeqMax)
	}
	ctx.nCtxSeq = int(C.llama_n_ctx_seq(ctx.c))
	if ctx.nCtxSeq > nCells {
		ctx.Close()
		return nil, fmt.Errorf("llama.cpp gave a stream %d cells, the capture buffer holds %d", ctx.nCtxSeq, nCells)
	}
	return ctx, nil
}

// cacheTypes is the K and V row types of p, refused where llama.cpp would build a
// cache it cannot use.
func cacheTypes(m *Model, p ContextParams) (tk, tv C.enum_ggml_type, err error) {
	if tk, err = ggmlType(p.TypeK); err != nil {
		return tk, tv, err
	}
	if tv, err = ggmlType(p.TypeV); err != nil {
		return tk, tv, err
	}
	if quantized(int32(tv)) && !p.FlashAttn {
		// llama.cpp refuses it too (llama_init_from_model), with a log line only.
		return tk, tv, fmt.Errorf("a quantized V cache (%s) needs flash attention", typeName(int32(tv)))
	}
	// A quantized head must be whole blocks: llama.cpp only checks this when flash
	// attention is "auto"; otherwise its per-head views get truncated row sizes
	// (ggml_row_size checks divisibility with a debug-only assert).
	kd, vd := m.kvHeadDims()
	for _, c := range []struct {
		what string
		t    C.enum_ggml_type
		dim  int
	}{{"K", tk, kd}, {"V", tv, vd}} {
		if ti := kvTypes[int32(c.t)]; ti.blck > 1 && c.dim%ti.blck != 0 {
			return tk, tv, fmt.Errorf("a %s cache of type %s needs attention heads of a multiple of %d elements (the model's are %d)",
				c.what, ti.name, ti.blck, c.dim)
		}
	}
	return tk, tv, nil
}

// streamCells is the cells of one KV stream and the number of streams, as
// llama_context pads them (v0.17.4: n_ctx up to a multiple of 256, then a stream's
// share up to one).
func (p ContextParams) streamCells() (cells, streams int) {
	pad := func(n int) int { return (n + 255) / 256 * 256 }
	if p.Unified {
		return pad(p.NCtx), 1
	}
	return pad(pad(p.NCtx) / p.NSeqMax), p.NSeqMax
}

// Close frees the context and its hook buffers.
func (c *Context) Close() {
	if c == nil || c.c == nil {
		return
	}
	C.es_context_free(c.c) // llama_free, scheduler first (teardown.h)
	C.es_capture_free(c.capture)
	C.es_kv_hook_free(c.hook)
	c.c, c.capture, c.hook = nil, nil, nil
}

// Model returns the context's model.
func (c *Context) Model() *Model { return c.model }

// Params returns the parameters the context was made with.
func (c *Context) Params() ContextParams { return c.params }

// NCtx is the total number of cells.
func (c *Context) NCtx() int { return int(C.llama_n_ctx(c.c)) }

// NCtxSeq is the number of cells one sequence can use.
func (c *Context) NCtxSeq() int { return c.nCtxSeq }

func (c *Context) mem() C.llama_memory_t { return C.llama_get_memory(c.c) }

// SeqRemove removes positions [p0, p1) of seq (p1 < 0: to the end). seq < 0: all sequences.
func (c *Context) SeqRemove(seq int, p0, p1 int) bool {
	return bool(C.llama_memory_seq_rm(c.mem(), C.llama_seq_id(seq), C.llama_pos(p0), C.llama_pos(p1)))
}

// SeqClear removes every cell of seq.
func (c *Context) SeqClear(seq int) { c.SeqRemove(seq, -1, -1) }

// SeqPosMin is the smallest position held by seq, or -1 when empty.
func (c *Context) SeqPosMin(seq int) int {
	return int(C.llama_memory_seq_pos_min(c.mem(), C.llama_seq_id(seq)))
}

// SeqPosMax is the largest position held by seq, or -1 when empty.
func (c *Context) SeqPosMax(seq int) int {
	return int(C.llama_memory_seq_pos_max(c.mem(), C.llama_seq_id(seq)))
}

// ClearAll empties the whole cache.
func (c *Context) ClearAll() { C.llama_memory_clear(c.mem(), C.bool(true)) }

// Decode runs one batch. It returns an error when no cell is free (ErrNoKVSlot) or
// llama.cpp fails.
func (c *Context) Decode(b *Batch) error {
	if b.Len() == 0 {
		return nil
	}
	b.layoutMRoPE()
	rc := C.llama_decode(c.c, b.c)
	switch {
	case rc == 0:
		return nil
	case rc == 1:
		return ErrNoKVSlot
	case rc == 2:
		return errors.New("decode aborted")
	default:
		return fmt.Errorf("llama_decode failed (%d)", int(rc))
	}
}

// ErrNoKVSlot means the KV cache had no room for the batch.
var ErrNoKVSlot = errors.New("no free KV cells for the batch")

// Logits returns the logits of the i-th output row of the last decode (batch index i
// whose logits flag was set). The slice aliases llama.cpp memory until the next decode.
func (c *Context) Logits(i int) []float32 {
	p := C.llama_get_logits_ith(c.c, C.int32_t(i))
	if p == nil {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(p)), c.model.info.VocabSize)
}

// SetCausal switches causal attention (images of some models need it off).
func (c *Context) SetCausal(on bool) { C.llama_set_causal_attn(c.c, C.bool(on)) }

// ---- attention capture ----

// CaptureEnable turns accumulation of attention column sums on or off. A batch
// may hold several sequences: on a unified cache a query row attends only its own
// sequence's cells, so a cell's sum comes from its sequence's rows alone; with a
// stream per sequence each sequence's rows and cells are summed in its stream.
func (c *Context) CaptureEnable(on bool) {
	if on && c.params.FlashAttn {
		return
	}
	v := 0
	if on {
		v = 1
	}
	c.capture.enabled = C.int(v)
}

// CaptureReset zeroes the accumulated sums of every stream.
func (c *Context) CaptureReset() { C.es_capture_reset(c.capture) }

// streamOf is the KV stream that holds sequence seq.
func (c *Context) streamOf(seq int) int {
	if c.params.Unified {
		return 0
	}
	return seq
}

// CaptureRows is the number of query rows accumulated (layer 0) since the last
// reset in seq's stream (every sequence's on a unified cache).
func (c *Context) CaptureRows(seq int) int {
	s := c.streamOf(seq)
	if s < 0 || s >= int(c.capture.n_stream) {
		return 0
	}
	return int(unsafe.Slice(c.capture.rows, int(c.capture.n_stream))[s])
}

// CaptureSums copies the accumulated column sums of the first nCells cells of
// seq's stream, per layer: the attention that seq's query rows gave each of its
// cells (on a unified cache, cell indices are the whole cache's).
func (c *Context) CaptureSums(seq, nCells int) ([][]float32, error) {
	if c.capture.bad_stream != 0 {
		return nil, errors.New("attention capture met an attention tensor whose KV streams it could not tell apart")
	}
	total, layers, s := int(c.capture.n_cells), int(c.capture.n_layer), c.streamOf(seq)
	if nCells > total {
		return nil, fmt.Errorf("capture: %d cells requested, %d tracked", nCells, total)
	}
	if s < 0 || s >= int(c.capture.n_stream) {
		return nil, fmt.Errorf("capture: sequence %d has no stream (%d streams)", seq, int(c.capture.n_stream))
	}
	all := unsafe.Slice((*float32)(unsafe.Pointer(c.capture.sums)), int(c.capture.n_stream)*layers*total)
	out := make([][]float32, layers)
	for l := range out {
		off := (s*layers + l) * total
		out[l] = append([]float32(nil), all[off:off+nCells]...)
	}
	return out, nil
}

// LastAttendedRange is n_kv of the last graph: how many cells attention spanned (padded).
func (c *Context) LastAttendedRange() int { return int(c.capture.last_n_kv) }

// ---- batches ----

// Batch is a llama_batch of tokens or embeddings. Free it with Close.
type Batch struct {
	c       C.struct_llama_batch
	cap     int
	embd    int
	nSeqMax int
	// mrope: an embedding batch of an M-RoPE model, whose pos array holds
	// mropePos components per entry, component-major (llama.cpp's layout: the
	// n entries' first components, then their second, ...); extra holds
	// components 1..3 of each entry until Decode lays them out.
	mrope bool
	extra []int32
}

// mropePos is the number of position components per entry that llama.cpp reads
// from an embedding batch of an M-RoPE model (llama_batch_allocr n_pos_per_embd).
const mropePos = 4

// NewBatch allocates a batch for up to n tokens (embd == 0) or n embeddings of size embd.
func NewBatch(n, embd, nSeqMax int) *Batch {
	return &Batch{c: C.llama_batch_init(C.int32_t(n), C.int32_t(embd), C.int32_t(nSeqMax)), cap: n, embd: embd, nSeqMax: nSeqMax}
}

// NewBatchMRoPE allocates an embedding batch for an M-RoPE model (Vision.MRoPE):
// entries are added with AddEmbdMRoPE, each with its own grid position. A token
// batch needs nothing special (llama.cpp gives a token's one position to every
// component), so use NewBatch for those.
func NewBatchMRoPE(n, embd, nSeqMax int) *Batch {
	if embd <= 0 {
		panic("llama: an M-RoPE batch holds embeddings")
	}
	b := NewBatch(n, embd, nSeqMax)
	// llama_batch_free frees pos with free(): replace it with a malloc'ed array
	// of mropePos components per entry.
	C.free(unsafe.Pointer(b.c.pos))
	b.c.pos = (*C.llama_pos)(C.malloc(C.size_t(mropePos*n) * C.size_t(unsafe.Sizeof(C.llama_pos(0)))))
	b.mrope = true
	b.extra = make([]int32, (mropePos-1)*n)
	return b
}

// Close frees the batch.
func (b *Batch) Close() {
	if b != nil && b.cap > 0 {
		C.llama_batch_free(b.c)
		b.cap = 0
	}
}

// Len is the number of entries added since the last Clear.
func (b *Batch) Len() int { return int(b.c.n_tokens) }

// Cap is the batch's capacity.
func (b *Batch) Cap() int { return b.cap }

// Clear empties the batch.
func (b *Batch) Clear() { b.c.n_tokens = 0 }

// Add appends a token at pos for seq; logits asks for an output row. It returns the
// index of the entry, which is the row index for Logits when logits is true.
func (b *Batch) Add(tok Token, pos, seq int, logits bool) int {
	i := int(b.c.n_tokens)
	if i >= b.cap || b.embd != 0 {
		panic("llama: token batch full or embedding batch")
	}
	unsafe.Slice(b.c.token, b.cap)[i] = C.llama_token(tok)
	b.setMeta(i, pos, seq, logits)
	return i
}

// AddEmbd appends one embedding row. In an M-RoPE batch every component of its
// position is pos (llama.cpp's rule for a 1-D run).
func (b *Batch) AddEmbd(row []float32, pos, seq int, logits bool) int {
	if b.mrope {
		return b.AddEmbdMRoPE(row, pos, pos, pos, seq, logits)
	}
	return b.addEmbd(row, pos, seq, logits)
}

// AddEmbdMRoPE appends one embedding row of an image at M-RoPE position (t, y, x):
// for the embedding in row r, column c of an image that starts at position p0,
// llama.cpp's mtmd helper uses (p0, p0+r, p0+c). t is the position the cell holds
// (the causal mask compares it); y and x are kept in the cell too.
func (b *Batch) AddEmbdMRoPE(row []float32, t, y, x, seq int, logits bool) int {
	if !b.mrope {
		panic("llama: not an M-RoPE batch")
	}
	i := b.addEmbd(row, t, seq, logits)
	n := b.cap
	b.extra[i], b.extra[n+i], b.extra[2*n+i] = int32(y), int32(x), 0 // the 4th component is unused
	return i
}

func (b *Batch) addEmbd(row []float32, pos, seq int, logits bool) int {
	i := int(b.c.n_tokens)
	if i >= b.cap || b.embd == 0 || len(row) != b.embd {
		panic("llama: embedding batch full or wrong row size")
	}
	dst := unsafe.Slice((*float32)(unsafe.Pointer(b.c.embd)), b.cap*b.embd)
	copy(dst[i*b.embd:(i+1)*b.embd], row)
	b.setMeta(i, pos, seq, logits)
	return i
}

func (b *Batch) setMeta(i, pos, seq int, logits bool) {
	unsafe.Slice(b.c.pos, b.cap)[i] = C.llama_pos(pos)
	unsafe.Slice(b.c.n_seq_id, b.cap)[i] = 1
	seqIDs := unsafe.Slice(b.c.seq_id, b.cap)
	unsafe.Slice(seqIDs[i], b.nSeqMax)[0] = C.llama_seq_id(seq)
	var l C.int8_t
	if logits {
		l = 1
	}
	unsafe.Slice(b.c.logits, b.cap)[i] = l
	b.c.n_tokens++
}

// Pos is the position of entry i (its first component under M-RoPE).
func (b *Batch) Pos(i int) int {
	if i < 0 || i >= b.Len() {
		panic("llama: batch entry out of range")
	}
	return int(unsafe.Slice(b.c.pos, b.cap)[i])
}

// layoutMRoPE writes components 1..3 of an M-RoPE batch's n entries after their
// first components, as llama.cpp reads them: pos[k*n + i] is component k of entry i.
func (b *Batch) layoutMRoPE() {
	if !b.mrope {
		return
	}
	n, all := b.Len(), unsafe.Slice(b.c.pos, mropePos*b.cap)
	for k := 1; k < mropePos; k++ {
		src := b.extra[(k-1)*b.cap : (k-1)*b.cap+n]
		for i, v := range src {
			all[k*n+i] = C.llama_pos(v)
		}
	}
}
