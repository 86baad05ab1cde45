package llama

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// One model and vision encoder for the whole test binary: loading is the slow part.
var (
	tmOpts   = testmodel.DefaultOptions()
	tmModel  *Model
	tmVision *Vision
)

func TestMain(m *testing.M) {
	Init(LogError)
	modelPath, mmprojPath, err := testmodel.Ensure(tmOpts)
	if err != nil {
		panic(err)
	}
	tmModel, err = LoadModel(modelPath, ModelParams{UseMmap: true})
	if err != nil {
		panic(err)
	}
	tmVision, err = LoadVision(tmModel, mmprojPath, VisionParams{Threads: 1})
	if err != nil {
		panic(err)
	}
	code := m.Run()
	tmVision.Close()
	tmModel.Close()
	os.Exit(code)
}

func newCtx(t testing.TB, p ContextParams) *Context {
	t.Helper()
	if p.NCtx == 0 {
		p.NCtx = 1024
	}
	if p.NSeqMax == 0 {
		p.NSeqMax = 1
	}
	if p.Threads == 0 {
		p.Threads = 1
	}
	c, err := NewContext(tmModel, p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// decodeTokens decodes toks for seq starting at pos0 and returns the last row's logits (copied).
func decodeTokens(t testing.TB, c *Context, toks []Token, pos0, seq int) []float32 {
	t.Helper()
	b := NewBatch(len(toks), 0, 1)
	defer b.Close()
	for i, tok := range toks {
		b.Add(tok, pos0+i, seq, i == len(toks)-1)
	}
	if err := c.Decode(b); err != nil {
		t.Fatal(err)
	}
	return append([]float32(nil), c.Logits(len(toks)-1)...)
}

func argmax(v []float32) Token {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return Token(best)
}

func greedy(t testing.TB, c *Context, prompt []Token, seq, n int) []Token {
	t.Helper()
	logits := decodeTokens(t, c, prompt, 0, seq)
	var out []Token
	pos := len(prompt)
	for range n {
		tok := argmax(logits)
		out = append(out, tok)
		logits = decodeTokens(t, c, []Token{tok}, pos, seq)
		pos++
	}
	return out
}

func mustTokenize(t testing.TB, s string) []Token {
	t.Helper()
	toks, err := tmModel.Tokenize(s, true, true)
	if err != nil {
		t.Fatal(err)
	}
	return toks
}

func TestModelMetadataMatchesGenerator(t *testing.T) {
	info := tmModel.Info()
	if info.Arch != "llama" || info.Layers != tmOpts.Layers || info.Heads != tmOpts.Heads ||
		info.KVHeads != tmOpts.KVHeads || info.Embd != tmOpts.Embd || info.CtxTrain != tmOpts.CtxTrain {
		t.Fatalf("metadata %+v does not match options %+v", info, tmOpts)
	}
	if info.VocabSize < 256 || info.ChatTmpl == "" || info.KVRowElems != info.KVHeads*info.HeadDim {
		t.Fatalf("vocab/template/kv row: %+v", info)
	}
}

func TestLoadModelErrors(t *testing.T) {
	dir := t.TempDir()
	notGGUF := dir + "/x.gguf"
	if err := os.WriteFile(notGGUF, []byte("this is not a model"), 0o644); err != nil {
		t.Fatal(err)
	}
	truncated := dir + "/t.gguf"
	if err := os.WriteFile(truncated, []byte("GGUF\x03\x00\x00\x00\x01"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, path := range map[string]string{"missing": dir + "/none.gguf", "not gguf": notGGUF, "truncated": truncated} {
		if m, err := LoadModel(path, ModelParams{}); err == nil {
			m.Close()
			t.Errorf("%s: loaded without error", name)
		}
	}
}

func TestTokenizeRoundTrip(t *testing.T) {
	for _, s := range []string{"Hello, world!", "What color is the circle?", "naïve café 日本語 🙂", "  spaces  and\nnewlines\t"} {
		toks, err := tmModel.Tokenize(s, false, false)
		if err != nil {
			t.Fatal(err)
		}
		if got := tmModel.Detokenize(toks, false, false); got != s {
			t.Errorf("Detokenize(Tokenize(%q)) = %q", s, got)
		}
		var pieces []byte
		for _, tok := range toks {
			pieces = append(pieces, tmModel.TokenPiece(tok, false)...)
		}
		if got := strings.TrimPrefix(string(pieces), " "); got != s && string(pieces) != s {
			t.Errorf("pieces of %q joined = %q", s, pieces)
		}
	}
}

func TestChatTemplateRendersRolesAndAssistantPrefix(t *testing.T) {
	out, err := tmModel.ApplyChatTemplate("", []ChatMessage{
		{Role: "system", Content: "Be brief."},
		{Role: "user", Content: "Hi " + MediaMarker()},
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Be brief.", "USER:", "Hi " + MediaMarker(), "ASSISTANT:"} {
		if !strings.Contains(out, want) {
			t.Errorf("rendered template %q lacks %q", out, want)
		}
	}
}

func TestGreedyDecodingIsDeterministic(t *testing.T) {
	prompt := mustTokenize(t, "USER: tell me a story ASSISTANT:")
	a := greedy(t, newCtx(t, ContextParams{}), prompt, 0, 24)
	b := greedy(t, newCtx(t, ContextParams{}), prompt, 0, 24)
	if !equalTokens(a, b) {
		t.Fatalf("two greedy runs differ:\n%v\n%v", a, b)
	}
	distinct := map[Token]bool{}
	for _, tok := range a {
		distinct[tok] = true
	}
	if len(distinct) < 3 {
		t.Fatalf("greedy output is degenerate: %v", a)
	}
}

func equalTokens(a, b []Token) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func pngOf(t testing.TB, size int, fill func(x, y int) color.RGBA) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, size, size))
	for y := range size {
		for x := range size {
			img.SetRGBA(x, y, fill(x, y))
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// evalPrompt decodes a multimodal prompt into seq and returns the last logits.
func evalPrompt(t testing.TB, c *Context, p *Prompt, seq int) []float32 {
	t.Helper()
	pos := 0
	var logits []float32
	for i, ch := range p.Chunks {
		last := i == len(p.Chunks)-1
		switch ch.Kind {
		case ChunkText:
			logits = decodeTokens(t, c, ch.Tokens, pos, seq)
		case ChunkImage:
			embd, err := p.EncodeImage(ch)
			if err != nil {
				t.Fatal(err)
			}
			w := tmVision.EmbdSize()
			b := NewBatch(ch.NTokens, w, 1)
			for r := 0; r < ch.NTokens; r++ {
				b.AddEmbd(embd[r*w:(r+1)*w], pos+r, seq, last && r == ch.NTokens-1)
			}
			if err := c.Decode(b); err != nil {
				t.Fatal(err)
			}
			b.Close()
			if last {
				logits = append([]float32(nil), c.Logits(ch.NTokens-1)...)
			}
		}
		pos += ch.NTokens
	}
	return logits
}

func TestImageGivesExpectedTokensAndChangesLogits(t *testing.T) {
	red := pngOf(t, 64, func(x, y int) color.RGBA { return color.RGBA{220, 30, 30, 255} })
	stripes := pngOf(t, 64, func(x, y int) color.RGBA {
		if (x/8)%2 == 0 {
			return color.RGBA{20, 20, 200, 255}
		}
		return color.RGBA{250, 250, 250, 255}
	})
	var logits [][]float32
	for _, img := range [][]byte{red, stripes} {
		p, err := tmVision.Tokenize("USER: "+MediaMarker()+"\nWhat is this? ASSISTANT:", [][]byte{img}, true)
		if err != nil {
			t.Fatal(err)
		}
		nImg := 0
		for _, ch := range p.Chunks {
			if ch.Kind == ChunkImage {
				nImg += ch.NTokens
			}
		}
		if nImg != tmOpts.ImageTokens() {
			t.Fatalf("image gave %d tokens, want %d", nImg, tmOpts.ImageTokens())
		}
		logits = append(logits, evalPrompt(t, newCtx(t, ContextParams{}), p, 0))
		p.Close()
	}
	diff := 0.0
	for i := range logits[0] {
		diff = math.Max(diff, math.Abs(float64(logits[0][i]-logits[1][i])))
	}
	if diff < 1e-3 {
		t.Fatalf("two different images gave the same logits (max diff %g)", diff)
	}
}

func TestBadImageBytesAreAnError(t *testing.T) {
	good := pngOf(t, 16, func(x, y int) color.RGBA { return color.RGBA{1, 2, 3, 255} })
	for name, img := range map[string][]byte{"text": []byte("hello"), "truncated png": good[:len(good)/2], "empty": nil} {
		if p, err := tmVision.Tokenize("x "+MediaMarker(), [][]byte{img}, true); err == nil {
			p.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}

// Two sequences decoded in the same batches give the tokens each gives alone.
func TestBatchedSequencesMatchAlone(t *testing.T) {
	prompts := [][]Token{mustTokenize(t, "USER: first question ASSISTANT:"), mustTokenize(t, "USER: and a second, longer one here ASSISTANT:")}
	const n = 16
	alone := make([][]Token, 2)
	for i, p := range prompts {
		alone[i] = greedy(t, newCtx(t, ContextParams{NSeqMax: 2}), p, i, n)
	}
	c := newCtx(t, ContextParams{NSeqMax: 2})
	b := NewBatch(256, 0, 1)
	defer b.Close()
	b.Clear()
	rows := make([]int, 2)
	for s, p := range prompts {
		for i, tok := range p {
			r := b.Add(tok, i, s, i == len(p)-1)
			if i == len(p)-1 {
				rows[s] = r
			}
		}
	}
	if err := c.Decode(b); err != nil {
		t.Fatal(err)
	}
	together := make([][]Token, 2)
	for step := 0; step < n; step++ {
		next := make([]Token, 2)
		for s := range prompts {
			next[s] = argmax(c.Logits(rows[s]))
			together[s] = append(together[s], next[s])
		}
		b.Clear()
		for s, p := range prompts {
			rows[s] = b.Add(next[s], len(p)+step, s, true)
		}
		if err := c.Decode(b); err != nil {
			t.Fatal(err)
		}
	}
	for s := range prompts {
		if !equalTokens(alone[s], together[s]) {
			t.Errorf("seq %d alone %v, batched %v", s, alone[s], together[s])
		}
	}
}

func TestCapturedAttentionRowsAreProbabilities(t *testing.T) {
	c := newCtx(t, ContextParams{Capture: true})
	prompt := mustTokenize(t, strings.Repeat("the quick brown fox jumps over the lazy dog. ", 6))
	n := len(prompt)
	c.CaptureReset()
	c.CaptureEnable(true)
	decodeTokens(t, c, prompt, 0, 0)
	c.CaptureEnable(false)
	if c.CaptureRows(0) != n {
		t.Fatalf("captured %d query rows, want %d", c.CaptureRows(0), n)
	}
	sums, err := c.CaptureSums(0, n)
	if err != nil {
		t.Fatal(err)
	}
	for l, col := range sums {
		total := 0.0
		for j, v := range col {
			total += float64(v)
			// Causal: only the n-j queries at positions >= j see cell j.
			if float64(v) > float64(n-j)+1e-3 || v < 0 {
				t.Fatalf("layer %d cell %d: column sum %g outside [0, %d]", l, j, v, n-j)
			}
		}
		// Every query row sums to 1, so the columns add up to the number of rows.
		if math.Abs(total-float64(n)) > 1e-3*float64(n) {
			t.Fatalf("layer %d: columns sum to %g, want %d", l, total, n)
		}
	}
	// Disabled capture accumulates nothing.
	c.CaptureReset()
	decodeTokens(t, c, []Token{prompt[1]}, n, 0)
	if c.CaptureRows(0) != 0 {
		t.Fatalf("capture accumulated %d rows while disabled", c.CaptureRows(0))
	}
}

// capturedAlone encodes prompt as sequence 0 of a context of its own and returns
// the attention its rows gave its cells.
func capturedAlone(t *testing.T, prompt []Token) [][]float32 {
	t.Helper()
	c := newCtx(t, ContextParams{Capture: true, NCtx: 256})
	c.CaptureReset()
	c.CaptureEnable(true)
	decodeTokens(t, c, prompt, 0, 0)
	c.CaptureEnable(false)
	sums, err := c.CaptureSums(0, len(prompt))
	if err != nil {
		t.Fatal(err)
	}
	return sums
}

// In a context with a stream per sequence, one batch of several sequences'
// prompts captures each sequence's attention in its own stream: the same sums as
// each prompt encoded alone. The batches cover a call that llama.cpp cuts into
// ubatches of several streams (consecutive sequences, prompts of unequal length)
// and ubatches that start past stream 0 (sequences 0 and 2 cannot share one).
func TestCaptureKeepsEachStreamsAttentionApart(t *testing.T) {
	prompts := [][]Token{
		mustTokenize(t, "USER: the first question, about a red square ASSISTANT:"),
		mustTokenize(t, "USER: a second one ASSISTANT:"),
		mustTokenize(t, strings.Repeat("the quick brown fox jumps over the lazy dog. ", 3)),
	}
	alone := make([][][]float32, len(prompts))
	for i, p := range prompts {
		alone[i] = capturedAlone(t, p)
	}
	for _, tt := range []struct {
		name string
		seqs []int
	}{
		{"three consecutive streams", []int{0, 1, 2}},
		{"streams 0 and 2", []int{0, 2}},
		{"stream 2 alone", []int{2}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCtx(t, ContextParams{Capture: true, NCtx: 3 * 256, NSeqMax: 3})
			n := 0
			for _, s := range tt.seqs {
				n += len(prompts[s])
			}
			b := NewBatch(n, 0, 1)
			defer b.Close()
			for _, s := range tt.seqs {
				for i, tok := range prompts[s] {
					b.Add(tok, i, s, i == len(prompts[s])-1)
				}
			}
			c.CaptureReset()
			c.CaptureEnable(true)
			err := c.Decode(b)
			c.CaptureEnable(false)
			if err != nil {
				t.Fatal(err)
			}
			for s := range prompts {
				want := len(prompts[s])
				if !slices.Contains(tt.seqs, s) {
					want = 0
				}
				if got := c.CaptureRows(s); got != want {
					t.Errorf("stream %d: %d query rows captured, want %d", s, got, want)
				}
				sums, err := c.CaptureSums(s, len(prompts[s]))
				if err != nil {
					t.Fatal(err)
				}
				for l := range sums {
					for j, v := range sums[l] {
						w := alone[s][l][j]
						if want == 0 {
							w = 0
						}
						if math.Abs(float64(v-w)) > 1e-4*max(1, math.Abs(float64(w))) {
							t.Fatalf("stream %d layer %d cell %d: %g in the shared batch, %g alone", s, l, j, v, w)
						}
					}
				}
			}
		})
	}
}

func TestSeqCacheRoundTripGivesIdenticalLogits(t *testing.T) {
	prompt := mustTokenize(t, "USER: a prompt long enough to fill a few cells ASSISTANT:")
	next := Token(prompt[3])
	for _, typ := range []string{"f16", "f32"} {
		t.Run(typ, func(t *testing.T) {
			ref := newCtx(t, ContextParams{TypeK: typ, TypeV: typ})
			decodeTokens(t, ref, prompt, 0, 0)
			want := decodeTokens(t, ref, []Token{next}, len(prompt), 0)

			c := newCtx(t, ContextParams{TypeK: typ, TypeV: typ})
			decodeTokens(t, c, prompt, 0, 0)
			sc, err := c.ReadSeqCache(0)
			if err != nil {
				t.Fatal(err)
			}
			if sc.Cells() != len(prompt) {
				t.Fatalf("read %d cells, want %d", sc.Cells(), len(prompt))
			}
			for i, p := range sc.Pos {
				if int(p) != i {
					t.Fatalf("cell %d has position %d", i, p)
				}
			}
			if err := c.WriteSeqCache(0, sc); err != nil {
				t.Fatal(err)
			}
			got := decodeTokens(t, c, []Token{next}, len(prompt), 0)
			for i := range want {
				if want[i] != got[i] {
					t.Fatalf("logit %d: %g after round trip, %g before", i, got[i], want[i])
				}
			}
		})
	}
}

func TestWritingFewerCellsShrinksTheSequence(t *testing.T) {
	c := newCtx(t, ContextParams{NCtx: 2048})
	prompt := mustTokenize(t, strings.Repeat("compress me please, ", 20))
	n := len(prompt)
	decodeTokens(t, c, prompt, 0, 0)
	before := c.LastAttendedRange()
	sc, err := c.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	// Keep every third cell plus the last; each layer takes a different row set.
	var keep []int
	for i := 0; i < n-1; i += 3 {
		keep = append(keep, i)
	}
	keep = append(keep, n-1)
	dst := NewSeqCacheLike(sc, len(keep))
	row := make([]float32, sc.K[0].RowElems)
	for i, p := range keep {
		dst.Pos[i] = int32(p)
		for l := range sc.K {
			srcCell := p
			if l%2 == 1 && i > 0 && i < len(keep)-1 {
				srcCell = p + 1 // a different row in odd layers
			}
			sc.K[l].Row(n, srcCell, row)
			dst.K[l].SetRow(len(keep), i, row)
			dst.V[l].CopyRow(len(keep), i, &sc.V[l], n, srcCell)
		}
	}
	if err := c.WriteSeqCache(0, dst); err != nil {
		t.Fatal(err)
	}
	back, err := c.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	if back.Cells() != len(keep) {
		t.Fatalf("sequence holds %d cells after writing %d", back.Cells(), len(keep))
	}
	// Rows read back are the rows written (f16 storage, bit-exact after one rounding).
	want, got := make([]float32, len(row)), make([]float32, len(row))
	for l := range dst.K {
		for i := range keep {
			dst.K[l].Row(len(keep), i, want)
			back.K[l].Row(len(keep), i, got)
			for k := range want {
				if want[k] != got[k] {
					t.Fatalf("layer %d cell %d elem %d: wrote %g read %g", l, i, k, want[k], got[k])
				}
			}
		}
	}
	if c.SeqPosMax(0) != n-1 || c.SeqPosMin(0) != 0 {
		t.Fatalf("positions [%d,%d], want [0,%d]", c.SeqPosMin(0), c.SeqPosMax(0), n-1)
	}
	decodeTokens(t, c, []Token{prompt[0]}, n, 0)
	after := c.LastAttendedRange()
	if after >= before {
		t.Fatalf("attended range %d after compression, %d before", after, before)
	}
	t.Logf("attended range %d -> %d cells (%d -> %d held)", before, after, n, len(keep)+1)
}

func TestSystemInfoReportsAVX2WhenTheCPUHasIt(t *testing.T) {
	cpu, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Skip("no /proc/cpuinfo")
	}
	if !bytes.Contains(cpu, []byte(" avx2")) {
		t.Skip("CPU lacks avx2")
	}
	if !Feature("AVX2") {
		t.Fatalf("CPU has avx2 but the build reports: %s (build with make: -march flags)", SystemInfo())
	}
}

// The hook refuses a state it does not fully understand (here: bytes after the
// one cache it parses, as a sliding-window model's second cache would add) instead
// of rewriting part of it.
func TestSeqCacheParserRefusesUnknownTrailingState(t *testing.T) {
	c := newCtx(t, ContextParams{})
	decodeTokens(t, c, mustTokenize(t, "a few tokens to hold"), 0, 0)
	sc, err := c.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	data := sc.encode()
	if _, err := parseSeqCache(data); err != nil {
		t.Fatalf("the unchanged state does not parse: %v", err)
	}
	if _, err := parseSeqCache(append(data, 0, 0, 0, 0)); err == nil || !strings.Contains(err.Error(), "unsupported cache layout") {
		t.Fatalf("trailing state accepted: %v", err)
	}
	if _, err := parseSeqCache(data[:len(data)-3]); err == nil {
		t.Fatal("truncated state accepted")
	}
}
