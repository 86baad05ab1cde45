package engine

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
)

// ggufDataOffset reads a GGUF file's header (metadata and tensor infos, format
// versions 2 and 3) and returns where its tensor data starts. It reads the header
// only, checking every length against what a header can hold.
func ggufDataOffset(f io.Reader) (int64, error) {
	r := &countReader{r: bufio.NewReaderSize(f, 1<<16)}
	if magic := r.u32(); r.err == nil && magic != 0x46554747 { // "GGUF"
		return 0, fmt.Errorf("not a GGUF file")
	}
	if v := r.u32(); r.err == nil && (v < 2 || v > 3) {
		return 0, fmt.Errorf("GGUF version %d", v)
	}
	nTensors, nKV := r.u64(), r.u64()
	const maxItems = 1 << 24
	if nTensors > maxItems || nKV > maxItems {
		return 0, fmt.Errorf("GGUF header claims %d tensors and %d keys", nTensors, nKV)
	}
	align := uint64(32)
	for range nKV {
		key := r.str()
		t := r.u32()
		if key == "general.alignment" && t == 4 {
			align = uint64(r.u32())
			continue
		}
		r.skipValue(t, 0)
	}
	for range nTensors {
		r.str()
		dims := r.u32()
		if dims > 8 {
			return 0, fmt.Errorf("a tensor of %d dimensions", dims)
		}
		r.skip(8*int64(dims) + 4 + 8)
	}
	if r.err != nil {
		return 0, r.err
	}
	if align == 0 {
		align = 32
	}
	return int64((uint64(r.n) + align - 1) / align * align), nil
}

type countReader struct {
	r   *bufio.Reader
	n   int64
	err error
	buf [8]byte
}

func (c *countReader) read(n int) []byte {
	if c.err != nil {
		return c.buf[:n]
	}
	_, c.err = io.ReadFull(c.r, c.buf[:n])
	c.n += int64(n)
	return c.buf[:n]
}

func (c *countReader) u32() uint32 { return binary.LittleEndian.Uint32(c.read(4)) }
func (c *countReader) u64() uint64 { return binary.LittleEndian.Uint64(c.read(8)) }

func (c *countReader) skip(n int64) {
	if c.err != nil {
		return
	}
	var k int
	k, c.err = c.r.Discard(int(n))
	c.n += int64(k)
}

func (c *countReader) str() string {
	n := c.u64()
	if n > 1<<20 {
		if c.err == nil {
			c.err = fmt.Errorf("a GGUF string of %d bytes", n)
		}
		return ""
	}
	b := make([]byte, n)
	if c.err == nil {
		_, c.err = io.ReadFull(c.r, b)
		c.n += int64(n)
	}
	return string(b)
}

// skipValue skips a value of GGUF type t (depth: nested arrays).
func (c *countReader) skipValue(t uint32, depth int) {
	size := map[uint32]int64{0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
	switch {
	case c.err != nil:
	case t == 8:
		n := c.u64()
		if n > 1<<30 {
			c.err = fmt.Errorf("a GGUF string of %d bytes", n)
			return
		}
		c.skip(int64(n))
	case t == 9 && depth < 4:
		et, n := c.u32(), c.u64()
		if n > 1<<28 {
			c.err = fmt.Errorf("a GGUF array of %d items", n)
			return
		}
		if sz, ok := size[et]; ok {
			c.skip(sz * int64(n))
			return
		}
		for range n {
			c.skipValue(et, depth+1)
			if c.err != nil {
				return
			}
		}
	default:
		sz, ok := size[t]
		if !ok {
			c.err = fmt.Errorf("GGUF value type %d", t)
			return
		}
		c.skip(sz)
	}
}
