package llama

/*
#include <stdlib.h>
#include "llama.h"
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"unsafe"
)

// This file reads (and writes) one sequence's cells through llama.cpp's public
// per-sequence state calls, decoding and encoding rows with codecs of its own. It
// was the KV hook's rewrite path until the hook moved inside llama.cpp's cache
// (kvhook.go); the engine no longer calls it. It stays as the tests' oracle: a
// reader of the cache that shares no code with the hook's ggml graphs (the state
// serialization and these codecs against get_rows and the fused merge).
//
// Layout (llama_kv_cache::state_write, v0.17.4):
//   u32 n_stream; per stream: u32 cell_count; if cell_count > 0:
//     per cell: i32 pos, u32 n_seq, n_seq x i32 seq_id
//     u32 v_trans, u32 n_layer
//     per layer K: i32 type, u64 row_size, cell_count rows
//     per layer V: v_trans == 0: i32 type, u64 row_size, cell_count rows
//                  v_trans == 1: i32 type, u32 elem_size, u32 n_embd_v, then per element cell_count values
//   A row of a block-quantized type (q8_0, q4_0) is row_size/block_bytes blocks of
//   32 elements; V is only quantized with flash attention on, so never transposed.

// GGML type ids used in the state (ggml.h enum ggml_type; context.go checks them
// against the C enum at compile time).
const (
	typeF32  = 0
	typeF16  = 1
	typeQ4_0 = 2
	typeQ8_0 = 8
	typeBF16 = 30
)

// qk is the block size (elements) of the block-quantized types q8_0 and q4_0.
const qk = 32

// kvType describes a cache type: blck elements are stored in size bytes.
type kvType struct {
	name       string
	blck, size int
}

var kvTypes = map[int32]kvType{
	typeF32:  {"f32", 1, 4},
	typeF16:  {"f16", 1, 2},
	typeBF16: {"bf16", 1, 2},
	typeQ8_0: {"q8_0", qk, 2 + qk},   // f16 d, 32 x int8
	typeQ4_0: {"q4_0", qk, 2 + qk/2}, // f16 d, 16 bytes of nibbles
}

func lookupType(t int32) (kvType, error) {
	if ti, ok := kvTypes[t]; ok {
		return ti, nil
	}
	return kvType{}, fmt.Errorf("kv state: cache type %d is not supported (f32, f16, bf16, q8_0, q4_0)", t)
}

// typeByName is the GGML type id of a cache type name ("" is f16).
func typeByName(s string) (int32, bool) {
	if s == "" {
		return typeF16, true
	}
	for id, ti := range kvTypes {
		if ti.name == s {
			return id, true
		}
	}
	return 0, false
}

func typeName(t int32) string {
	if ti, ok := kvTypes[t]; ok {
		return ti.name
	}
	return fmt.Sprintf("type%d", t)
}

func quantized(t int32) bool { return kvTypes[t].blck > 1 }

// KVRowBytes is the size of one cache row of elems elements stored as kvType
// (f16, bf16, f32, q8_0, q4_0): what one layer's K or V costs per cell.
func KVRowBytes(kvType string, elems int) (int, error) {
	t, ok := typeByName(kvType)
	if !ok {
		return 0, fmt.Errorf("unsupported KV cache type %q (f16, f32, bf16, q8_0, q4_0)", kvType)
	}
	if b := kvTypes[t].blck; elems%b != 0 {
		return 0, fmt.Errorf("a %s row of %d elements is not a whole number of %d-element blocks", kvType, elems, b)
	}
	return rowBytes(t, elems), nil
}

// rowBytes is the size of elems elements of type t (elems a multiple of its block).
func rowBytes(t int32, elems int) int {
	ti := kvTypes[t]
	if ti.blck == 0 {
		return 0
	}
	return elems / ti.blck * ti.size
}

// LayerRows holds one layer's K or V rows for the sequence's cells.
//
// Rows of the block-quantized types (q8_0, q4_0) hold RowElems/32 blocks; they
// are never transposed (llama.cpp quantizes V only with flash attention on, which
// stores V one row per cell).
type LayerRows struct {
	Type     int32
	RowElems int // elements per cell
	// ElemSize is the bytes per element of an unquantized type (f32, f16, bf16);
	// 0 for a block-quantized type, whose rows take RowBytes bytes.
	ElemSize int
	Trans    bool   // V stored element-major: Data[e*cells + c]
	Data     []byte // raw, in the cache's type
}

// RowBytes is the number of bytes one cell's row takes in the cache's type.
func (lr *LayerRows) RowBytes() int { return rowBytes(lr.Type, lr.RowElems) }

// newRows makes the rows of n cells of type t, elems elements per cell.
func newRows(t int32, elems int, trans bool, n int) LayerRows {
	lr := LayerRows{Type: t, RowElems: elems, Trans: trans}
	if !quantized(t) {
		lr.ElemSize = kvTypes[t].size
	}
	lr.Data = make([]byte, lr.RowBytes()*n)
	return lr
}

// SeqCache is a sequence's cache read out of llama.cpp.
//
// A model with interleaved sliding-window attention (Gemma 3) has two caches, and
// its state holds both, the full-attention one first (llama_kv_cache_iswa::
// state_write). K and V are then the full-attention layers' rows, LayerIDs names
// their model layers, and SWA is the sliding-window cache: parsed (so that nothing
// unknown is written back) and written back unchanged after the rewritten part.
type SeqCache struct {
	NStream int
	Stream  int     // index of the stream that held the cells
	Pos     []int32 // per cell, in cell order
	K, V    []LayerRows
	// LayerIDs are the model layers of K and V, in order; nil: every layer.
	LayerIDs []int
	// SWA is the sliding-window layers' cache of an iSWA model, nil otherwise.
	SWA *SeqCache
}

// Cells is the number of cells the sequence holds.
func (s *SeqCache) Cells() int { return len(s.Pos) }

// ReadSeqCache copies seq's cells out of the context.
func (c *Context) ReadSeqCache(seq int) (*SeqCache, error) {
	size := C.llama_state_seq_get_size(c.c, C.llama_seq_id(seq))
	if size == 0 {
		return nil, errors.New("kv state: empty size")
	}
	buf := C.malloc(size)
	if buf == nil {
		return nil, errors.New("kv state: out of memory")
	}
	defer C.free(buf)
	n := C.llama_state_seq_get_data(c.c, (*C.uint8_t)(buf), size, C.llama_seq_id(seq))
	if n == 0 {
		return nil, errors.New("kv state: llama_state_seq_get_data failed")
	}
	return parseState(unsafe.Slice((*byte)(buf), int(n)), c.model.info)
}

// parseState parses a sequence's state for a model with info's cache layout: one
// cache, or (SWA > 0) the iSWA pair, whose full-attention part must hold exactly the
// layers info.FullLayers names. Anything else is refused before anything is written.
func parseState(b []byte, info ModelInfo) (*SeqCache, error) {
	if info.SWA <= 0 {
		return parseSeqCache(b)
	}
	if len(info.FullLayers) == 0 {
		return nil, fmt.Errorf("kv state: %s uses sliding-window attention in a layer layout the hook does not know", info.Arch)
	}
	r := &reader{b: b}
	base, err := parseCache(r)
	if err != nil {
		return nil, fmt.Errorf("kv state (full-attention cache): %w", err)
	}
	swa, err := parseCache(r)
	if err != nil {
		return nil, fmt.Errorf("kv state (sliding-window cache): %w", err)
	}
	if rest := len(b) - r.off; rest != 0 {
		return nil, fmt.Errorf("kv state: %d bytes follow the two caches of a sliding-window model (unsupported cache layout)", rest)
	}
	if len(base.K) != len(info.FullLayers) || len(base.K)+len(swa.K) != info.Layers {
		return nil, fmt.Errorf("kv state: %d full-attention and %d sliding-window layers, the model has %d layers of which %d full-attention",
			len(base.K), len(swa.K), info.Layers, len(info.FullLayers))
	}
	if base.NStream != swa.NStream || base.Stream != swa.Stream {
		return nil, errors.New("kv state: the two caches hold the sequence in different streams")
	}
	base.LayerIDs = info.FullLayers
	base.SWA = swa
	return base, nil
}

type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || r.off+n > len(r.b) {
		r.err = fmt.Errorf("kv state: truncated at byte %d (need %d)", r.off, n)
		return nil
	}
	p := r.b[r.off : r.off+n]
	r.off += n
	return p
}

func (r *reader) u32() uint32 {
	p := r.take(4)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(p)
}

func (r *reader) u64() uint64 {
	p := r.take(8)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint64(p)
}

// parseRows reads the rows of one layer's K (what "K") or untransposed V of
// cells cells, after its type t.
func parseRows(r *reader, what string, t int32, cells int) (LayerRows, error) {
	ti, err := lookupType(t)
	if err != nil {
		return LayerRows{}, err
	}
	rowSize := int(r.u64())
	if r.err != nil {
		return LayerRows{}, r.err
	}
	if rowSize <= 0 || rowSize%ti.size != 0 {
		return LayerRows{}, fmt.Errorf("kv state: %s row size %d for type %s", what, rowSize, ti.name)
	}
	lr := LayerRows{Type: t, RowElems: rowSize / ti.size * ti.blck, Data: append([]byte(nil), r.take(rowSize*cells)...)}
	if ti.blck == 1 {
		lr.ElemSize = ti.size
	}
	return lr, nil
}

func parseSeqCache(b []byte) (*SeqCache, error) {
	r := &reader{b: b}
	s, err := parseCache(r)
	if err != nil {
		return nil, err
	}
	if rest := len(b) - r.off; rest != 0 {
		// A layout this parser does not know (a sliding-window model's second cache,
		// recurrent state): refuse it rather than rewrite half of it.
		return nil, fmt.Errorf("kv state: %d bytes follow the cache this hook understands (unsupported cache layout)", rest)
	}
	return s, nil
}

// parseCache reads one llama_kv_cache's state (see the layout above) from r.
func parseCache(r *reader) (*SeqCache, error) {
	s := &SeqCache{NStream: int(r.u32()), Stream: -1}
	if r.err == nil && (s.NStream < 1 || s.NStream > 1<<16) {
		return nil, fmt.Errorf("kv state: %d streams", s.NStream)
	}
	for st := 0; st < s.NStream && r.err == nil; st++ {
		cells := int(r.u32())
		if cells == 0 {
			continue
		}
		if s.Stream >= 0 {
			return nil, errors.New("kv state: sequence spans several streams")
		}
		s.Stream = st
		s.Pos = make([]int32, cells)
		for i := range cells {
			s.Pos[i] = int32(r.u32())
			if nseq := r.u32(); nseq != 1 && r.err == nil {
				return nil, fmt.Errorf("kv state: cell %d belongs to %d sequences", i, nseq)
			}
			r.take(4)
		}
		vt := r.u32()
		if vt > 1 {
			return nil, fmt.Errorf("kv state: v_trans %d", vt)
		}
		vtrans := vt != 0
		nl := int(r.u32())
		if r.err == nil && (nl < 1 || nl > 1<<12) {
			return nil, fmt.Errorf("kv state: %d layers", nl)
		}
		s.K = make([]LayerRows, nl)
		for l := range nl {
			k, err := parseRows(r, "K", int32(r.u32()), cells)
			if err != nil {
				return nil, err
			}
			s.K[l] = k
		}
		s.V = make([]LayerRows, nl)
		for l := range nl {
			t := int32(r.u32())
			if !vtrans {
				v, err := parseRows(r, "V", t, cells)
				if err != nil {
					return nil, err
				}
				s.V[l] = v
				continue
			}
			ti, err := lookupType(t)
			if err != nil {
				return nil, err
			}
			if ti.blck > 1 {
				return nil, fmt.Errorf("kv state: a transposed V cache of type %s (llama.cpp quantizes V only with flash attention, untransposed)", ti.name)
			}
			esz := int(r.u32())
			nEmbd := int(r.u32())
			if r.err != nil {
				return nil, r.err
			}
			if esz != ti.size {
				return nil, fmt.Errorf("kv state: V element size %d for type %s", esz, ti.name)
			}
			s.V[l] = LayerRows{Type: t, ElemSize: esz, RowElems: nEmbd, Trans: true, Data: append([]byte(nil), r.take(esz*nEmbd*cells)...)}
		}
	}
	if r.err != nil {
		return nil, r.err
	}
	if s.Stream < 0 {
		return nil, errors.New("kv state: the sequence holds no cells")
	}
	return s, nil
}

// NewSeqCacheLike makes an empty cache of n cells with src's layout (types, sizes).
// The sliding-window cache of an iSWA model (SWA) is shared with src, unchanged.
func NewSeqCacheLike(src *SeqCache, n int) *SeqCache {
	s := &SeqCache{NStream: src.NStream, Stream: src.Stream, Pos: make([]int32, n), LayerIDs: src.LayerIDs, SWA: src.SWA}
	mk := func(in []LayerRows) []LayerRows {
		out := make([]LayerRows, len(in))
		for l, lr := range in {
			out[l] = LayerRows{Type: lr.Type, RowElems: lr.RowElems, ElemSize: lr.ElemSize, Trans: lr.Trans,
				Data: make([]byte, lr.RowBytes()*n)}
		}
		return out
	}
	s.K, s.V = mk(src.K), mk(src.V)
	return s
}

// Row decodes cell c of a layer into dst (len RowElems) as float32.
func (lr *LayerRows) Row(cells, c int, dst []float32) {
	switch lr.Type {
	case typeF16:
		t := f16Table()
		d := lr.Data
		if !lr.Trans {
			base := 2 * c * lr.RowElems
			for e := range dst[:lr.RowElems] {
				i := base + 2*e
				dst[e] = t[uint16(d[i])|uint16(d[i+1])<<8]
			}
			return
		}
		for e := range dst[:lr.RowElems] {
			i := 2 * (e*cells + c)
			dst[e] = t[uint16(d[i])|uint16(d[i+1])<<8]
		}
		return
	case typeQ8_0:
		n := lr.RowBytes()
		dequantQ8_0(lr.Data[c*n:(c+1)*n], dst[:lr.RowElems])
		return
	case typeQ4_0:
		n := lr.RowBytes()
		dequantQ4_0(lr.Data[c*n:(c+1)*n], dst[:lr.RowElems])
		return
	}
	for e := range lr.RowElems {
		dst[e] = lr.at(lr.index(cells, c, e))
	}
}

// SetRow encodes src into cell c of a layer. The quantized types are encoded as
// ggml's reference quantizers (quantize_row_q8_0_ref, quantize_row_q4_0_ref) do.
func (lr *LayerRows) SetRow(cells, c int, src []float32) {
	switch lr.Type {
	case typeQ8_0:
		n := lr.RowBytes()
		quantQ8_0(lr.Data[c*n:(c+1)*n], src[:lr.RowElems])
		return
	case typeQ4_0:
		n := lr.RowBytes()
		quantQ4_0(lr.Data[c*n:(c+1)*n], src[:lr.RowElems])
		return
	}
	for e := range lr.RowElems {
		lr.put(lr.index(cells, c, e), src[e])
	}
}

func (lr *LayerRows) index(cells, c, e int) int {
	if lr.Trans {
		return e*cells + c
	}
	return c*lr.RowElems + e
}

func (lr *LayerRows) at(i int) float32 {
	switch lr.Type {
	case typeF32:
		return math.Float32frombits(binary.LittleEndian.Uint32(lr.Data[4*i:]))
	case typeBF16:
		return math.Float32frombits(uint32(binary.LittleEndian.Uint16(lr.Data[2*i:])) << 16)
	default:
		return F16ToF32(binary.LittleEndian.Uint16(lr.Data[2*i:]))
	}
}

func (lr *LayerRows) put(i int, v float32) {
	switch lr.Type {
	case typeF32:
		binary.LittleEndian.PutUint32(lr.Data[4*i:], math.Float32bits(v))
	case typeBF16:
		bits := math.Float32bits(v)
		bits += 0x7FFF + (bits>>16)&1 // round to nearest even
		binary.LittleEndian.PutUint16(lr.Data[2*i:], uint16(bits>>16))
	default:
		binary.LittleEndian.PutUint16(lr.Data[2*i:], F32ToF16(v))
	}
}

// CopyRow copies cell srcCell of src into cell dstCell of lr without conversion.
func (lr *LayerRows) CopyRow(dstCells, dstCell int, src *LayerRows, srcCells, srcCell int) {
	if !lr.Trans {
		n := lr.RowBytes()
		copy(lr.Data[dstCell*n:(dstCell+1)*n], src.Data[srcCell*n:(srcCell+1)*n])
		return
	}
	es := kvTypes[lr.Type].size // a transposed row is never quantized
	for e := range lr.RowElems {
		d, s := (e*dstCells+dstCell)*es, (e*srcCells+srcCell)*es
		copy(lr.Data[d:d+es], src.Data[s:s+es])
	}
}

// ---- q8_0 and q4_0 blocks (ggml-common.h block_q8_0, block_q4_0) ----

// dequantQ8_0 decodes q8_0 blocks (f16 d, 32 int8 q: x = q*d) into dst.
func dequantQ8_0(src []byte, dst []float32) {
	t := f16Table()
	for b := 0; b < len(dst)/qk; b++ {
		blk := src[b*(2+qk) : (b+1)*(2+qk)]
		d := t[binary.LittleEndian.Uint16(blk)]
		out := dst[b*qk : (b+1)*qk]
		for j, q := range blk[2:] {
			out[j] = float32(int8(q)) * d
		}
	}
}

// dequantQ4_0 decodes q4_0 blocks (f16 d, 16 bytes: element j in the low nibble
// of byte j, element j+16 in its high nibble; x = (q-8)*d) into dst.
func dequantQ4_0(src []byte, dst []float32) {
	t := f16Table()
	for b := 0; b < len(dst)/qk; b++ {
		blk := src[b*(2+qk/2) : (b+1)*(2+qk/2)]
		d := t[binary.LittleEndian.Uint16(blk)]
		out := dst[b*qk : (b+1)*qk]
		for j, q := range blk[2:] {
			out[j] = float32(int(q&0x0F)-8) * d
			out[j+qk/2] = float32(int(q>>4)-8) * d
		}
	}
}

// quantQ8_0 encodes src as q8_0 blocks into dst, as quantize_row_q8_0_ref does:
// d = amax/127, q = round(x/d) (half away from zero), computed as x*(1/d) in float32.
// ggml's CPU backend fills a q8_0 cache with its SIMD quantizer (AVX: x*(127/amax),
// rounded half to even), which can differ from this in the last bit of a tie; on
// rows it quantized itself, decoded, both give its bytes back.
func quantQ8_0(dst []byte, src []float32) {
	for b := 0; b < len(src)/qk; b++ {
		x := src[b*qk : (b+1)*qk]
		var amax float32
		for _, v := range x {
			amax = max(amax, abs32(v))
		}
		d := amax / 127
		var id float32
		if d != 0 {
			id = 1 / d
		}
		blk := dst[b*(2+qk) : (b+1)*(2+qk)]
		binary.LittleEndian.PutUint16(blk, F32ToF16(d))
		for j, v := range x {
			q := math.Round(float64(v * id))
			blk[2+j] = byte(int8(min(127, max(-128, q))))
		}
	}
}

// quantQ4_0 encodes src as q4_0 blocks into dst, as quantize_row_q4_0_ref does:
// d = max/-8 where max is the element of largest magnitude (with its sign),
// q = min(15, trunc(x/d + 8.5)), x/d computed as x*(1/d) in float32.
func quantQ4_0(dst []byte, src []float32) {
	for b := 0; b < len(src)/qk; b++ {
		x := src[b*qk : (b+1)*qk]
		var amax, mx float32
		for _, v := range x {
			if a := abs32(v); amax < a {
				amax, mx = a, v
			}
		}
		d := mx / -8
		var id float32
		if d != 0 {
			id = 1 / d
		}
		blk := dst[b*(2+qk/2) : (b+1)*(2+qk/2)]
		binary.LittleEndian.PutUint16(blk, F32ToF16(d))
		nib := func(v float32) byte {
			// The conversion rounds the product to float32 before the addition
			// (no fused multiply-add), as the C reference computes it.
			return byte(min(15, max(0, int32(float32(v*id)+8.5))))
		}
		for j := range qk / 2 {
			blk[2+j] = nib(x[j]) | nib(x[j+qk/2])<<4
		}
	}
}

func abs32(v float32) float32 { return math.Float32frombits(math.Float32bits(v) &^ (1 << 31)) }

// ---- layouts ----

// KVLayout is how a context stores its cache: the GGML types of K and V and
// whether V is transposed (llama.cpp's v_trans, which v0.17.4 sets to
// !flash_attn in llama_model::create_memory).
type KVLayout struct {
	TypeK, TypeV int32
	VTrans       bool
}

// String is e.g. "k=q8_0 v=f16 v_trans".
func (l KVLayout) String() string {
	s := "k=" + typeName(l.TypeK) + " v=" + typeName(l.TypeV)
	if l.VTrans {
		s += " v_trans"
	}
	return s
}

// hasLayout reports whether every layer of s (and of its sliding-window part)
// is stored in layout l.
func (s *SeqCache) hasLayout(l KVLayout) bool {
	for i := range s.K {
		if k := &s.K[i]; k.Type != l.TypeK || k.Trans {
			return false
		}
	}
	for i := range s.V {
		if v := &s.V[i]; v.Type != l.TypeV || v.Trans != l.VTrans {
			return false
		}
	}
	return s.SWA == nil || s.SWA.hasLayout(l)
}

// Convert returns s in layout to: s itself when it already has that layout, else
// a new cache whose K and V rows (the sliding-window part's too) are decoded to
// float32 and re-encoded in to's types, V transposed or not as asked. Rows that
// already have the target type and orientation are copied unchanged.
//
// It panics when to cannot hold the rows: an unknown type, a quantized type for
// rows whose length is not a multiple of 32, or a transposed quantized V. A
// context's KVLayout never asks for that (NewContext refuses such a context).
func (s *SeqCache) Convert(to KVLayout) *SeqCache {
	if s.hasLayout(to) {
		return s
	}
	n := s.Cells()
	out := &SeqCache{NStream: s.NStream, Stream: s.Stream, Pos: slices.Clone(s.Pos), LayerIDs: s.LayerIDs,
		K: make([]LayerRows, len(s.K)), V: make([]LayerRows, len(s.V))}
	for l := range s.K {
		out.K[l] = convertRows(&s.K[l], n, to.TypeK, false)
	}
	for l := range s.V {
		out.V[l] = convertRows(&s.V[l], n, to.TypeV, to.VTrans)
	}
	if s.SWA != nil {
		out.SWA = s.SWA.Convert(to)
	}
	return out
}

// convertRows re-encodes the n cells of src in type t, transposed or not.
func convertRows(src *LayerRows, n int, t int32, trans bool) LayerRows {
	if src.Type == t && src.Trans == trans {
		out := *src
		out.Data = slices.Clone(src.Data)
		return out
	}
	ti, err := lookupType(t)
	if err != nil {
		panic(err)
	}
	if ti.blck > 1 && (trans || src.RowElems%ti.blck != 0) {
		panic(fmt.Sprintf("kv state: cannot store rows of %d elements as %s (transposed: %v)", src.RowElems, ti.name, trans))
	}
	out := newRows(t, src.RowElems, trans, n)
	row := make([]float32, src.RowElems)
	for c := range n {
		src.Row(n, c, row)
		out.SetRow(n, c, row)
	}
	return out
}

func (s *SeqCache) encode() []byte {
	out := s.appendCache(nil)
	if s.SWA != nil {
		out = s.SWA.appendCache(out)
	}
	return out
}

// appendCache appends one cache's state (the layout above) to out.
func (s *SeqCache) appendCache(out []byte) []byte {
	n := len(s.Pos)
	size := 8 + 4*s.NStream + n*12 + 8
	for l := range s.K {
		size += 12 + len(s.K[l].Data) + 16 + len(s.V[l].Data)
	}
	out = slices.Grow(out, size)
	u32 := func(v uint32) { out = binary.LittleEndian.AppendUint32(out, v) }
	u64 := func(v uint64) { out = binary.LittleEndian.AppendUint64(out, v) }
	u32(uint32(s.NStream))
	for st := 0; st < s.NStream; st++ {
		if st != s.Stream {
			u32(0)
			continue
		}
		u32(uint32(n))
		for _, p := range s.Pos {
			u32(uint32(p))
			u32(1)
			u32(0) // seq id: ignored by llama.cpp, the destination seq is used
		}
		vtrans := uint32(0)
		if len(s.V) > 0 && s.V[0].Trans {
			vtrans = 1
		}
		u32(vtrans)
		u32(uint32(len(s.K)))
		for _, k := range s.K {
			u32(uint32(k.Type))
			u64(uint64(k.RowBytes()))
			out = append(out, k.Data...)
		}
		for _, v := range s.V {
			u32(uint32(v.Type))
			if v.Trans {
				u32(uint32(kvTypes[v.Type].size))
				u32(uint32(v.RowElems))
			} else {
				u64(uint64(v.RowBytes()))
			}
			out = append(out, v.Data...)
		}
	}
	return out
}

// WriteSeqCache replaces seq's cells with s. Positions must ascend. On failure the
// sequence has been removed.
func (c *Context) WriteSeqCache(seq int, s *SeqCache) error {
	if c.model.info.MRoPE {
		// llama_kv_cache::state_read_meta restores the cells through a ubatch whose
		// pos vector holds one value per cell (ubatch_reserve), and apply_ubatch then
		// reads the M-RoPE components pos[i + n*2] and pos[i + n] past its end.
		return ErrMRoPERestore
	}
	for i := 1; i < len(s.Pos); i++ {
		if s.Pos[i] <= s.Pos[i-1] {
			return fmt.Errorf("kv state: positions must ascend (cell %d: %d after %d)", i, s.Pos[i], s.Pos[i-1])
		}
	}
	if (c.model.info.SWA > 0) != (s.SWA != nil) {
		return errors.New("kv state: the cache to write does not have the model's cache layout")
	}
	if l := c.KVLayout(); !s.hasLayout(l) {
		return fmt.Errorf("kv state: the cache to write is not stored as the context's cache (%s): Convert it first", l)
	}
	data := s.encode()
	buf := C.CBytes(data)
	defer C.free(buf)
	c.SeqClear(seq)
	n := C.llama_state_seq_set_data(c.c, (*C.uint8_t)(buf), C.size_t(len(data)), C.llama_seq_id(seq))
	if n == 0 {
		return errors.New("kv state: llama.cpp refused the rewritten cache")
	}
	return nil
}

// KVLayout is the layout of the context's cache (both parts of an iSWA model's).
func (c *Context) KVLayout() KVLayout {
	tk, _ := typeByName(c.params.TypeK) // NewContext accepted both names
	tv, _ := typeByName(c.params.TypeV)
	return KVLayout{TypeK: tk, TypeV: tv, VTrans: !c.params.FlashAttn}
}

// KVBytesPerCell is what one cell (one position of one sequence) costs across all
// layers, K and V, in the context's cache types: the bytes of the rows
// ReadSeqCache returns for that cell. It assumes every layer has a cache with the
// model's KV head count and head sizes (true of the architectures the hook knows).
func (c *Context) KVBytesPerCell() int64 {
	l := c.KVLayout()
	kd, vd := c.model.kvHeadDims()
	kv := c.model.info.KVHeads
	return int64(c.model.info.Layers) * int64(rowBytes(l.TypeK, kv*kd)+rowBytes(l.TypeV, kv*vd))
}

// KVBytesPerCell is what one cell costs across all layers with K rows of type
// typeK and V rows of type typeV ("f16", "q8_0", ...): the model's side of
// Context.KVBytesPerCell, for sizing a context before it exists.
func (m *Model) KVBytesPerCell(typeK, typeV string) (int64, error) {
	kd, vd := m.kvHeadDims()
	k, err := KVRowBytes(typeK, m.info.KVHeads*kd)
	if err != nil {
		return 0, err
	}
	v, err := KVRowBytes(typeV, m.info.KVHeads*vd)
	if err != nil {
		return 0, err
	}
	return int64(m.info.Layers) * int64(k+v), nil
}

// kvHeadDims is the size of one K and one V head: the model's
// attention.key_length and value_length, n_embd/n_head when absent (llama.cpp's
// defaults in llama_model::load_hparams).
func (m *Model) kvHeadDims() (k, v int) {
	k, v = m.info.HeadDim, m.info.HeadDim
	if n, err := strconv.Atoi(m.Meta(m.info.Arch + ".attention.key_length")); err == nil && n > 0 {
		k, v = n, n
	}
	if n, err := strconv.Atoi(m.Meta(m.info.Arch + ".attention.value_length")); err == nil && n > 0 {
		v = n
	}
	return k, v
}

// f16Table maps every half to its float32 value: a read-only table built once.
// ErrMRoPERestore: llama.cpp (this vendored version) cannot restore one sequence
// of an M-RoPE model safely (see WriteSeqCache), so its cache is never rewritten.
var ErrMRoPERestore = errors.New("kv state: restoring a sequence of an M-RoPE model is refused: llama.cpp's state_read_meta reads its extra position components past the restored positions")

var f16Table = sync.OnceValue(func() *[1 << 16]float32 {
	var t [1 << 16]float32
	for h := range t {
		t[h] = F16ToF32(uint16(h))
	}
	return &t
})

// F16ToF32 converts an IEEE half to float32.
func F16ToF32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := int32(h>>10) & 0x1F
	mant := uint32(h & 0x3FF)
	switch {
	case exp == 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		v := float32(math.Ldexp(float64(mant), -24)) // subnormal: mant * 2^-24
		if sign != 0 {
			v = -v
		}
		return v
	case exp == 0x1F:
		return math.Float32frombits(sign | 0xFF<<23 | mant<<13)
	}
	return math.Float32frombits(sign | uint32(exp-15+127)<<23 | mant<<13)
}

// F32ToF16 converts float32 to an IEEE half, rounding to nearest even.
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xFF
	mant := b & 0x7FFFFF
	if exp == 0xFF { // inf or nan
		if mant != 0 {
			return sign | 0x7E00
		}
		return sign | 0x7C00
	}
	e := exp - 127 + 15
	if e >= 0x1F {
		return sign | 0x7C00
	}
	if e <= 0 {
		if e < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint32(14 - e)
		half := mant >> shift
		rem := mant & (1<<shift - 1)
		mid := uint32(1) << (shift - 1)
		if rem > mid || rem == mid && half&1 == 1 {
			half++
		}
		return sign | uint16(half)
	}
	half := uint32(e)<<10 | mant>>13
	rem := mant & 0x1FFF
	if rem > 0x1000 || rem == 0x1000 && half&1 == 1 {
		half++
	}
	return sign | uint16(half)
}
