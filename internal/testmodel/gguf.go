package testmodel

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
)

// A minimal GGUF (version 3) writer. The layout is:
//
//	magic "GGUF", u32 version, u64 tensor count, u64 key/value count,
//	key/value pairs, tensor infos (name, dims, type, offset),
//	zero padding to the alignment, then the tensor data, each tensor
//	starting at a multiple of the alignment (relative to the data section).
//
// All integers are little endian. Strings are a u64 byte length followed by
// the bytes (no terminator). Tensor data is streamed: the header only needs
// each tensor's shape and type, so the payload can be generated afterwards,
// chunk by chunk, without ever holding a whole tensor in memory.

// GGUF metadata value types.
const (
	ggufTypeUint8   uint32 = 0
	ggufTypeInt8    uint32 = 1
	ggufTypeUint16  uint32 = 2
	ggufTypeInt16   uint32 = 3
	ggufTypeUint32  uint32 = 4
	ggufTypeInt32   uint32 = 5
	ggufTypeFloat32 uint32 = 6
	ggufTypeBool    uint32 = 7
	ggufTypeString  uint32 = 8
	ggufTypeArray   uint32 = 9
	ggufTypeUint64  uint32 = 10
	ggufTypeInt64   uint32 = 11
	ggufTypeFloat64 uint32 = 12
)

// ggml tensor element types used here.
const (
	ggmlTypeF32 uint32 = 0
	ggmlTypeF16 uint32 = 1
)

const (
	ggufMagic     = "GGUF"
	ggufVersion   = 3
	ggufAlignment = 32 // llama.cpp's default when general.alignment is absent
)

// kv is one metadata entry. val must be one of: uint32, int32, uint64,
// float32, bool, string, []string, []float32, []int32.
type kv struct {
	key string
	val any
}

// tensorInfo describes one tensor: its name, its ggml shape (ne[0] is the
// fastest varying dimension, i.e. the row length) and element type, plus how
// to generate its contents.
type tensorInfo struct {
	name string
	dims []uint64
	typ  uint32
	fill fill
	// data, when set, holds the tensor's values (trained weights) and
	// replaces the generated fill.
	data []float32
}

func (t *tensorInfo) elements() uint64 {
	n := uint64(1)
	for _, d := range t.dims {
		n *= d
	}
	return n
}

func (t *tensorInfo) bytes() uint64 {
	switch t.typ {
	case ggmlTypeF16:
		return 2 * t.elements()
	default:
		return 4 * t.elements()
	}
}

func alignUp(n, a uint64) uint64 { return (n + a - 1) / a * a }

// ggufWriter writes little-endian GGUF primitives to a buffered stream and
// counts the bytes written.
type ggufWriter struct {
	w   *bufio.Writer
	n   uint64
	err error
	buf [8]byte
}

func (g *ggufWriter) write(p []byte) {
	if g.err != nil {
		return
	}
	n, err := g.w.Write(p)
	g.n += uint64(n)
	g.err = err
}

func (g *ggufWriter) u32(v uint32) {
	binary.LittleEndian.PutUint32(g.buf[:4], v)
	g.write(g.buf[:4])
}

func (g *ggufWriter) u64(v uint64) {
	binary.LittleEndian.PutUint64(g.buf[:8], v)
	g.write(g.buf[:8])
}

func (g *ggufWriter) str(s string) {
	g.u64(uint64(len(s)))
	if g.err == nil {
		n, err := g.w.WriteString(s)
		g.n += uint64(n)
		g.err = err
	}
}

func (g *ggufWriter) kv(e kv) {
	g.str(e.key)
	switch v := e.val.(type) {
	case uint32:
		g.u32(ggufTypeUint32)
		g.u32(v)
	case int32:
		g.u32(ggufTypeInt32)
		g.u32(uint32(v))
	case uint64:
		g.u32(ggufTypeUint64)
		g.u64(v)
	case float32:
		g.u32(ggufTypeFloat32)
		g.u32(math.Float32bits(v))
	case bool:
		g.u32(ggufTypeBool)
		if v {
			g.write([]byte{1})
		} else {
			g.write([]byte{0})
		}
	case string:
		g.u32(ggufTypeString)
		g.str(v)
	case []string:
		g.u32(ggufTypeArray)
		g.u32(ggufTypeString)
		g.u64(uint64(len(v)))
		for _, s := range v {
			g.str(s)
		}
	case []float32:
		g.u32(ggufTypeArray)
		g.u32(ggufTypeFloat32)
		g.u64(uint64(len(v)))
		for _, f := range v {
			g.u32(math.Float32bits(f))
		}
	case []int32:
		g.u32(ggufTypeArray)
		g.u32(ggufTypeInt32)
		g.u64(uint64(len(v)))
		for _, i := range v {
			g.u32(uint32(i))
		}
	default:
		if g.err == nil {
			g.err = fmt.Errorf("gguf: key %q: unsupported value type %T", e.key, e.val)
		}
	}
}

func (g *ggufWriter) pad(to uint64) {
	var zero [ggufAlignment]byte
	for g.n%to != 0 && g.err == nil {
		k := to - g.n%to
		if k > uint64(len(zero)) {
			k = uint64(len(zero))
		}
		g.write(zero[:k])
	}
}

// writeGGUF writes a complete GGUF file to w: header, metadata, tensor infos
// and the generated tensor data (streamed, see generate).
func writeGGUF(w io.Writer, kvs []kv, tensors []tensorInfo, seed int64) error {
	g := &ggufWriter{w: bufio.NewWriterSize(w, 4<<20)}
	g.write([]byte(ggufMagic))
	g.u32(ggufVersion)
	g.u64(uint64(len(tensors)))
	g.u64(uint64(len(kvs)))
	for _, e := range kvs {
		g.kv(e)
	}
	var off uint64
	for i := range tensors {
		t := &tensors[i]
		g.str(t.name)
		g.u32(uint32(len(t.dims)))
		for _, d := range t.dims {
			g.u64(d)
		}
		g.u32(t.typ)
		g.u64(off)
		off = alignUp(off+t.bytes(), ggufAlignment)
	}
	g.pad(ggufAlignment)
	if g.err != nil {
		return g.err
	}
	dataStart := g.n
	for i := range tensors {
		t := &tensors[i]
		write := generate
		if t.data != nil {
			write = func(g *ggufWriter, t *tensorInfo, _ int64) error { return writeData(g, t) }
		}
		if err := write(g, t, seed); err != nil {
			return fmt.Errorf("tensor %s: %w", t.name, err)
		}
		// pad relative to the data section start (which is itself aligned)
		g.pad(ggufAlignment)
		if g.err != nil {
			return g.err
		}
	}
	if g.n-dataStart != off {
		return fmt.Errorf("gguf: wrote %d data bytes, expected %d", g.n-dataStart, off)
	}
	return g.w.Flush()
}
