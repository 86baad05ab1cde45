package llama

import (
	"bytes"
	"errors"
	"image"
	"image/color"
	"image/png"
	"math"
	"slices"
	"testing"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// An M-RoPE model (the qwen25vl test model): our batches give an image its 2-D
// grid of positions as llama.cpp's own mtmd helper does, the image advances the
// position by max(nx, ny), and restoring a sequence through the state calls is
// refused before llama.cpp could read past its position buffer.

func loadQwen(t *testing.T) (*Model, *Vision) {
	t.Helper()
	opt, err := testmodel.FamilyOptions(testmodel.ArchQwen25VL)
	if err != nil {
		t.Fatal(err)
	}
	mp, vp, err := testmodel.Ensure(opt)
	if err != nil {
		t.Fatal(err)
	}
	m, err := LoadModel(mp, ModelParams{UseMmap: true})
	if err != nil {
		t.Fatal(err)
	}
	v, err := LoadVision(m, vp, VisionParams{Threads: 1})
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close(); m.Close() })
	return m, v
}

// rectPNG is a w x h picture (not square, so that rows and columns differ).
func rectPNG(t testing.TB, w, h int) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			img.SetRGBA(x, y, color.RGBA{uint8(7 * x), uint8(11 * y), uint8(3 * (x + y)), 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// evalMRoPE decodes p one batch per chunk with our batches: text at one position
// per token, an image at its grid (transposed: rows and columns swapped, to show
// the layout matters). It returns the last logits and the position after p.
func evalMRoPE(t *testing.T, c *Context, v *Vision, p *Prompt, transposed bool) ([]float32, int) {
	t.Helper()
	tb := NewBatch(512, 0, 1)
	defer tb.Close()
	eb := NewBatchMRoPE(512, v.EmbdSize(), 1)
	defer eb.Close()
	pos := 0
	for ci, ch := range p.Chunks {
		last := ci == len(p.Chunks)-1
		b := tb
		b.Clear()
		if ch.Kind == ChunkText {
			for i, tok := range ch.Tokens {
				b.Add(tok, pos+i, 0, last && i == len(ch.Tokens)-1)
			}
		} else {
			embd, err := p.EncodeImage(ch)
			if err != nil {
				t.Fatal(err)
			}
			b = eb
			b.Clear()
			w := v.EmbdSize()
			for r := range ch.NTokens {
				y, x := r/ch.NX, r%ch.NX
				if transposed {
					y, x = x, y
				}
				b.AddEmbdMRoPE(embd[r*w:(r+1)*w], pos, pos+y, pos+x, 0, last && r == ch.NTokens-1)
			}
		}
		if err := c.Decode(b); err != nil {
			t.Fatal(err)
		}
		for i := range b.Len() {
			if want := pos + i; ch.Kind == ChunkImage {
				want = pos
				if got := b.Pos(i); got != want {
					t.Fatalf("image entry %d at position %d, want %d", i, got, want)
				}
			}
		}
		pos += ch.NPos
	}
	return append([]float32(nil), c.Logits(-1)...), pos
}

func maxDiff(a, b []float32) float64 {
	d := 0.0
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func TestMRoPEImageBatchMatchesLlamaCppHelper(t *testing.T) {
	m, v := loadQwen(t)
	if !m.Info().MRoPE || !v.MRoPE() {
		t.Fatalf("qwen25vl test model: model M-RoPE %v, vision M-RoPE %v", m.Info().MRoPE, v.MRoPE())
	}
	// 64x32 pixels, patch 4, merged 2x2: an 8 x 4 grid of 32 embeddings, 8 positions
	text := "<|im_start|>user\n" + MediaMarker() + "\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
	p, err := v.Tokenize(text, [][]byte{rectPNG(t, 64, 32)}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var img *Chunk
	for i := range p.Chunks {
		if p.Chunks[i].Kind == ChunkImage {
			img = &p.Chunks[i]
		}
	}
	if img == nil || img.NX != 8 || img.NY != 4 || img.NTokens != 32 || img.NPos != 8 {
		t.Fatalf("image chunk %+v, want an 8x4 grid of 32 embeddings taking 8 positions", img)
	}
	if p.NPos() != p.NTokens()-32+8 {
		t.Fatalf("prompt: %d positions for %d tokens", p.NPos(), p.NTokens())
	}

	newQ := func() *Context {
		c, err := NewContext(m, ContextParams{NCtx: 512, NBatch: 512, NSeqMax: 1, Threads: 1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	ref := newQ()
	next, err := p.EvalWithHelper(ref, 0, 0, 512)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]float32(nil), ref.Logits(-1)...)
	if next != p.NPos() {
		t.Fatalf("llama.cpp's helper ends the prompt at position %d, Prompt.NPos is %d", next, p.NPos())
	}

	ours := newQ()
	got, pos := evalMRoPE(t, ours, v, p, false)
	if pos != next {
		t.Fatalf("our positions end at %d, the helper's at %d", pos, next)
	}
	if d := maxDiff(got, want); d > 1e-4 {
		t.Fatalf("our M-RoPE batches differ from llama.cpp's helper (max logit diff %g)", d)
	}
	if ours.SeqPosMax(0) != next-1 || ours.SeqPosMin(0) != 0 {
		t.Fatalf("sequence spans positions [%d, %d], want [0, %d]", ours.SeqPosMin(0), ours.SeqPosMax(0), next-1)
	}
	// The layout matters: rows and columns swapped give other logits.
	swapped, _ := evalMRoPE(t, newQ(), v, p, true)
	if d := maxDiff(swapped, want); d < 1e-3 {
		t.Fatalf("a transposed grid gives the same logits (max diff %g): the test cannot tell layouts apart", d)
	}

	// A greedy token decoded after the prompt continues at the helper's position.
	tok := argmax(want)
	b := NewBatch(1, 0, 1)
	defer b.Close()
	for _, c := range []*Context{ref, ours} {
		b.Clear()
		b.Add(tok, next, 0, true)
		if err := c.Decode(b); err != nil {
			t.Fatal(err)
		}
	}
	if d := maxDiff(ref.Logits(0), ours.Logits(0)); d > 1e-4 {
		t.Fatalf("next token's logits differ by %g", d)
	}

	// Rewriting the sequence through the state calls is refused up front.
	src, err := ours.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := ours.WriteSeqCache(0, src); !errors.Is(err, ErrMRoPERestore) {
		t.Fatalf("WriteSeqCache on an M-RoPE model: %v, want ErrMRoPERestore", err)
	}
	if ours.SeqPosMax(0) != next {
		t.Fatalf("the refused write changed the sequence (max position %d)", ours.SeqPosMax(0))
	}
}

// The KV hook on an M-RoPE model's picture: its cells share one position and
// differ in their extra components. Merged in place, every kept cell reads back
// with the position and components of the entry the plan gave it; evicting one
// picture cell by index removes that cell alone; moved unchanged into another
// context, the sequence continues with the same logits.
func TestMRoPEPictureCellsRewriteByIndex(t *testing.T) {
	m, v := loadQwen(t)
	text, imgs := "<|im_start|>user\n"+MediaMarker()+"\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n", [][]byte{rectPNG(t, 64, 32)}
	p, err := v.Tokenize(text, imgs, true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	newQ := func(nseq int) *Context {
		c, err := NewContext(m, ContextParams{NCtx: 512 * nseq, NBatch: 512, NSeqMax: nseq, Threads: 1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		return c
	}
	c := newQ(1)
	_, next := evalMRoPE(t, c, v, p, false)
	cells, err := c.SeqCells(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	shared := map[int]int{}
	for _, cell := range cells {
		shared[cell.Pos]++
	}
	picPos, most := 0, 0
	for pos, n := range shared {
		if n > most {
			picPos, most = pos, n
		}
	}
	if most < 8 {
		t.Fatalf("no position is shared by a picture's cells (at most %d cells share one)", most)
	}

	// Moved unchanged: the same next-token logits as the source.
	moved := newQ(2)
	layers, _ := c.CacheLayers(0)
	ident := &CellPlan{N: len(cells), First: -1, Sources: make([][][]int, len(layers))}
	for l := range layers {
		for _, cell := range cells {
			ident.Sources[l] = append(ident.Sources[l], []int{cell.Index})
		}
	}
	for _, cell := range cells {
		ident.Meta, ident.Pos = append(ident.Meta, cell.Index), append(ident.Pos, cell.Pos)
	}
	ref := newQ(1)
	evalMRoPE(t, ref, v, p, false)
	if _, err := ref.RewriteCells(0, moved, 1, ident); err != nil {
		t.Fatal(err)
	}
	back, err := moved.SeqCells(0, 1)
	if err != nil || !slices.Equal(back, func() []Cell {
		out := slices.Clone(cells)
		for i := range out {
			out[i].Index = i
		}
		return out
	}()) {
		t.Fatalf("moved cells read back as %v (%v)", back, err)
	}
	tok := Token(5)
	want := decodeAt(t, c, tok, next, 0)
	if got := decodeAt(t, moved, tok, next, 1); maxDiff(got, want) != 0 {
		t.Fatalf("the moved sequence's next logits differ by %g", maxDiff(got, want))
	}
	c.SeqRemove(0, next, -1) // back to the prompt alone

	// Merged in place: positions and components as the plan gave them.
	lps := mergePlan(len(cells), len(layers))
	plan := cellPlanOf(0, cells, lps)
	if _, err := c.RewriteCells(0, c, 0, plan); err != nil {
		t.Fatal(err)
	}
	kept, err := c.SeqCells(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(kept) != plan.N {
		t.Fatalf("%d cells after the merge, the plan wrote %d", len(kept), plan.N)
	}
	onPic := 0
	for j, cell := range kept {
		src := cells[lps[0].Keep[j]]
		if cell.Pos != src.Pos || cell.X != src.X || cell.Y != src.Y {
			t.Fatalf("kept cell %d reads back as %+v, the plan gave it entry %+v", j, cell, src)
		}
		if cell.Pos == picPos {
			onPic++
		}
	}
	if onPic < 2 {
		t.Fatalf("only %d kept cells on the picture's position", onPic)
	}
	// Evict one picture cell: the others at its position stay.
	var victim int
	for _, cell := range kept {
		if cell.Pos == picPos {
			victim = cell.Index
		}
	}
	if err := c.EvictCell(0, victim); err != nil {
		t.Fatal(err)
	}
	after, _ := c.SeqCells(0, 0)
	left := 0
	for _, cell := range after {
		if cell.Pos == picPos {
			left++
		}
	}
	if len(after) != plan.N-1 || left != onPic-1 {
		t.Fatalf("evicting one picture cell left %d cells (%d on the picture), want %d (%d)", len(after), left, plan.N-1, onPic-1)
	}
	decodeAt(t, c, tok, next, 0) // the sequence decodes on
}

// decodeAt decodes one token at pos for seq and returns its logits.
func decodeAt(t *testing.T, c *Context, tok Token, pos, seq int) []float32 {
	t.Helper()
	b := NewBatch(1, 0, 1)
	defer b.Close()
	b.Add(tok, pos, seq, true)
	if err := c.Decode(b); err != nil {
		t.Fatal(err)
	}
	return append([]float32(nil), c.Logits(0)...)
}
