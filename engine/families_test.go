package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// Each model family's tiny random model (internal/testmodel, --arch) served by the
// engine: it loads, answers text, one image and two images, streams, gives under
// full the greedy tokens of a plain decode loop through package llama, and applies
// every policy (budget 1 equals full; budget 0.5 compresses) or refuses it with a
// PolicyUnsupportedError naming the reason.
var testFamilies = []string{testmodel.ArchLLaVA16, testmodel.ArchSmolVLM, testmodel.ArchMiniCPMV, testmodel.ArchGemma3, testmodel.ArchQwen25VL}

// refusedOn: the policies a family's model refuses below budget 1. Since the KV
// hook works inside llama.cpp's cache (cells named by index, M-RoPE components
// copied, a sliding-window model's full-attention layers ranked on their own),
// every family runs every policy.
var refusedOn = map[string][]elasticcache.Policy{}

// refusalSays: a word the refusal's reason must contain, per family.
var refusalSays = map[string]string{}

func loadFamily(t *testing.T, arch string) (testmodel.Options, *llama.Model, *llama.Vision) {
	t.Helper()
	opt, err := testmodel.FamilyOptions(arch)
	if err != nil {
		t.Fatal(err)
	}
	mp, vp, err := testmodel.Ensure(opt)
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.LoadModel(mp, llama.ModelParams{UseMmap: true})
	if err != nil {
		t.Fatal(err)
	}
	v, err := llama.LoadVision(m, vp, llama.VisionParams{Threads: 1})
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close(); m.Close() })
	return opt, m, v
}

func TestFamilies(t *testing.T) {
	for _, arch := range testFamilies {
		t.Run(arch, func(t *testing.T) { testFamily(t, arch) })
	}
}

func testFamily(t *testing.T, arch string) {
	opt, m, v := loadFamily(t, arch)
	fam, _ := testmodel.LookupFamily(arch)
	if got := m.Info().Arch; got != fam.TextArch {
		t.Fatalf("text architecture %q, want %q", got, fam.TextArch)
	}
	// The family's template is detected as the built-in one it stands for.
	msgs := []llama.ChatMessage{{Role: "user", Content: "hello"}}
	own, err := m.ApplyChatTemplate("", msgs, true)
	if err != nil {
		t.Fatal(err)
	}
	named, err := m.ApplyChatTemplate(fam.TemplateName, msgs, true)
	if err != nil || own != named {
		t.Fatalf("template renders %q, built-in %q renders %q (%v)", own, fam.TemplateName, named, err)
	}

	e, err := Start(m, v, Options{Parallel: 1, CtxSize: 2048, BatchSize: 512, Threads: 1, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	te := &testEngine{Engine: e}
	t.Cleanup(func() { e.Stop(context.Background()) })
	img1, img2 := testPNG(t, 1), testPNG(t, 2)
	const gen = 12
	full := cfg(elasticcache.Full, 1)

	text := run(t, te, greedyReq("text", longPrompt, gen, full))
	one := run(t, te, greedyReq("one", longPrompt, gen, full, img1))
	two := run(t, te, greedyReq("two", longPrompt, gen, full, img1, img2))
	for _, r := range []result{text, one, two} {
		if r.usage.CompletionTokens != gen || r.finish != completion.FinishLength || r.text == "" {
			t.Fatalf("%d tokens, finish %q, text %q", r.usage.CompletionTokens, r.finish, r.text)
		}
	}
	if d := one.usage.PromptTokens - text.usage.PromptTokens; d < opt.TileTokens() {
		t.Errorf("an image added %d prompt tokens, a tile alone is %d", d, opt.TileTokens())
	}
	if two.usage.PromptTokens <= one.usage.PromptTokens {
		t.Errorf("two images: %d prompt tokens, one: %d", two.usage.PromptTokens, one.usage.PromptTokens)
	}

	// Streaming: the answer arrives as events (the outbox may coalesce pieces a slow
	// reader has not taken yet) that add up to the collected text.
	ch, err := e.Submit(context.Background(), greedyReq("stream", longPrompt, gen, full, img1))
	if err != nil {
		t.Fatal(err)
	}
	events, streamed := 0, ""
	for ev := range ch {
		if ev.Err != nil {
			t.Fatal(ev.Err)
		}
		if ev.Text != "" {
			events++
			streamed += ev.Text
		}
	}
	if events < 1 || streamed != one.text {
		t.Errorf("stream: %d events, %q; collected %q", events, streamed, one.text)
	}

	// Under full: the greedy tokens of a plain decode loop.
	if want := directGreedy(t, m, v, longPrompt, gen, img1); want != one.text {
		t.Errorf("engine under full %q, direct decode loop %q", one.text, want)
	}

	if m.Info().MRoPE {
		testMRoPE(t, te, m, v, gen)
	}

	refused := refusedOn[arch]
	two2 := startEngineOn(t, m, v, Options{Parallel: 2, CtxSize: 2 * 2048, BatchSize: 512, PrefillCtx: 2048, PrefillStreams: 2})
	// Prompts encoded 7 entries a turn while another request generates (the pacer's
	// chunks; a non-causal image stays whole).
	chunked := startEngineOn(t, m, v, Options{Parallel: 2, CtxSize: 2 * 2048, BatchSize: 512, PrefillChunk: 7})
	whileBusy := func(req *completion.Request) result {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		bg, err := chunked.Submit(ctx, greedyReq("busy", "Keep talking about shapes.", 1500, full))
		if err != nil {
			t.Fatal(err)
		}
		before := chunked.promptCalls.Load()
		r := run(t, chunked, req)
		// The busy request's prompt went first, in one piece; this one's in
		// pieces of at most 7 (an image that is attended non-causally, whole).
		if calls := chunked.promptCalls.Load() - before; calls < int64(r.usage.PromptTokens-opt.TileTokens())/7 {
			t.Errorf("%s: %d prompt entries encoded in %d calls while another request generated", req.ID, r.usage.PromptTokens, calls)
		}
		cancel()
		for range bg {
		}
		return r
	}
	for _, p := range allPolicies {
		isRefused := false
		for _, r := range refused {
			isRefused = isRefused || r == p
		}
		// budget 1 never compresses: it runs on every family and equals full
		at1 := run(t, te, greedyReq(string(p)+"@1", longPrompt, gen, cfg(p, 1), img1))
		if at1.text != one.text {
			t.Errorf("%s@1.0 %q differs from full %q", p, at1.text, one.text)
		}
		if c := whileBusy(greedyReq(string(p)+"@1 chunked", longPrompt, gen, cfg(p, 1), img1)); c.text != one.text {
			t.Errorf("%s@1.0 encoded in chunks of 7 %q, in one piece %q", p, c.text, one.text)
		}
		if isRefused {
			_, err := e.Submit(context.Background(), greedyReq("refused", longPrompt, gen, cfg(p, 0.5), img1))
			var pu *completion.PolicyUnsupportedError
			if !errors.As(err, &pu) || !strings.Contains(pu.Reason, refusalSays[arch]) {
				t.Errorf("%s@0.5: error %v, want a PolicyUnsupportedError whose reason says %q", p, err, refusalSays[arch])
			}
			continue
		}
		half := run(t, te, greedyReq(string(p)+"@0.5", longPrompt, gen, cfg(p, 0.5), img1))
		if half.usage.CompletionTokens != gen || half.kv == nil || half.kv.Kept >= half.kv.PromptEntries || half.kv.Kept == 0 {
			t.Errorf("%s@0.5: %d tokens, kv %+v: not compressed", p, half.usage.CompletionTokens, half.kv)
		}
		// Encoded in the prefill context and moved into a stream (both caches of a
		// sliding-window model): the same answer as compressed in place.
		if moved := run(t, two2, greedyReq(string(p)+"@0.5 moved", longPrompt, gen, cfg(p, 0.5), img1)); moved.text != half.text {
			t.Errorf("%s@0.5 on two contexts %q, on one %q", p, moved.text, half.text)
		}
		// Encoded in chunks while another stream generates: the same answer.
		if c := whileBusy(greedyReq(string(p)+"@0.5 chunked", longPrompt, gen, cfg(p, 0.5), img1)); c.text != half.text {
			t.Errorf("%s@0.5 encoded in chunks of 7 %q, in one piece %q", p, c.text, half.text)
		}
		// two images, compressed, then decoding on
		h2 := run(t, te, greedyReq(string(p)+"@0.5x2", longPrompt, gen, cfg(p, 0.5), img1, img2))
		if h2.kv == nil || h2.kv.Kept >= h2.kv.PromptEntries {
			t.Errorf("%s@0.5 with two images: kv %+v: not compressed", p, h2.kv)
		}
	}
	// The published code's setting compacts the kept entries' positions to 0..K-1:
	// the next token continues from K in every cache of the family (a sliding-window
	// model's window cache included), in place and moved into a stream alike.
	ref := refCfg(elasticcache.Elastic, 0.5)
	inPlace := run(t, te, greedyReq("reference@0.5", longPrompt, gen, ref, img1))
	if inPlace.usage.CompletionTokens != gen || inPlace.kv == nil || inPlace.kv.Kept >= inPlace.kv.PromptEntries {
		t.Errorf("reference@0.5: %d tokens, kv %+v", inPlace.usage.CompletionTokens, inPlace.kv)
	}
	if moved := run(t, two2, greedyReq("reference@0.5 moved", longPrompt, gen, ref, img1)); moved.text != inPlace.text {
		t.Errorf("reference@0.5 on two contexts %q, on one %q", moved.text, inPlace.text)
	}
	pols := e.Policies()
	for _, ps := range pols {
		want := true
		for _, r := range refused {
			want = want && r != ps.Policy
		}
		if ps.Supported != want || (!ps.Supported && ps.Reason == "") {
			t.Errorf("Policies: %+v, want supported=%v", ps, want)
		}
	}
}

// directGreedy renders the prompt as the engine does and decodes it with package
// llama alone (one batch per chunk, non-causal image batches where the projector
// asks for them), then gen greedy tokens one at a time.
func directGreedy(t *testing.T, m *llama.Model, v *llama.Vision, prompt string, gen int, images ...[]byte) string {
	t.Helper()
	var parts []completion.Part
	for _, img := range images {
		parts = append(parts, completion.Image(img))
	}
	text, imgs, err := RenderPrompt(m, []completion.Message{{Role: "user", Parts: append(parts, completion.Text(prompt))}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := v.Tokenize(text, imgs, true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, err := llama.NewContext(m, llama.ContextParams{NCtx: 2048, NBatch: 512, NSeqMax: 1, Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	tb := llama.NewBatch(512, 0, 1)
	defer tb.Close()
	eb := llama.NewBatch(512, v.EmbdSize(), 1)
	if v.MRoPE() {
		eb.Close()
		eb = llama.NewBatchMRoPE(512, v.EmbdSize(), 1)
	}
	defer eb.Close()
	pos := 0
	for ci, c := range p.Chunks {
		last := ci == len(p.Chunks)-1
		var b *llama.Batch
		if c.Kind == llama.ChunkText {
			b = tb
			b.Clear()
			for i, tok := range c.Tokens {
				b.Add(tok, pos+i, 0, last && i == len(c.Tokens)-1)
			}
		} else {
			embd, err := p.EncodeImage(c)
			if err != nil {
				t.Fatal(err)
			}
			b = eb
			b.Clear()
			w := v.EmbdSize()
			for i := range c.NTokens {
				if v.MRoPE() { // the image's grid at its first position (mtmd-helper's layout)
					b.AddEmbdMRoPE(embd[i*w:(i+1)*w], pos, pos+i/c.NX, pos+i%c.NX, 0, last && i == c.NTokens-1)
					continue
				}
				b.AddEmbd(embd[i*w:(i+1)*w], pos+i, 0, last && i == c.NTokens-1)
			}
			ctx.SetCausal(!v.NonCausal())
		}
		err := ctx.Decode(b)
		ctx.SetCausal(true)
		if err != nil {
			t.Fatal(err)
		}
		pos += c.NPos // NTokens, but for an M-RoPE image
	}
	var out strings.Builder
	b := tb
	for range gen {
		logits := ctx.Logits(b.Len() - 1)
		best := 0
		for i, l := range logits {
			if l > logits[best] {
				best = i
			}
		}
		out.Write(m.TokenPiece(llama.Token(best), false))
		b.Clear()
		b.Add(llama.Token(best), pos, 0, true)
		pos++
		if err := ctx.Decode(b); err != nil {
			t.Fatal(err)
		}
	}
	return out.String()
}

// testMRoPE checks what is particular to an M-RoPE model (Qwen2.5-VL) under full:
// a picture whose grid is not square (rows and columns are told apart), and two
// pictures (the second starts where the first's max(nx, ny) positions end), each
// against llama.cpp's own mtmd helper (mtmd_helper_eval_chunks) followed by a
// plain greedy loop; and prefix reuse of picture conversations, uncompressed
// and compressed.
func testMRoPE(t *testing.T, te *testEngine, m *llama.Model, v *llama.Vision, gen int) {
	full := cfg(elasticcache.Full, 1)
	wide := rectPNG(t, 64, 32) // an 8 x 4 grid: 32 embeddings, 8 positions
	for name, imgs := range map[string][][]byte{"wide": {wide}, "two": {testPNG(t, 1), wide}} {
		got := run(t, te, greedyReq("mrope-"+name, longPrompt, gen, full, imgs...))
		if want := helperGreedy(t, m, v, longPrompt, gen, imgs...); got.text != want {
			t.Errorf("%s: engine under full %q, llama.cpp's mtmd helper %q", name, got.text, want)
		}
		if want := directGreedy(t, m, v, longPrompt, gen, imgs...); got.text != want {
			t.Errorf("%s: engine under full %q, direct decode loop %q", name, got.text, want)
		}
	}

	// Batches of 16: the 32 embeddings of the wide picture are decoded in two
	// batches, the second continuing the grid at row 2 of the same position.
	e, err := Start(m, v, Options{Parallel: 1, CtxSize: 2048, BatchSize: 16, Threads: 1, Reuse: true, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	re := &testEngine{Engine: e}
	defer e.Stop(context.Background())
	if got, want := run(t, re, noReuse(greedyReq("split", longPrompt, gen, full, wide))).text, helperGreedy(t, m, v, longPrompt, gen, wide); got != want {
		t.Errorf("picture split over two batches: engine %q, llama.cpp's mtmd helper %q", got, want)
	}

	// Prefix reuse: a conversation is held and continued whether or not its first
	// turn had a picture (the picture's grid takes fewer positions than cells:
	// the continuation starts at the position after it), also by a turn that adds
	// a picture; the answer is that of encoding everything again.
	for _, withImage := range []bool{false, true} {
		var imgs [][]byte
		if withImage {
			imgs = [][]byte{wide}
		}
		first := greedyReq(fmt.Sprintf("reuse-%v", withImage), "Say something.", 6, full, imgs...)
		r1 := run(t, re, first)
		second := turn2(first, r1.text, "And more?")
		second.Messages[len(second.Messages)-1].Parts = append([]completion.Part{completion.Image(wide)}, second.Messages[len(second.Messages)-1].Parts...)
		r2 := run(t, re, second)
		again := run(t, re, noReuse(second))
		if r2.text != again.text {
			t.Errorf("image in the first turn %v: with reuse %q, encoding everything again %q", withImage, r2.text, again.text)
		}
		if r2.usage.CachedTokens < r1.usage.PromptTokens-1 {
			t.Errorf("image in the first turn %v: the second turn reused %d cells of a %d-token first prompt", withImage, r2.usage.CachedTokens, r1.usage.PromptTokens)
		}
	}

	// A picture conversation compressed under elastic continues from its held
	// (merged) cells, and a third turn continues the second's.
	// The same turns with another picture conversation taking the only slot
	// between them continue from host memory, with the same answers.
	slotTurns := compressedPictureTurns(t, m, v, wide, nil)
	hostTurns := compressedPictureTurns(t, m, v, wide, testPNG(t, 3))
	continued := 0
	for i, r := range slotTurns {
		h := hostTurns[i]
		if r.usage.CachedTokens > 0 {
			continued++
		}
		if h.text != r.text || h.usage.CachedTokens != r.usage.CachedTokens || i > 0 && (r.kv.ReusedFrom == "slot") != (h.kv.ReusedFrom == "host") {
			t.Errorf("elastic turn %d: held in its slot %q (cached %d from %q), restored %q (cached %d from %q)",
				i+1, r.text, r.usage.CachedTokens, r.kv.ReusedFrom, h.text, h.usage.CachedTokens, h.kv.ReusedFrom)
		}
	}
	if continued == 0 {
		t.Errorf("compressed picture conversation: none of %d later turns continued", len(slotTurns)-1)
	}
}

// compressedPictureTurns runs three turns of a picture conversation under
// elastic 0.5 with compressed reuse and a host tier, another picture
// conversation between turns when other is set.
func compressedPictureTurns(t *testing.T, m *llama.Model, v *llama.Vision, img, other []byte) []result {
	e := startEngineOn(t, m, v, Options{Parallel: 1, CtxSize: 2048, BatchSize: 512, Reuse: true, ReuseCompressed: true, HostCacheBytes: 64 << 20})
	el := cfg(elasticcache.Elastic, 0.5)
	req := greedyReq("mrope-elastic", "Say something.", 6, el, img)
	out := []result{run(t, e, req)}
	for turn, q := range []string{"And more?", "Anything else?"} {
		if other != nil {
			run(t, e, greedyReq(fmt.Sprintf("other-%d", turn), "Something else. "+longPrompt, 4, el, other))
		}
		req = turn2(req, out[len(out)-1].text, q)
		r := run(t, e, req)
		if r.usage.CompletionTokens != 6 {
			t.Fatalf("elastic turn %d: %d tokens", turn+2, r.usage.CompletionTokens)
		}
		out = append(out, r)
	}
	if st := e.Stats(); st.KVInvariantFailures != 0 || st.HostCache.Failures != 0 {
		t.Fatalf("failures: %+v", st)
	}
	return out
}

// helperGreedy is directGreedy with the prompt decoded by llama.cpp's mtmd helper.
func helperGreedy(t *testing.T, m *llama.Model, v *llama.Vision, prompt string, gen int, images ...[]byte) string {
	t.Helper()
	var parts []completion.Part
	for _, img := range images {
		parts = append(parts, completion.Image(img))
	}
	text, imgs, err := RenderPrompt(m, []completion.Message{{Role: "user", Parts: append(parts, completion.Text(prompt))}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := v.Tokenize(text, imgs, true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, err := llama.NewContext(m, llama.ContextParams{NCtx: 2048, NBatch: 512, NSeqMax: 1, Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	pos, err := p.EvalWithHelper(ctx, 0, 0, 512)
	if err != nil {
		t.Fatal(err)
	}
	b := llama.NewBatch(1, 0, 1)
	defer b.Close()
	row := -1
	var out strings.Builder
	for range gen {
		logits := ctx.Logits(row)
		best := 0
		for i, l := range logits {
			if l > logits[best] {
				best = i
			}
		}
		out.Write(m.TokenPiece(llama.Token(best), false))
		b.Clear()
		b.Add(llama.Token(best), pos, 0, true)
		pos++
		row = 0
		if err := ctx.Decode(b); err != nil {
			t.Fatal(err)
		}
	}
	return out.String()
}

// rectPNG is a w x h picture.
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
