package llama

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// Quantized cache rows (q8_0, q4_0), KV layouts and moving a sequence between
// contexts of different layouts.

// loadKVModel loads a test model of family arch ("" is the default llama model)
// whose attention heads are 32 wide, so that K and V rows are whole q8_0/q4_0
// blocks (the default model's heads are 16 wide): two heads per row.
func loadKVModel(t *testing.T, arch string) *Model {
	t.Helper()
	opt := testmodel.DefaultOptions()
	if arch != "" {
		var err error
		if opt, err = testmodel.FamilyOptions(arch); err != nil {
			t.Fatal(err)
		}
	}
	if arch == testmodel.ArchGemma3 {
		opt.HeadSize = 32 // gemma3 writes attention.key_length
	} else {
		opt.Heads, opt.KVHeads = 2, 2
	}
	mp, _, err := testmodel.Ensure(opt)
	if err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(mp, ModelParams{UseMmap: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	if k, v := m.kvHeadDims(); k != 32 || v != 32 {
		t.Fatalf("head sizes %d/%d, want 32", k, v)
	}
	return m
}

func newCtxOn(t testing.TB, m *Model, p ContextParams) *Context {
	t.Helper()
	if p.NCtx == 0 {
		p.NCtx = 256
	}
	if p.NSeqMax == 0 {
		p.NSeqMax = 1
	}
	if p.Threads == 0 {
		p.Threads = 1
	}
	c, err := NewContext(m, p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func tokenizeOn(t testing.TB, m *Model, s string) []Token {
	t.Helper()
	toks, err := m.Tokenize(s, true, true)
	if err != nil {
		t.Fatal(err)
	}
	return toks
}

func maxAbsDiff(a, b []float32) float64 {
	d := 0.0
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func TestKVLayoutString(t *testing.T) {
	for _, c := range []struct {
		l    KVLayout
		want string
	}{
		{KVLayout{TypeK: typeQ8_0, TypeV: typeF16, VTrans: true}, "k=q8_0 v=f16 v_trans"},
		{KVLayout{TypeK: typeQ4_0, TypeV: typeQ8_0}, "k=q4_0 v=q8_0"},
		{KVLayout{TypeK: typeF32, TypeV: typeBF16}, "k=f32 v=bf16"},
	} {
		if got := c.l.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.l, got, c.want)
		}
	}
}

// Blocks whose encoding is known by hand: the byte layout of both formats.
func TestQuantizedBlockLayout(t *testing.T) {
	x8 := make([]float32, qk) // -127, -119, ...: amax 127, so d = 1 and q = x
	want8 := []byte{0x00, 0x3C}
	for j := range x8 {
		x8[j] = float32(8*j - 127)
		want8 = append(want8, byte(int8(8*j-127)))
	}
	// q4_0: x[0] = -8 is the largest magnitude, so d = -8/-8 = 1 and q = x+8:
	// elements j < 16 are j-8 (q = j), elements 16+j are 7-j (q = 15-j).
	x4 := make([]float32, qk)
	want4 := []byte{0x00, 0x3C}
	for j := range qk / 2 {
		x4[j], x4[j+qk/2] = float32(j-8), float32(7-j)
		want4 = append(want4, byte(j)|byte(15-j)<<4)
	}
	for _, c := range []struct {
		name string
		typ  int32
		x    []float32
		want []byte
	}{{"q8_0", typeQ8_0, x8, want8}, {"q4_0", typeQ4_0, x4, want4}} {
		t.Run(c.name, func(t *testing.T) {
			lr := newRows(c.typ, qk, false, 2)
			if lr.RowBytes() != len(c.want) || lr.ElemSize != 0 || len(lr.Data) != 2*len(c.want) {
				t.Fatalf("row of %d bytes (elem size %d, %d data bytes), want %d", lr.RowBytes(), lr.ElemSize, len(lr.Data), len(c.want))
			}
			lr.SetRow(2, 1, c.x)
			if got := lr.Data[len(c.want):]; !bytes.Equal(got, c.want) {
				t.Fatalf("encoded % x\nwant       % x", got, c.want)
			}
			got := make([]float32, qk)
			lr.Row(2, 1, got)
			for j := range got {
				if got[j] != c.x[j] {
					t.Fatalf("element %d decoded as %g, want %g", j, got[j], c.x[j])
				}
			}
		})
	}
}

// SetRow then Row stays within the format's error bound, block by block.
func TestQuantizedRowRoundTrip(t *testing.T) {
	// f16d is the largest error of a scale d stored as f16: relative 2^-11, or
	// 2^-25 (half the smallest subnormal) for a small d.
	f16d := func(d float64) float64 { return math.Max(d/2048, 0x1p-25) }
	for _, c := range []struct {
		name string
		typ  int32
		// bound is the largest error of an element of a block whose largest
		// magnitude is amax: half a step (q8_0: d = amax/127), or for q4_0 a whole
		// step d = amax/8 (the element opposite the max maps to 16, clamped to 15),
		// plus the f16 rounding of d times the largest |q|.
		bound func(amax float64) float64
	}{
		{"q8_0", typeQ8_0, func(a float64) float64 { return a/127/2 + 127*f16d(a/127) }},
		{"q4_0", typeQ4_0, func(a float64) float64 { return a/8 + 8*f16d(a/8) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewSource(7))
			const cells, elems = 5, 4 * qk
			lr := newRows(c.typ, elems, false, cells)
			rows := make([][]float32, cells)
			for cell := range rows {
				rows[cell] = make([]float32, elems)
				for b := range elems / qk {
					scale := []float32{0, 1e-3, 1, 37, 500}[(cell+b)%5]
					for j := range qk {
						rows[cell][b*qk+j] = scale * float32(rng.NormFloat64())
					}
				}
				lr.SetRow(cells, cell, rows[cell])
			}
			got := make([]float32, elems)
			for cell, x := range rows {
				lr.Row(cells, cell, got)
				for b := range elems / qk {
					amax := 0.0
					for _, v := range x[b*qk : (b+1)*qk] {
						amax = math.Max(amax, math.Abs(float64(v)))
					}
					for j := b * qk; j < (b+1)*qk; j++ {
						if e := math.Abs(float64(got[j] - x[j])); e > c.bound(amax) {
							t.Fatalf("cell %d element %d: %g decoded as %g (error %g > %g)", cell, j, x[j], got[j], e, c.bound(amax))
						}
					}
				}
			}
			// Requantizing decoded rows reproduces them.
			again := newRows(c.typ, elems, false, cells)
			for cell := range cells {
				lr.Row(cells, cell, got)
				again.SetRow(cells, cell, got)
			}
			if !bytes.Equal(again.Data, lr.Data) {
				t.Fatal("requantizing decoded rows changed them")
			}
			// CopyRow copies whole quantized rows.
			cp := newRows(c.typ, elems, false, 2)
			cp.CopyRow(2, 1, &lr, cells, 3)
			n := lr.RowBytes()
			if !bytes.Equal(cp.Data[n:], lr.Data[3*n:4*n]) || !bytes.Equal(cp.Data[:n], make([]byte, n)) {
				t.Fatal("CopyRow did not copy exactly one row")
			}
		})
	}
}

// Rows ggml quantized in a context, decoded and quantized again by SetRow, give
// the context's bytes: our quantizer agrees with ggml's on ggml's own output.
func TestQuantizerMatchesGGMLOnItsOwnOutput(t *testing.T) {
	m := loadKVModel(t, "")
	prompt := tokenizeOn(t, m, "USER: rows that ggml quantized itself ASSISTANT:")
	for _, p := range []ContextParams{
		{TypeK: "q8_0"},
		{TypeK: "q4_0", TypeV: "q8_0", FlashAttn: true},
		{TypeK: "q8_0", TypeV: "q4_0", FlashAttn: true},
	} {
		c := newCtxOn(t, m, p)
		t.Run(c.KVLayout().String(), func(t *testing.T) {
			decodeTokens(t, c, prompt, 0, 0)
			sc, err := c.ReadSeqCache(0)
			if err != nil {
				t.Fatal(err)
			}
			n := sc.Cells()
			checked := 0
			for l := range sc.K {
				for _, lr := range []*LayerRows{&sc.K[l], &sc.V[l]} {
					if !quantized(lr.Type) {
						continue
					}
					again := newRows(lr.Type, lr.RowElems, false, n)
					row := make([]float32, lr.RowElems)
					for cell := range n {
						lr.Row(n, cell, row)
						again.SetRow(n, cell, row)
					}
					if !bytes.Equal(again.Data, lr.Data) {
						t.Fatalf("layer %d %s: requantized rows differ from ggml's", l, typeName(lr.Type))
					}
					checked++
				}
			}
			want := len(sc.K)
			if quantized(c.KVLayout().TypeV) {
				want *= 2
			}
			if checked != want {
				t.Fatalf("checked %d quantized layers, want %d", checked, want)
			}
		})
	}
}

// A sequence written back unchanged gives the logits it gave before.
func TestSeqCacheWriteBackGivesIdenticalLogitsForEveryLayout(t *testing.T) {
	m := loadKVModel(t, "")
	prompt := tokenizeOn(t, m, "USER: a prompt long enough to fill a few cells ASSISTANT:")
	next := prompt[3]
	for _, p := range []ContextParams{
		{},
		{TypeK: "q8_0"},
		{TypeK: "q4_0", FlashAttn: true},
		{TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true},
	} {
		ref := newCtxOn(t, m, p)
		t.Run(ref.KVLayout().String(), func(t *testing.T) {
			decodeTokens(t, ref, prompt, 0, 0)
			want := decodeTokens(t, ref, []Token{next}, len(prompt), 0)

			c := newCtxOn(t, m, p)
			decodeTokens(t, c, prompt, 0, 0)
			sc, err := c.ReadSeqCache(0)
			if err != nil {
				t.Fatal(err)
			}
			if sc.Convert(c.KVLayout()) != sc {
				t.Fatal("Convert to the cache's own layout made a copy")
			}
			if err := c.WriteSeqCache(0, sc); err != nil {
				t.Fatal(err)
			}
			got := decodeTokens(t, c, []Token{next}, len(prompt), 0)
			if d := maxAbsDiff(want, got); d != 0 {
				t.Fatalf("logits differ by up to %g after writing the cache back", d)
			}
		})
	}
}

// A sequence decoded in an f16 context (V transposed, no flash attention) and
// moved into a context of another layout continues as the same prompt decoded
// there directly, within the error the cache types add.
func TestMovedSequenceMatchesDirectDecode(t *testing.T) {
	for _, arch := range []string{"", testmodel.ArchGemma3} {
		m := loadKVModel(t, arch)
		prompt := tokenizeOn(t, m, "USER: move this sequence to another cache layout ASSISTANT:")
		next := prompt[5]
		src := newCtxOn(t, m, ContextParams{})
		decodeTokens(t, src, prompt, 0, 0)
		sc, err := src.ReadSeqCache(0)
		if err != nil {
			t.Fatal(err)
		}
		srcNext := decodeTokens(t, src, []Token{next}, len(prompt), 0)
		if (sc.SWA != nil) != (arch == testmodel.ArchGemma3) {
			t.Fatalf("%s: sliding-window cache %v", arch, sc.SWA != nil)
		}
		for _, c := range []struct {
			p ContextParams
			// tol bounds the largest logit difference between the moved sequence
			// and the direct decode (logits spread with a standard deviation of
			// about 3). Both differ from the f16 source by the same kind of error:
			// the direct decode computes the prompt through the destination's
			// kernels and quantizes float32 rows, the move quantizes the source's
			// f16 rows. Measured max |moved - direct| (llama / gemma3), with
			// |direct - src| (the next token decoded in the source) for scale:
			//   k=q8_0 v=f16 v_trans  0.093   / 0.0104   (direct vs src 0.127 / 0.0145)
			//   k=f16 v=f16 (fa)      0.00445 / 0.00266  (0.00841 / 0.00428)
			//   k=f16 v=q8_0 (fa)     0.0408  / 0.0105   (0.0602 / 0.0121)
			//   k=q8_0 v=q8_0 (fa)    0.0867  / 0.0223   (0.104 / 0.0191)
			//   k=q4_0 v=q4_0 (fa)    1.51    / 0.256    (0.786 / 0.300)
			// The tolerances leave about 2.5x margin over the larger value.
			tol float64
		}{
			{ContextParams{TypeK: "q8_0"}, 0.25},
			{ContextParams{FlashAttn: true}, 0.012},
			{ContextParams{TypeV: "q8_0", FlashAttn: true}, 0.1},
			{ContextParams{TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true}, 0.22},
			{ContextParams{TypeK: "q4_0", TypeV: "q4_0", FlashAttn: true}, 3.8},
		} {
			direct := newCtxOn(t, m, c.p)
			name := fmt.Sprintf("%s/%s", cmp.Or(arch, "llama"), direct.KVLayout())
			t.Run(name, func(t *testing.T) {
				decodeTokens(t, direct, prompt, 0, 0)
				want := decodeTokens(t, direct, []Token{next}, len(prompt), 0)

				dst := newCtxOn(t, m, c.p)
				moved := sc.Convert(dst.KVLayout())
				if moved == sc || !moved.hasLayout(dst.KVLayout()) || (moved.SWA == nil) != (sc.SWA == nil) {
					t.Fatalf("Convert gave layout K %s V %s", typeName(moved.K[0].Type), typeName(moved.V[0].Type))
				}
				if err := dst.WriteSeqCache(0, moved); err != nil {
					t.Fatal(err)
				}
				if dst.SeqPosMax(0) != len(prompt)-1 {
					t.Fatalf("moved sequence ends at %d, want %d", dst.SeqPosMax(0), len(prompt)-1)
				}
				got := decodeTokens(t, dst, []Token{next}, len(prompt), 0)
				d := maxAbsDiff(want, got)
				t.Logf("max logit difference %.3g (direct vs src %.3g)", d, maxAbsDiff(want, srcNext))
				if d > c.tol {
					t.Fatalf("moved sequence's logits differ from the direct decode's by %g (> %g)", d, c.tol)
				}
				if argmax(got) != argmax(want) {
					t.Fatalf("moved sequence predicts %d, direct decode %d", argmax(got), argmax(want))
				}
			})
		}
		// Writing a cache in another layout is refused before llama.cpp sees it.
		other := newCtxOn(t, m, ContextParams{TypeK: "q8_0"})
		if err := other.WriteSeqCache(0, sc); err == nil || !strings.Contains(err.Error(), "Convert") {
			t.Fatalf("%s: f16 cache written into a q8_0 context: %v", arch, err)
		}
	}
}

// finiteSynth is synthCache (f16 rows) with every value finite and below 1 in
// magnitude: the synthetic bytes may otherwise spell infinities or NaNs.
func finiteSynth(n, nl, width int) *SeqCache {
	s := synthCache(n, nl, width)
	for l := range s.K {
		for _, lr := range []*LayerRows{&s.K[l], &s.V[l]} {
			for i := 0; i < len(lr.Data); i += 2 {
				lr.Data[i+1] &= 0xBB // sign kept, exponent even and below 15
			}
		}
	}
	return s
}

// KVBytesPerCell is the bytes of the rows ReadSeqCache returns, per cell.
func TestKVBytesPerCellMatchesReadRows(t *testing.T) {
	for _, arch := range []string{"", testmodel.ArchGemma3} {
		m := loadKVModel(t, arch)
		prompt := tokenizeOn(t, m, "USER: count the bytes ASSISTANT:")
		for _, p := range []ContextParams{
			{},
			{TypeK: "f32", TypeV: "bf16"},
			{TypeK: "q8_0"},
			{TypeK: "q4_0", TypeV: "q8_0", FlashAttn: true},
		} {
			c := newCtxOn(t, m, p)
			t.Run(cmp.Or(arch, "llama")+"/"+c.KVLayout().String(), func(t *testing.T) {
				decodeTokens(t, c, prompt, 0, 0)
				sc, err := c.ReadSeqCache(0)
				if err != nil {
					t.Fatal(err)
				}
				var perCell int64
				for part := sc; part != nil; part = part.SWA {
					total := 0
					for l := range part.K {
						total += len(part.K[l].Data) + len(part.V[l].Data)
					}
					if total%part.Cells() != 0 {
						t.Fatalf("%d bytes for %d cells", total, part.Cells())
					}
					perCell += int64(total / part.Cells())
				}
				if got := c.KVBytesPerCell(); got != perCell {
					t.Fatalf("KVBytesPerCell %d, rows read take %d per cell", got, perCell)
				}
			})
		}
	}
}

func TestNewContextRefusesUnsupportedKVLayouts(t *testing.T) {
	for _, c := range []struct {
		p    ContextParams
		want string
	}{
		{ContextParams{TypeV: "q8_0"}, "needs flash attention"},
		{ContextParams{TypeK: "q4_0", TypeV: "q4_0"}, "needs flash attention"},
		{ContextParams{TypeK: "q8_0"}, "multiple of 32"}, // the default model's heads are 16 wide
		{ContextParams{TypeV: "q4_0", FlashAttn: true}, "multiple of 32"},
		{ContextParams{TypeK: "q5_1"}, "unsupported KV cache type"},
	} {
		c.p.NCtx, c.p.Threads = 64, 1
		ctx, err := NewContext(tmModel, c.p)
		if err == nil {
			ctx.Close()
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one containing %q", c.p, err, c.want)
		}
	}
}

// Convert on a synthetic iSWA cache: both parts change layout, rows keep their
// values, and the result encodes to a state the parser reads back.
func TestConvertChangesBothCachesOfASlidingWindowModel(t *testing.T) {
	const width = 2 * qk
	info := ModelInfo{Arch: "gemma3", Layers: 12, SWA: 32, FullLayers: fullLayers("gemma3", 12)}
	base, swa := finiteSynth(7, 2, width), finiteSynth(5, 10, width)
	base.SWA = swa
	from := KVLayout{TypeK: typeF16, TypeV: typeF16, VTrans: true}
	if !base.hasLayout(from) || base.Convert(from) != base {
		t.Fatal("Convert to the cache's own layout made a copy")
	}
	to := KVLayout{TypeK: typeQ8_0, TypeV: typeF16}
	got := base.Convert(to)
	if !got.hasLayout(to) || got.SWA == nil || got.SWA == swa || !got.SWA.hasLayout(to) || base.SWA != swa || !base.hasLayout(from) {
		t.Fatal("Convert did not convert both parts into new caches")
	}
	// f16 V, transposed or not, holds the same values.
	want, row := make([]float32, width), make([]float32, width)
	for _, pair := range [][2]*SeqCache{{base, got}, {swa, got.SWA}} {
		n := pair[0].Cells()
		for l := range pair[0].V {
			for c := range n {
				pair[0].V[l].Row(n, c, want)
				pair[1].V[l].Row(n, c, row)
				if maxAbsDiff(want, row) != 0 {
					t.Fatalf("layer %d cell %d: V changed when untransposed", l, c)
				}
				pair[0].K[l].Row(n, c, want)
				pair[1].K[l].Row(n, c, row)
				if d := maxAbsDiff(want, row); d > 1.0/127 {
					t.Fatalf("layer %d cell %d: K changed by %g as q8_0", l, c, d)
				}
			}
		}
	}
	b := got.encode()
	back, err := parseState(b, info)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back.encode(), b) || !back.hasLayout(to) {
		t.Fatal("the converted state does not parse back to itself")
	}
	// And back to the original layout: f16 V exactly, K within q8_0's error.
	if again := got.Convert(from); !again.hasLayout(from) || !again.SWA.hasLayout(from) ||
		!bytes.Equal(again.V[1].Data, base.V[1].Data) {
		t.Fatal("converting back did not restore the transposed f16 V")
	}
	// Layouts the rows cannot take are a programming error.
	for name, bad := range map[string]KVLayout{
		"transposed quantized V": {TypeK: typeF16, TypeV: typeQ8_0, VTrans: true},
		"unknown type":           {TypeK: 99, TypeV: typeF16, VTrans: true},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: Convert did not panic", name)
				}
			}()
			base.Convert(bad)
		}()
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Convert of 8-element rows to q8_0 did not panic")
			}
		}()
		finiteSynth(2, 1, 8).Convert(to)
	}()
}

// The parser refuses quantized rows it cannot hold: a transposed quantized V, a
// row that is not whole blocks.
func TestSeqCacheParserRefusesBadQuantizedRows(t *testing.T) {
	good := finiteSynth(3, 2, 2*qk).Convert(KVLayout{TypeK: typeQ4_0, TypeV: typeQ8_0})
	if _, err := parseSeqCache(good.encode()); err != nil {
		t.Fatalf("a quantized state does not parse: %v", err)
	}
	transV := synthCache(3, 2, 2*qk)
	for l := range transV.V {
		transV.V[l].Type = typeQ8_0 // still flagged transposed
	}
	badRow := good.encode()
	// The first K layer's row size follows the header: streams, cells, v_trans, n_layer, type.
	off := 4 + 4*good.NStream + 12*good.Cells() + 4 + 4 + 4
	if got := binary.LittleEndian.Uint64(badRow[off:]); got != 2*18 {
		t.Fatalf("row size at %d is %d, not the q4_0 row's", off, got)
	}
	binary.LittleEndian.PutUint64(badRow[off:], 2*18+1)
	for name, c := range map[string]struct {
		b    []byte
		want string
	}{
		"transposed quantized V": {transV.encode(), "transposed V"},
		"partial block":          {badRow, "row size"},
	} {
		if _, err := parseSeqCache(c.b); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", name, err, c.want)
		}
	}
}
