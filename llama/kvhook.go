package llama

/*
#cgo CXXFLAGS: -std=c++17
#include <stdlib.h>
#include "llama.h"
#include "kvhook.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"
)

// This file is the KV hook's Go face: cell operations that run inside llama.cpp's
// own cache (kvhook.cpp), on the backend that holds it. Go hands over plans (which
// cells become which, at which positions); no row crosses through Go.

// Cell is one cell of a sequence: its index in the sequence's stream, its position
// and, for an M-RoPE model, its extra components (an image entry's column X and
// row Y).
type Cell struct {
	Index, Pos, X, Y int
}

// CacheParts is the number of caches the context keeps: 1, or 2 for a
// sliding-window model (part 0 the full-attention layers', part 1 the
// sliding-window layers'); 0 when the hook does not know its memory.
func (c *Context) CacheParts() int { return int(C.es_kv_parts(c.c)) }

// CacheLayers lists the model layers that part's cache holds, in cache order.
func (c *Context) CacheLayers(part int) ([]int, error) {
	n := c.model.info.Layers
	buf := make([]C.int32_t, n)
	got := int(C.es_kv_layers(c.c, C.int(part), unsafe.SliceData(buf), C.int(n)))
	if got < 0 {
		return nil, fmt.Errorf("kv hook: the context has no cache part %d", part)
	}
	out := make([]int, got)
	for i := range out {
		out[i] = int(buf[i])
	}
	return out, nil
}

// SeqCells reads seq's cells in part from llama.cpp's cell table, ascending by index.
func (c *Context) SeqCells(part, seq int) ([]Cell, error) {
	size := int(C.es_kv_stream_size(c.c, C.int(part)))
	if size < 0 {
		return nil, fmt.Errorf("kv hook: the context has no cache part %d", part)
	}
	buf := make([]C.es_kv_cell, size)
	n := int(C.es_kv_seq_cells(c.c, C.int(part), C.int32_t(seq), unsafe.SliceData(buf), C.int(size)))
	switch {
	case n == -2:
		return nil, fmt.Errorf("kv hook: sequence %d shares cells with another sequence", seq)
	case n < 0:
		return nil, fmt.Errorf("kv hook: cannot read the cells of sequence %d", seq)
	}
	out := make([]Cell, n)
	for i, b := range buf[:n] {
		out[i] = Cell{Index: int(b.cell), Pos: int(b.pos), X: int(b.x), Y: int(b.y)}
	}
	return out, nil
}

// CellPlan says what a sequence's cells in one cache part become: N cells, written
// contiguously from cell First of the destination stream (First < 0: the first run
// of N cells that are free or the destination sequence's own). In cache layer l
// (CacheLayers order), cell j becomes the mean of the source cells Sources[l][j]
// (one or more, each counted once per occurrence), computed in float32 and stored
// once in the destination's row type. Cell j gets position Pos[j] and the M-RoPE
// components of source cell Meta[j].
type CellPlan struct {
	Part    int
	N       int
	First   int
	Sources [][][]int // [layer][cell j] source cells
	Meta    []int
	Pos     []int
}

// HookError is a cell operation llama.cpp's cache was not changed by: what was
// asked does not fit the cache (Invalid), or the hook cannot do it (the cache's
// layout, the backend). The sequence is as it was.
type HookError struct {
	Code int // 1 invalid plan, 2 unsupported cache, 3 compute failure
	Msg  string
}

func (e *HookError) Error() string { return e.Msg }

// Invalid reports whether the plan itself was refused (the caller's bookkeeping
// disagrees with the cache).
func (e *HookError) Invalid() bool { return e.Code == 1 }

const errBufLen = 512

// RewriteCells replaces dstSeq's cells in plan.Part of dst with the plan's rows, read
// from seq's cells of c, and removes seq's cells there; dst may be c (then dstSeq
// must be seq). It returns the first cell written. A sequence in a context with a
// sliding-window part must be moved part by part (its part 1 as a copy).
func (c *Context) RewriteCells(seq int, dst *Context, dstSeq int, plan *CellPlan) (int, error) {
	if len(plan.Sources) == 0 || plan.N < 1 || len(plan.Meta) != plan.N || len(plan.Pos) != plan.N {
		return 0, &HookError{Code: 1, Msg: "kv hook: a plan needs sources, metadata and positions for its cells"}
	}
	var src, grp []C.int32_t
	off := make([]C.int32_t, 0, len(plan.Sources)+1)
	for _, layer := range plan.Sources {
		off = append(off, C.int32_t(len(src)))
		if len(layer) != plan.N {
			return 0, &HookError{Code: 1, Msg: fmt.Sprintf("kv hook: a layer of the plan has %d cells, the plan %d", len(layer), plan.N)}
		}
		for j, from := range layer {
			for _, cell := range from {
				src = append(src, C.int32_t(cell))
				grp = append(grp, C.int32_t(j))
			}
		}
	}
	off = append(off, C.int32_t(len(src)))
	meta, pos := make([]C.int32_t, plan.N), make([]C.int32_t, plan.N)
	for j := range plan.N {
		meta[j], pos[j] = C.int32_t(plan.Meta[j]), C.int32_t(plan.Pos[j])
	}
	// The arrays go to C in one allocation, freed here (cgo may not keep Go
	// pointers to Go pointers; these are flat, but one block keeps it visible).
	arrays := [][]C.int32_t{src, grp, off, meta, pos}
	total := 0
	for _, a := range arrays {
		total += len(a)
	}
	block := (*C.int32_t)(C.malloc(C.size_t(max(total, 1)) * C.size_t(unsafe.Sizeof(C.int32_t(0)))))
	defer C.free(unsafe.Pointer(block))
	all := unsafe.Slice(block, max(total, 1))
	ptrs := make([]*C.int32_t, len(arrays))
	at := 0
	for i, a := range arrays {
		copy(all[at:], a)
		ptrs[i] = (*C.int32_t)(unsafe.Add(unsafe.Pointer(block), at*int(unsafe.Sizeof(C.int32_t(0)))))
		at += len(a)
	}
	cp := C.es_kv_plan{
		n_layer: C.int(len(plan.Sources)), n_dst: C.int(plan.N),
		src: ptrs[0], grp: ptrs[1], src_off: ptrs[2], meta_cell: ptrs[3], pos: ptrs[4],
		dst_cell0: C.int32_t(plan.First),
	}
	var first C.int32_t
	errBuf := (*C.char)(C.malloc(errBufLen))
	defer C.free(unsafe.Pointer(errBuf))
	rc := C.es_kv_rewrite(c.hook, c.c, C.int32_t(seq), dst.c, C.int32_t(dstSeq), C.int(plan.Part), &cp, &first, errBuf, errBufLen)
	if rc != 0 {
		return 0, &HookError{Code: int(rc), Msg: C.GoString(errBuf)}
	}
	return int(first), nil
}

// SetHookGeneric makes the KV hook run its device graph (get_rows, get_rows_back,
// mul, set_rows: what CUDA runs) on the CPU too, instead of the CPU's fused merge.
// For tests: both must give the same rows.
func (c *Context) SetHookGeneric(on bool) {
	v := 0
	if on {
		v = 1
	}
	C.es_kv_hook_set_generic(c.hook, C.int(v))
}

// EvictCell removes one cell of seq (in a sliding-window model, also that cell's
// position from the window cache).
func (c *Context) EvictCell(seq, cell int) error {
	errBuf := (*C.char)(C.malloc(errBufLen))
	defer C.free(unsafe.Pointer(errBuf))
	if rc := C.es_kv_evict(c.c, C.int32_t(seq), C.int32_t(cell), errBuf, errBufLen); rc != 0 {
		return &HookError{Code: int(rc), Msg: C.GoString(errBuf)}
	}
	return nil
}

// ReadCellRows reads the K (v false) or V rows of the given cells of seq's stream
// in cache layer l of part as float32, one row per cell: what the attention reads
// (a quantized row decoded). It does not change the cache.
func (c *Context) ReadCellRows(part, seq, l int, v bool, cells []int) ([][]float32, error) {
	if len(cells) == 0 {
		return nil, errors.New("kv hook: no cells to read")
	}
	idx := (*C.int32_t)(C.malloc(C.size_t(len(cells)) * C.size_t(unsafe.Sizeof(C.int32_t(0)))))
	defer C.free(unsafe.Pointer(idx))
	for i, cell := range cells {
		unsafe.Slice(idx, len(cells))[i] = C.int32_t(cell)
	}
	width := c.model.info.Embd * 4 // wide enough for any K or V row of the model (checked by C)
	if kd, vd := c.model.kvHeadDims(); max(kd, vd)*c.model.info.KVHeads > width {
		width = max(kd, vd) * c.model.info.KVHeads
	}
	n := width * len(cells)
	out := (*C.float)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.float(0)))))
	defer C.free(unsafe.Pointer(out))
	vi := 0
	if v {
		vi = 1
	}
	w := int(C.es_kv_read_rows(c.hook, c.c, C.int(part), C.int32_t(seq), C.int(l), C.int(vi), idx, C.int(len(cells)), out, C.size_t(n)))
	if w <= 0 {
		return nil, fmt.Errorf("kv hook: cannot read layer %d's rows of sequence %d", l, seq)
	}
	flat := unsafe.Slice((*float32)(unsafe.Pointer(out)), w*len(cells))
	rows := make([][]float32, len(cells))
	for i := range rows {
		rows[i] = append([]float32(nil), flat[i*w:(i+1)*w]...)
	}
	return rows, nil
}
