package engine

import (
	"bytes"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// hostEngine has one slot, prefix reuse (compressed conversations included) and
// a host tier of limit bytes.
func hostEngine(t *testing.T, limit int64) *testEngine {
	return startEngine(t, Options{Parallel: 1, Reuse: true, ReuseCompressed: true, ImageCacheBytes: 64 << 20, HostCacheBytes: limit})
}

// pictureTurn1 is the first turn of a picture conversation whose answers the
// rendered history reproduces token for token (see TestCompressedConversationContinues).
func pictureTurn1(id string, spec elasticcache.Spec, img []byte) *completion.Request {
	r := greedyReq(id, "What is in the picture? "+longPrompt, 8, spec, img)
	r.AnswerPrefix = " "
	return r
}

// With one slot, conversation A's first turn, then conversation B (which takes
// the slot, so A goes to host memory), then A's second turn: A is restored from
// host memory instead of encoded again, and answers as it would have continuing
// in its slot (under full: as encoding everything again). A conversation held
// compressed at budget 0.5 costs about half the bytes of full's.
func TestHostTierRestoresAConversation(t *testing.T) {
	held := map[string]int64{}
	for _, tc := range []struct {
		name string
		spec elasticcache.Spec
	}{{"full", elasticcache.Spec{}}, {"elastic-0.5", cfg(elasticcache.Elastic, 0.5)}} {
		t.Run(tc.name, func(t *testing.T) {
			e := hostEngine(t, 256<<20)
			first := pictureTurn1("a", tc.spec, testPNG(t, 1))
			a1 := run(t, e, first)
			run(t, e, greedyReq("b", "Something else entirely. "+longPrompt, 6, tc.spec, testPNG(t, 4)))
			st := e.Stats()
			if st.HostCache.Stored != 1 || st.HostCache.Entries != 1 || st.HostCache.Bytes <= 0 {
				t.Fatalf("after B took the slot: %+v", st)
			}
			held[tc.name] = st.HostCache.Bytes
			second := turn2(first, a1.text, "And which color is it?")
			t0 := time.Now()
			a2 := run(t, e, second)
			restoredMs := time.Since(t0)
			if a2.kv.ReusedFrom != "host" || a2.usage.CachedTokens < a1.usage.PromptTokens || a2.kv.Reused != a2.usage.CachedTokens {
				t.Fatalf("second turn: reused %d from %q (cached %d), the first turn's prompt is %d tokens",
					a2.kv.Reused, a2.kv.ReusedFrom, a2.usage.CachedTokens, a1.usage.PromptTokens)
			}
			st = e.Stats()
			if st.HostCache.Hits != 1 || st.HostCache.RestoredTokens != int64(a2.usage.CachedTokens) || st.HostCache.Failures != 0 {
				t.Fatalf("after the restore: %+v", st)
			}
			// The reference: the same two turns with A never leaving its slot.
			ref := hostEngine(t, 0)
			r1 := run(t, ref, first)
			r2 := run(t, ref, second)
			if r1.text != a1.text || r2.text != a2.text || r2.kv.ReusedFrom != "slot" || r2.usage.CachedTokens != a2.usage.CachedTokens {
				t.Fatalf("restored from host %q (cached %d), held in its slot %q (cached %d, from %q)",
					a2.text, a2.usage.CachedTokens, r2.text, r2.usage.CachedTokens, r2.kv.ReusedFrom)
			}
			t0 = time.Now()
			again := run(t, e, noReuse(second))
			encodeMs := time.Since(t0)
			if !tc.spec.Compresses() && again.text != a2.text {
				t.Fatalf("restored %q, encoded again %q", a2.text, again.text)
			}
			t.Logf("%s: %d bytes held for %d tokens; second turn: prefill %.1f ms after the restore, whole request %v; encoded again: prefill %.1f ms, whole request %v",
				tc.name, held[tc.name], a2.usage.CachedTokens, a2.kv.PrefillMs, restoredMs, again.kv.PrefillMs, encodeMs)
		})
	}
	if f, el := held["full"], held["elastic-0.5"]; f > 0 && el > 0 {
		if r := float64(el) / float64(f); r < 0.4 || r > 0.65 {
			t.Fatalf("a conversation held at elastic 0.5 takes %d bytes, under full %d (ratio %.2f)", el, f, r)
		}
	}
}

// The host tier keeps at most its bound: the least recently stored
// conversation goes first, counted, and is encoded again when it returns.
func TestHostTierEvictsTheOldest(t *testing.T) {
	conv := func(i int) *completion.Request {
		return pictureTurn1(string(rune('a'+i)), elasticcache.Spec{}, testPNG(t, i+1))
	}
	probe := hostEngine(t, 256<<20)
	run(t, probe, conv(0))
	run(t, probe, conv(1))
	one := probe.Stats().HostCache.Bytes
	if one <= 0 {
		t.Fatalf("nothing stored: %+v", probe.Stats())
	}
	e := hostEngine(t, one*5/2) // two conversations of this size, not three
	var firsts []result
	for i := range 4 {
		firsts = append(firsts, run(t, e, conv(i)))
	}
	st := e.Stats()
	if st.HostCache.Stored != 3 || st.HostCache.Entries != 2 || st.HostCache.Evictions != 1 || st.HostCache.Bytes > one*5/2 {
		t.Fatalf("three conversations left the slot into a tier for two: %+v", st)
	}
	// a (the oldest) is gone: encoded again; c is restored.
	a2 := run(t, e, turn2(conv(0), firsts[0].text, "Again?"))
	if a2.kv.ReusedFrom == "host" || a2.usage.CachedTokens >= firsts[0].usage.PromptTokens {
		t.Fatalf("the evicted conversation was reused: %d tokens from %q", a2.usage.CachedTokens, a2.kv.ReusedFrom)
	}
	c2 := run(t, e, turn2(conv(2), firsts[2].text, "Again?"))
	if c2.kv.ReusedFrom != "host" || c2.usage.CachedTokens < firsts[2].usage.PromptTokens {
		t.Fatalf("a kept conversation was not restored: %d tokens from %q", c2.usage.CachedTokens, c2.kv.ReusedFrom)
	}
	if st := e.Stats(); st.HostCache.Misses < 1 {
		t.Fatalf("the evicted conversation's return is not a miss: %+v", st)
	}
}

// A conversation whose picture differs in one pixel is another conversation:
// nothing past the text before the picture is restored, and it answers as
// encoding it afresh does.
func TestHostTierNeverRestoresAnotherPicture(t *testing.T) {
	e := hostEngine(t, 256<<20)
	img := testPNG(t, 1)
	first := pictureTurn1("a", elasticcache.Spec{}, img)
	a1 := run(t, e, first)
	run(t, e, greedyReq("b", "Something else entirely.", 4, elasticcache.Spec{}, testPNG(t, 4)))
	if e.Stats().HostCache.Entries != 1 {
		t.Fatalf("A is not in the host tier: %+v", e.Stats())
	}
	other := pictureTurn1("a", elasticcache.Spec{}, onePixelOff(t, img))
	second := turn2(other, a1.text, "And which color is it?")
	got := run(t, e, second)
	chunks, err := PromptChunks(tmModel, tmVision, second.Messages)
	if err != nil || len(chunks) < 2 || !chunks[1].Image {
		t.Fatalf("prompt chunks %+v: %v", chunks, err)
	}
	if got.kv.ReusedFrom == "host" || got.usage.CachedTokens > chunks[0].N || e.Stats().HostCache.Hits != 0 {
		t.Fatalf("another picture's conversation reused %d tokens from %q", got.usage.CachedTokens, got.kv.ReusedFrom)
	}
	if want := run(t, e, noReuse(second)); got.text != want.text {
		t.Fatalf("answer %q, encoded afresh %q", got.text, want.text)
	}
}

// onePixelOff is img (a PNG) with its first pixel's red channel changed by one.
func onePixelOff(t testing.TB, img []byte) []byte {
	t.Helper()
	src, err := png.Decode(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	b := src.Bounds()
	dst := image.NewRGBA(b)
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			dst.Set(x, y, src.At(x, y))
		}
	}
	c := dst.RGBAAt(0, 0)
	c.R ^= 1
	dst.SetRGBA(0, 0, color.RGBA{c.R, c.G, c.B, c.A})
	var buf bytes.Buffer
	if err := png.Encode(&buf, dst); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// The restore works on every engine layout and on a sliding-window model: two
// contexts (a compressed conversation was moved from the prefill context into its
// stream), one unified cache shared by the slots, gemma3, whose window cache
// goes to host memory and back beside the full-attention cells, and Qwen2.5-VL,
// whose picture entries share M-RoPE positions.
func TestHostTierOnEveryLayout(t *testing.T) {
	_, gm, gv := loadFamily(t, testmodel.ArchGemma3)
	_, qm, qv := loadFamily(t, testmodel.ArchQwen25VL)
	for _, tc := range []struct {
		name  string
		opts  Options
		spec  elasticcache.Spec
		model *llama.Model
		vis   *llama.Vision
	}{
		{"two-contexts/full", twoContexts(1, 1024, 1024), elasticcache.Spec{}, tmModel, tmVision},
		{"two-contexts/elastic-0.5", twoContexts(1, 1024, 1024), cfg(elasticcache.Elastic, 0.5), tmModel, tmVision},
		{"unified/full", Options{Parallel: 2, CtxSize: 1024, Unified: true}, elasticcache.Spec{}, tmModel, tmVision},
		{"gemma3/full", Options{Parallel: 1}, elasticcache.Spec{}, gm, gv},
		// M-RoPE: the picture's grid shares positions; the restored cells carry them
		{"qwen25vl/full", Options{Parallel: 1}, elasticcache.Spec{}, qm, qv},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := func(limit int64) *testEngine {
				o := tc.opts
				o.Reuse, o.ReuseCompressed, o.ImageCacheBytes, o.HostCacheBytes = true, true, 64<<20, limit
				return startEngineOn(t, tc.model, tc.vis, o)
			}
			e := start(256 << 20)
			first := pictureTurn1("a", tc.spec, testPNG(t, 1))
			a1 := run(t, e, first)
			// Enough other conversations to push A out of the slots.
			for i := range tc.opts.Parallel {
				run(t, e, greedyReq(fmt.Sprintf("b%d", i), "Something else entirely. "+longPrompt, 6, tc.spec, testPNG(t, 4+i)))
			}
			if st := e.Stats(); st.HostCache.Entries == 0 {
				t.Fatalf("nothing went to host memory: %+v", st)
			}
			second := turn2(first, a1.text, "And which color is it?")
			a2 := run(t, e, second)
			// As much as slot reuse serves: the first turn's prompt at least, but
			// for its last token where the template renders the answer's start
			// differently (gemma3).
			if a2.kv.ReusedFrom != "host" || a2.usage.CachedTokens < a1.usage.PromptTokens-1 {
				t.Fatalf("second turn: cached %d from %q, the first turn's prompt is %d tokens (%+v)",
					a2.usage.CachedTokens, a2.kv.ReusedFrom, a1.usage.PromptTokens, e.Stats())
			}
			ref := start(0)
			run(t, ref, first)
			if r2 := run(t, ref, second); r2.text != a2.text || r2.kv.ReusedFrom != "slot" || r2.usage.CachedTokens != a2.usage.CachedTokens {
				t.Fatalf("restored from host %q (cached %d), held in its slot %q (cached %d from %q)",
					a2.text, a2.usage.CachedTokens, r2.text, r2.usage.CachedTokens, r2.kv.ReusedFrom)
			}
			if !tc.spec.Compresses() {
				if again := run(t, e, noReuse(second)); again.text != a2.text {
					t.Fatalf("restored %q, encoded again %q", a2.text, again.text)
				}
			}
			if st := e.Stats(); st.HostCache.Failures != 0 || st.KVInvariantFailures != 0 {
				t.Fatalf("failures: %+v", st)
			}
		})
	}
}

// The benchmark's conversation (BenchmarkHostTierTTFT) on the test model: four
// turns, another picture conversation taking the only slot between them. Each
// later turn is restored from host memory (and, with the disk tier alone, from
// disk) wherever the conversation held in its
// slot would have continued, with as many cached tokens and the same answer; under
// full that is every turn, and the answers are those of encoding every turn
// afresh. (Under elastic the test model's character answers do not always
// tokenize back as generated, and then the compressed conversation is not
// continued, in its slot or from host memory.)
//
// Also on Qwen2.5-VL, whose picture entries share M-RoPE positions.
func TestHostTierFourTurns(t *testing.T) {
	_, qm, qv := loadFamily(t, testmodel.ArchQwen25VL)
	for _, mv := range []struct {
		name string
		m    *llama.Model
		v    *llama.Vision
	}{{"test-model", tmModel, tmVision}, {"qwen25vl", qm, qv}} {
		t.Run(mv.name, func(t *testing.T) { testFourTurns(t, mv.m, mv.v, mv.m == tmModel) })
	}
}

// testFourTurns: mustRestore, the compressed conversation is restored at least
// once (the test model's answers tokenize back as generated often enough; a
// random model's may never, in its slot as from host memory).
func testFourTurns(t *testing.T, m *llama.Model, v *llama.Vision, mustRestore bool) {
	img, other := testPNG(t, 1), testPNG(t, 3)
	questions := []string{"What color is the circle?", "How many shapes are there?", "Where is the square?", "What color is the square?"}
	for _, spec := range []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5)} {
		plain, _ := hostTierTurns(t, m, v, spec, "", img, other, questions)
		slot, _ := hostTierTurns(t, m, v, spec, "host", img, nil, questions)
		host, bytes := hostTierTurns(t, m, v, spec, "host", img, other, questions)
		disk, _ := hostTierTurns(t, m, v, spec, "disk", img, other, questions)
		restored := 0
		for i := range host {
			h, s := host[i], slot[i]
			if h.cached != s.cached || h.text != s.text || (s.from == "slot") != (h.from == "host") {
				t.Fatalf("%s turn %d: cached %d from %q %q, held in its slot %d from %q %q", spec.Policy(), i+1, h.cached, h.from, h.text, s.cached, s.from, s.text)
			}
			if h.from == "host" {
				restored++
			}
			// (The disk keeps a file after restoring it, so under elastic it may also
			// continue an older state of the conversation whose history still
			// prefixes the prompt, where the host tier, which gave its copy back to
			// the slot, has none.)
			if d := disk[i]; h.from == "host" && (d.cached != h.cached || d.text != h.text || d.from != "disk") {
				t.Fatalf("%s turn %d: from disk %d %q %q, from host %d %q %q", spec.Policy(), i+1, d.cached, d.from, d.text, h.cached, h.from, h.text)
			}
			if !spec.Compresses() && (h.text != plain[i].text || i > 0 && h.cached < host[i-1].prompt-1) {
				t.Fatalf("turn %d: restored %q (cached %d), encoded %q", i+1, h.text, h.cached, plain[i].text)
			}
		}
		if restored == 0 && mustRestore || !spec.Compresses() && restored != len(host)-1 || bytes <= 0 {
			t.Fatalf("%s: %d turns restored, %d bytes held at the end", spec.Policy(), restored, bytes)
		}
		t.Logf("%s: %d of %d later turns restored, %d bytes held after four turns", spec.Policy(), restored, len(host)-1, bytes)
	}
}
