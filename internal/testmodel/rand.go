package testmodel

import (
	"encoding/binary"
	"hash/fnv"
	"math"
	"runtime"
	"sync"
)

// Weight generation.
//
// Every tensor is filled from a small table of tableSize values spread
// evenly over [center-half, center+half] (a discrete uniform distribution),
// indexed by 10-bit slices of a xorshift64* stream. The table values are
// rounded to float16 first, so a model written with F16 and one written with
// F32 hold exactly the same numbers. The stream is split into fixed-size
// chunks, each seeded from (seed, tensor name, chunk index): the bytes do not
// depend on how many goroutines generate them, and chunks can be produced in
// parallel and written in order.

const (
	tableBits  = 10
	tableSize  = 1 << tableBits
	chunkElems = 1 << 20
)

// fill says how to generate one tensor's values: uniform in
// [center-half, center+half], each row (ne[0] consecutive elements)
// multiplied by rowScale(row) when rowScale is set. Scales should be powers of
// two or zero so that f16 and f32 files stay identical.
type fill struct {
	center, half float32
	rowScale     func(row uint64) float32
}

func uniform(std float64) fill {
	// a uniform distribution on [-h, h] has standard deviation h/sqrt(3)
	return fill{half: float32(std * math.Sqrt(3))}
}

func around(center, half float32) fill { return fill{center: center, half: half} }

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func nameHash(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64()
}

// valueTable is a fill's table at one row scale, as f16 bits and as the
// (identical) float32 values.
type valueTable struct {
	f16 [tableSize]uint16
	f32 [tableSize]float32
}

func newValueTable(f fill, scale float32) *valueTable {
	t := new(valueTable)
	for k := range tableSize {
		u := (2*(float64(k)+0.5)/tableSize - 1) // in (-1, 1)
		// the explicit float64() stops the compiler from fusing the multiply
		// and add (allowed by the Go spec, done on arm64): the tables must be
		// bit-identical on every platform
		v := float32(float64(scale) * (float64(f.center) + float64(float64(f.half)*u)))
		h := f32ToF16(v)
		t.f16[k] = h
		t.f32[k] = f16ToF32(h)
	}
	return t
}

// fillChunk writes elements [start, start+n) of tensor t into buf, which must
// hold exactly n elements of t's type.
func fillChunk(buf []byte, t *tensorInfo, seed int64, chunk, start, n uint64) {
	f := t.fill
	rowLen := t.dims[0]
	state := splitmix64(uint64(seed) ^ splitmix64(nameHash(t.name)) ^ splitmix64(chunk+0x51ed))
	if state == 0 {
		state = 1
	}
	var word uint64
	left := 0
	tables := map[float32]*valueTable{}
	pos := uint64(0)
	for pos < n {
		row := (start + pos) / rowLen
		segEnd := (row+1)*rowLen - start
		if segEnd > n {
			segEnd = n
		}
		scale := float32(1)
		if f.rowScale != nil {
			scale = f.rowScale(row)
		}
		tab := tables[scale]
		if tab == nil {
			tab = newValueTable(f, scale)
			tables[scale] = tab
		}
		for ; pos < segEnd; pos++ {
			if left == 0 {
				// xorshift64*
				state ^= state >> 12
				state ^= state << 25
				state ^= state >> 27
				word = state * 0x2545f4914f6cdd1d
				left = 64 / tableBits
			}
			k := word & (tableSize - 1)
			word >>= tableBits
			left--
			if t.typ == ggmlTypeF16 {
				binary.LittleEndian.PutUint16(buf[2*pos:], tab.f16[k])
			} else {
				binary.LittleEndian.PutUint32(buf[4*pos:], math.Float32bits(tab.f32[k]))
			}
		}
	}
}

// generate streams tensor t's data to g, generating chunks in parallel.
func generate(g *ggufWriter, t *tensorInfo, seed int64) error {
	total := t.elements()
	elemSize := t.bytes() / max(total, 1)
	nChunks := (total + chunkElems - 1) / chunkElems
	if nChunks <= 1 {
		buf := make([]byte, total*elemSize)
		fillChunk(buf, t, seed, 0, 0, total)
		g.write(buf)
		return g.err
	}

	workers := runtime.GOMAXPROCS(0)
	type job struct {
		chunk, start, n uint64
		buf             []byte
		done            chan struct{}
	}
	free := make(chan []byte, 2*workers+1)
	for range cap(free) {
		free <- make([]byte, chunkElems*elemSize)
	}
	queue := make(chan *job, 2*workers)
	jobs := make(chan *job)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				fillChunk(j.buf, t, seed, j.chunk, j.start, j.n)
				close(j.done)
			}
		}()
	}
	go func() {
		for c := range nChunks {
			start := c * chunkElems
			n := min(uint64(chunkElems), total-start)
			j := &job{chunk: c, start: start, n: n, done: make(chan struct{})}
			j.buf = (<-free)[:n*elemSize]
			queue <- j
			jobs <- j
		}
		close(queue)
		close(jobs)
	}()
	for j := range queue {
		<-j.done
		g.write(j.buf) // a no-op once an error has been seen; keep draining
		free <- j.buf[:cap(j.buf)]
	}
	wg.Wait()
	return g.err
}

// f32ToF16 converts to IEEE half precision, rounding to nearest even.
func f32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	switch {
	case exp == 0xff: // inf or nan
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp-127 > 15: // overflow
		return sign | 0x7c00
	case exp-127 >= -14: // normal
		e := uint32(exp-127+15) << 10
		m := mant >> 13
		rest := mant & 0x1fff
		h := e | m
		if rest > 0x1000 || (rest == 0x1000 && h&1 == 1) {
			h++ // may carry into the exponent, which is still correct
		}
		return sign | uint16(h)
	case exp-127 >= -25: // subnormal half
		mant |= 0x800000
		shift := uint32(-14-(exp-127)) + 13
		m := mant >> shift
		rest := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rest > half || (rest == half && m&1 == 1) {
			m++
		}
		return sign | uint16(m)
	default:
		return sign
	}
}

// f16ToF32 converts IEEE half precision bits to float32.
func f16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp == 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		v := float32(mant) / (1 << 24)
		if sign != 0 {
			v = -v
		}
		return v
	default:
		return math.Float32frombits(sign | (exp-15+127)<<23 | mant<<13)
	}
}
