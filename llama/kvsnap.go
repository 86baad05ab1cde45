package llama

/*
#include <stdlib.h>
#include "llama.h"
#include "kvhook.h"
*/
import "C"

import (
	"fmt"
	"slices"
	"unsafe"
)

// LayerLayout is how one layer of a cache part stores a cell: its model layer, the
// GGML types and row widths (elements) of K and V, the bytes one cell takes in each
// (a transposed V: one element per column), and V's orientation.
type LayerLayout struct {
	Layer          int
	TypeK, TypeV   int32
	WidthK, WidthV int
	BytesK, BytesV int
	VTrans         bool
}

// PartSnapshot is a sequence's cells of one cache part copied to host memory in the
// cache's own row types: per layer (cache order) K holds the cells' K rows, one
// after another (len(Cells) * BytesK), and V their V rows or, for a transposed V,
// WidthV columns of len(Cells) elements each. Cells gives each cell's position and
// M-RoPE components (Index is the cell it was read from).
type PartSnapshot struct {
	Layers []LayerLayout
	K, V   [][]byte
	Cells  []Cell
}

// CellSnapshot is a sequence's cells in every part of a context's cache (one, or
// two for a sliding-window model), as ExportCells read them. ImportCells writes it
// back into a context whose cache has the same layout.
type CellSnapshot struct {
	Parts []PartSnapshot
}

// Bytes is the host memory the snapshot's rows and cell metadata take.
func (s *CellSnapshot) Bytes() int64 {
	var n int64
	for _, p := range s.Parts {
		for l := range p.K {
			n += int64(len(p.K[l]) + len(p.V[l]))
		}
		n += int64(len(p.Cells)) * int64(unsafe.Sizeof(Cell{}))
	}
	return n
}

// Cells is the number of cells of part 0 (the sequence's entries).
func (s *CellSnapshot) Cells() int {
	if len(s.Parts) == 0 {
		return 0
	}
	return len(s.Parts[0].Cells)
}

// CacheLayout lists how each layer of part's cache stores a cell.
func (c *Context) CacheLayout(part int) ([]LayerLayout, error) {
	n := c.model.info.Layers
	buf := make([]C.es_kv_layer_info, n)
	got := int(C.es_kv_layout(c.c, C.int(part), unsafe.SliceData(buf), C.int(n)))
	if got < 0 {
		return nil, &HookError{Code: 2, Msg: fmt.Sprintf("kv hook: the context has no cache part %d the hook knows", part)}
	}
	out := make([]LayerLayout, got)
	for i, b := range buf[:got] {
		out[i] = LayerLayout{Layer: int(b.layer), TypeK: int32(b.type_k), TypeV: int32(b.type_v),
			WidthK: int(b.width_k), WidthV: int(b.width_v), BytesK: int(b.bytes_k), BytesV: int(b.bytes_v), VTrans: b.v_trans != 0}
	}
	return out, nil
}

func cellBytes(layers []LayerLayout) int {
	n := 0
	for _, l := range layers {
		n += l.BytesK + l.BytesV
	}
	return n
}

// ExportCells copies seq's cells to host memory: cells[p] are the cells of part p
// to copy, in the order the snapshot keeps them (len(cells) must be CacheParts();
// an empty list copies none of that part). Every cell must be seq's alone. The
// cache is not changed. The rows are bytes in the cache's own types: no conversion,
// so ImportCells restores them bit for bit.
//
// Locking: the caller owns the context (the engine's loop goroutine).
func (c *Context) ExportCells(seq int, cells [][]int) (*CellSnapshot, error) {
	if np := c.CacheParts(); np == 0 || len(cells) != np {
		return nil, &HookError{Code: 1, Msg: fmt.Sprintf("kv hook: cells for %d cache parts, the context has %d", len(cells), np)}
	}
	snap := &CellSnapshot{Parts: make([]PartSnapshot, len(cells))}
	for part, want := range cells {
		p, err := c.exportPart(part, seq, want)
		if err != nil {
			return nil, err
		}
		snap.Parts[part] = *p
	}
	return snap, nil
}

func (c *Context) exportPart(part, seq int, want []int) (*PartSnapshot, error) {
	layers, err := c.CacheLayout(part)
	if err != nil {
		return nil, err
	}
	p := &PartSnapshot{Layers: layers, K: make([][]byte, len(layers)), V: make([][]byte, len(layers))}
	if len(want) == 0 {
		for l := range layers {
			p.K[l], p.V[l] = []byte{}, []byte{}
		}
		return p, nil
	}
	have, err := c.SeqCells(part, seq)
	if err != nil {
		return nil, &HookError{Code: 1, Msg: err.Error()}
	}
	for _, cell := range want {
		i, ok := slices.BinarySearchFunc(have, cell, func(h Cell, c int) int { return h.Index - c })
		if !ok {
			return nil, &HookError{Code: 1, Msg: fmt.Sprintf("kv hook: cell %d is not a cell of sequence %d", cell, seq)}
		}
		p.Cells = append(p.Cells, have[i])
	}
	n := len(want)
	// One Go buffer for the part (no Go pointers inside, so C may write it during
	// the call); the layers' slices are windows of it.
	flat := make([]byte, n*cellBytes(layers))
	idx := make([]C.int32_t, n)
	for i, cell := range want {
		idx[i] = C.int32_t(cell)
	}
	if err := hookCall(func(errBuf *C.char) C.int {
		return C.es_kv_export(c.hook, c.c, C.int(part), C.int32_t(seq), unsafe.SliceData(idx), C.int(n),
			unsafe.Pointer(unsafe.SliceData(flat)), C.size_t(len(flat)), errBuf, errBufLen)
	}); err != nil {
		return nil, err
	}
	at := 0
	for l, ly := range layers {
		p.K[l] = flat[at : at+n*ly.BytesK : at+n*ly.BytesK]
		at += n * ly.BytesK
		p.V[l] = flat[at : at+n*ly.BytesV : at+n*ly.BytesV]
		at += n * ly.BytesV
	}
	return p, nil
}

// ImportCells writes a snapshot into seq's stream: each part's cells go to the
// first run of free cells there, in the snapshot's order, with their positions and
// M-RoPE components, and join seq. It returns the first cell written per part.
// The context must have the cache layout the snapshot came from (same model, row
// types, widths and V orientation, part by part); anything else (another layout,
// no free run long enough, malformed bytes) is refused with a HookError before any
// part is touched. Only a failure of the copy itself (a HookError with Code 3,
// from the backend) can leave an earlier part's cells in seq; the caller then
// removes them.
//
// Locking: the caller owns the context (the engine's loop goroutine).
func (c *Context) ImportCells(seq int, s *CellSnapshot) ([]int, error) {
	if np := c.CacheParts(); np == 0 || len(s.Parts) != np {
		return nil, &HookError{Code: 2, Msg: fmt.Sprintf("kv hook: a snapshot of %d cache parts, the context has %d", len(s.Parts), np)}
	}
	firsts := make([]int, len(s.Parts))
	for _, dry := range []bool{true, false} {
		for part := range s.Parts {
			first, err := c.importPart(part, seq, &s.Parts[part], dry)
			if err != nil {
				return nil, err
			}
			firsts[part] = first
		}
	}
	return firsts, nil
}

func (c *Context) importPart(part, seq int, p *PartSnapshot, dry bool) (int, error) {
	n := len(p.Cells)
	if n == 0 {
		return -1, nil
	}
	if len(p.K) != len(p.Layers) || len(p.V) != len(p.Layers) {
		return 0, &HookError{Code: 1, Msg: fmt.Sprintf("kv hook: a snapshot part of %d layers has %d K and %d V blocks", len(p.Layers), len(p.K), len(p.V))}
	}
	lay := make([]C.es_kv_layer_info, len(p.Layers))
	size := 0
	for l, ly := range p.Layers {
		if len(p.K[l]) != n*ly.BytesK || len(p.V[l]) != n*ly.BytesV {
			return 0, &HookError{Code: 1, Msg: fmt.Sprintf("kv hook: layer %d of the snapshot has %d+%d bytes for %d cells", ly.Layer, len(p.K[l]), len(p.V[l]), n)}
		}
		vt := 0
		if ly.VTrans {
			vt = 1
		}
		lay[l] = C.es_kv_layer_info{layer: C.int32_t(ly.Layer), type_k: C.int32_t(ly.TypeK), type_v: C.int32_t(ly.TypeV),
			width_k: C.int32_t(ly.WidthK), width_v: C.int32_t(ly.WidthV), bytes_k: C.int32_t(ly.BytesK), bytes_v: C.int32_t(ly.BytesV), v_trans: C.int32_t(vt)}
		size += len(p.K[l]) + len(p.V[l])
	}
	pos, xs, ys := make([]C.int32_t, n), make([]C.int32_t, n), make([]C.int32_t, n)
	for j, cell := range p.Cells {
		pos[j], xs[j], ys[j] = C.int32_t(cell.Pos), C.int32_t(cell.X), C.int32_t(cell.Y)
	}
	var flat []byte
	if !dry {
		flat = make([]byte, 0, size) // the layers' blocks in one Go buffer, as es_kv_import reads them
		for l := range p.Layers {
			flat = append(flat, p.K[l]...)
			flat = append(flat, p.V[l]...)
		}
	}
	d := 0
	if dry {
		d = 1
	}
	var first C.int32_t
	err := hookCall(func(errBuf *C.char) C.int {
		return C.es_kv_import(c.hook, c.c, C.int(part), C.int32_t(seq), unsafe.SliceData(lay), C.int(len(lay)),
			unsafe.Pointer(unsafe.SliceData(flat)), C.size_t(size), C.int(n), unsafe.SliceData(pos), unsafe.SliceData(xs), unsafe.SliceData(ys),
			C.int(d), &first, errBuf, errBufLen)
	})
	return int(first), err
}

// hookCall runs a hook function that reports failure with a code and a message in
// errBuf, the one C allocation here, freed before it returns.
func hookCall(f func(errBuf *C.char) C.int) error {
	errBuf := (*C.char)(C.malloc(errBufLen))
	defer C.free(unsafe.Pointer(errBuf))
	if rc := f(errBuf); rc != 0 {
		return &HookError{Code: int(rc), Msg: C.GoString(errBuf)}
	}
	return nil
}
