package engine

import (
	"context"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// turn2 continues turn1's conversation: its answer, then a new question.
func turn2(first *completion.Request, answer, question string) *completion.Request {
	r := *first
	r.ID = first.ID + "-2"
	r.Messages = append(append([]completion.Message(nil), first.Messages...),
		completion.Message{Role: "assistant", Parts: []completion.Part{completion.Text(answer)}},
		completion.Message{Role: "user", Parts: []completion.Part{completion.Text(question)}})
	return &r
}

func noReuse(r *completion.Request) *completion.Request {
	c := *r
	off := false
	c.Reuse = &off
	return &c
}

// reuseEngine serves with prefix reuse and the image cache on.
func reuseEngine(t *testing.T, parallel int) *testEngine {
	return startEngine(t, Options{Parallel: parallel, Reuse: true, ImageCacheBytes: 64 << 20})
}

// The second turn of an image conversation continues from the first turn's cells:
// it encodes neither the picture nor the first turn again, and under full its
// greedy answer is token for token the answer of encoding everything again.
func TestReuseUnderFullMatchesReencoding(t *testing.T) {
	e := reuseEngine(t, 2)
	first := greedyReq("conv", "What is in the picture?", 8, elasticcache.Spec{}, testPNG(t, 1))
	r1 := run(t, e, first)
	if r1.usage.CachedTokens != 0 {
		t.Fatalf("first turn reused %d tokens", r1.usage.CachedTokens)
	}
	second := turn2(first, r1.text, "And which color is it?")
	r2 := run(t, e, second)
	again := run(t, e, noReuse(second))
	if r2.text != again.text {
		t.Fatalf("with reuse %q, encoding everything again %q", r2.text, again.text)
	}
	// Everything up to the first answer is the same prompt: at least the first
	// turn's prompt is served from held cells.
	if r2.usage.CachedTokens < r1.usage.PromptTokens-1 || r2.kv.Reused != r2.usage.CachedTokens {
		t.Fatalf("cached %d (kv reused %d) of a second turn whose first turn's prompt is %d tokens",
			r2.usage.CachedTokens, r2.kv.Reused, r1.usage.PromptTokens)
	}
	if again.usage.CachedTokens != 0 || r2.usage.PromptTokens != again.usage.PromptTokens {
		t.Fatalf("usage with reuse %+v, without %+v", r2.usage, again.usage)
	}
	st := e.Stats()
	if st.ReuseHits != 1 || st.ReusedTokens != r2.usage.CachedTokens {
		t.Fatalf("stats %+v", st)
	}
	// The picture was encoded for the first turn only.
	if st.ImageEncodes != 1 {
		t.Fatalf("%d image encodes for one picture", st.ImageEncodes)
	}
}

func TestImageSentTwiceIsEncodedOnce(t *testing.T) {
	e := reuseEngine(t, 1)
	img := testPNG(t, 2)
	a := run(t, e, noReuse(greedyReq("a", "Describe it.", 4, elasticcache.Spec{}, img)))
	b := run(t, e, noReuse(greedyReq("b", "Describe it.", 4, elasticcache.Spec{}, img)))
	if a.text != b.text {
		t.Fatalf("cached embeddings answer %q, encoded %q", b.text, a.text)
	}
	if st := e.Stats(); st.ImageEncodes != 1 || st.ImageCacheHits != 1 {
		t.Fatalf("encodes %d, hits %d", st.ImageEncodes, st.ImageCacheHits)
	}
	run(t, e, noReuse(greedyReq("c", "Describe it.", 4, elasticcache.Spec{}, testPNG(t, 3))))
	if st := e.Stats(); st.ImageEncodes != 2 {
		t.Fatalf("a new picture was not encoded: %d encodes", st.ImageEncodes)
	}
}

// Two conversations that differ only in their picture: the second must not
// continue from the first one's cells past the picture, and both answer as they
// would alone.
func TestReuseNeverCrossesConversations(t *testing.T) {
	e := reuseEngine(t, 2)
	alone := startEngine(t, Options{Parallel: 1})
	imgA, imgB := testPNG(t, 1), testPNG(t, 4)
	const q = "What is in the picture?"
	a := run(t, e, greedyReq("a", q, 6, elasticcache.Spec{}, imgA))
	b := run(t, e, greedyReq("b", q, 6, elasticcache.Spec{}, imgB))
	// Only the template's text before the picture may come from a held sequence.
	chunks, err := PromptChunks(tmModel, tmVision, greedyReq("x", q, 1, elasticcache.Spec{}, imgA).Messages)
	if err != nil || len(chunks) < 2 || !chunks[1].Image {
		t.Fatalf("prompt chunks %+v: %v", chunks, err)
	}
	if b.usage.CachedTokens > chunks[0].N {
		t.Fatalf("conversation B reused %d tokens of A's, past the picture at %d", b.usage.CachedTokens, chunks[0].N)
	}
	for _, tc := range []struct {
		got string
		img []byte
	}{{a.text, imgA}, {b.text, imgB}} {
		if want := run(t, alone, greedyReq("alone", q, 6, elasticcache.Spec{}, tc.img)).text; tc.got != want {
			t.Fatalf("answer %q, alone %q", tc.got, want)
		}
	}
	// Each continues its own conversation.
	a2 := run(t, e, turn2(greedyReq("a", q, 6, elasticcache.Spec{}, imgA), a.text, "Again?"))
	b2 := run(t, e, turn2(greedyReq("b", q, 6, elasticcache.Spec{}, imgB), b.text, "Again?"))
	for _, tc := range []struct {
		got result
		req *completion.Request
	}{{a2, turn2(greedyReq("a", q, 6, elasticcache.Spec{}, imgA), a.text, "Again?")},
		{b2, turn2(greedyReq("b", q, 6, elasticcache.Spec{}, imgB), b.text, "Again?")}} {
		if tc.got.usage.CachedTokens <= chunks[0].N+chunks[1].N {
			t.Fatalf("a second turn reused only %d tokens", tc.got.usage.CachedTokens)
		}
		if want := run(t, alone, tc.req).text; tc.got.text != want {
			t.Fatalf("second turn %q, alone %q", tc.got.text, want)
		}
	}
}

// Held cells are reclaimed, least recently used first, when a request needs them;
// and a request may opt out of being held.
func TestHeldCellsAreReclaimedWhenNeeded(t *testing.T) {
	e := startEngine(t, Options{Parallel: 2, CtxSize: 2 * 512, Reuse: true, Unified: true})
	run(t, e, greedyReq("h1", "First conversation. "+longPrompt, 4, elasticcache.Spec{}))
	run(t, e, greedyReq("h2", "Second conversation. "+longPrompt, 4, elasticcache.Spec{}))
	if st := e.Stats(); st.ReuseHits != 0 || st.KVCellsHeld < 2*100 {
		t.Fatalf("two conversations are not both held: %+v", st)
	}
	// A third one needs more cells than are free next to the two held ones.
	big := greedyReq("big", "Third. "+longPrompt+longPrompt, 900, elasticcache.Spec{})
	r := run(t, e, big)
	if r.usage.CompletionTokens == 0 {
		t.Fatal("no answer")
	}
	if st := e.Stats(); st.ReclaimedCells == 0 {
		t.Fatalf("no held cells were reclaimed: %+v", st)
	}
	off := noReuse(greedyReq("off", "short", 2, elasticcache.Spec{}))
	before := e.Stats().KVCellsHeld
	ch, err := e.Submit(context.Background(), off)
	if err != nil {
		t.Fatal(err)
	}
	collect(t, ch)
	if after := e.Stats().KVCellsHeld; after > before {
		t.Fatalf("a request with reuse off was held (%d -> %d cells)", before, after)
	}
}

// A conversation compressed by its policy continues from its compressed cells:
// only the new turn is encoded, the turn keeps ceil(b*m) of its m entries, and
// decoding stays within the policy's bound for the whole conversation.
func TestCompressedConversationContinues(t *testing.T) {
	for _, p := range allPolicies {
		t.Run(string(p), func(t *testing.T) {
			e := startEngine(t, Options{Parallel: 2, Reuse: true, ReuseCompressed: true})
			spec := cfg(p, 0.5)
			first := greedyReq("c1", "What is in the picture? "+longPrompt, 10, spec, testPNG(t, 2))
			// The test model's chat template writes "ASSISTANT: " before a past
			// answer; a trained model starts its answer with that space itself.
			first.AnswerPrefix = " "
			r1 := run(t, e, first)
			second := turn2(first, r1.text, "Tell me more about its colors.")
			second.ID = "c2"
			r2 := run(t, e, second)
			if r2.err != nil || r2.usage.CompletionTokens == 0 {
				t.Fatalf("second turn: %+v", r2)
			}
			history := r1.usage.PromptTokens + r1.usage.CompletionTokens - 1 // the last token is sampled, not decoded
			if r1.finish == completion.FinishStop {
				history = r1.usage.PromptTokens + r1.usage.CompletionTokens
			}
			if r2.usage.CachedTokens != history || r2.kv.Reused != history {
				t.Fatalf("cached %d, the held history is %d tokens", r2.usage.CachedTokens, history)
			}
			obs := e.observations("c2")
			plan := obs[0]
			turnN := r2.usage.PromptTokens - history
			if plan.Plan == nil || plan.Plan.N != turnN || plan.Plan.K != spec.KeepCount(turnN) {
				t.Fatalf("turn plan %+v for a turn of %d", plan.Plan, turnN)
			}
			if plan.Held != r1.kv.FinalCells+plan.Plan.K {
				t.Fatalf("after the turn's plan %d cells, want %d held + %d kept", plan.Held, r1.kv.FinalCells, plan.Plan.K)
			}
			for _, o := range obs[1:] {
				if bound := max(spec.KeepCount(o.T), plan.Held+1); o.Held > bound {
					t.Fatalf("T=%d: %d cells, bound %d", o.T, o.Held, bound)
				}
			}
			// Asking the first turn again is not a continuation: nothing merged is
			// reused, and it answers as the first time.
			firstAgain := greedyReq("c1-again", "What is in the picture? "+longPrompt, 10, spec, testPNG(t, 2))
			firstAgain.AnswerPrefix = " "
			again := run(t, e, firstAgain)
			if again.usage.CachedTokens != 0 || again.text != r1.text {
				t.Fatalf("first turn again: cached %d, %q vs %q", again.usage.CachedTokens, again.text, r1.text)
			}
		})
	}
}
