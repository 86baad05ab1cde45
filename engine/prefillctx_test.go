package engine

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// twoContexts is the default engine shape: a stream per slot and a prefill context.
// twoContexts is the server's default layout: a stream per slot, and a prefill
// context with a stream of prefill cells per slot.
func twoContexts(parallel, stream, prefill int) Options {
	return Options{Parallel: parallel, CtxSize: parallel * stream, PrefillCtx: prefill, PrefillStreams: parallel}
}

// Requests of every policy run together on the two-context engine and answer as
// each does alone on one context: compressed sequences are encoded in the prefill
// context and decode in their stream, full ones encode and decode in their stream.
func TestTwoContextsMatchOneContextAlone(t *testing.T) {
	reqs := mixedRequests(t)
	alone := make([]result, len(reqs))
	{
		e := startEngine(t, Options{Parallel: 1, CtxSize: 2048})
		for i, r := range reqs {
			alone[i] = run(t, e, r)
		}
	}
	e := startEngine(t, twoContexts(4, 1024, 2048))
	// Right after each prompt plan (on the decode loop): a compressed sequence has
	// left the prefill context for its stream of the decode context; the prefill
	// context holds the cells of the prompts still there, no more.
	var moved, stayed atomic.Int64
	check := func(o Observation) {
		if !o.Prefill || (o.RequestID != "a" && o.RequestID != "c") {
			return
		}
		away, inPrefill := 0, 0
		for _, s := range e.slots {
			if s != nil && s.cache != nil && s.cache.away() {
				away += s.cache.held()
			}
		}
		for k := range e.ppools {
			cells, err := e.pctx.SeqCells(0, k)
			if err != nil {
				t.Error(err)
			}
			inPrefill += len(cells)
		}
		if inPrefill == away && e.ctx.SeqPosMax(o.Slot) >= 0 {
			moved.Add(1)
		} else {
			stayed.Add(1)
		}
	}
	e.onObserve.Store(&check)
	for i, r := range runTogether(t, e, reqs) {
		if r.text != alone[i].text {
			t.Errorf("%s: two contexts answer differently from one:\n%q\n%q", reqs[i].ID, r.text, alone[i].text)
		}
		if r.kv.FinalCells != alone[i].kv.FinalCells || r.kv.Kept != alone[i].kv.Kept {
			t.Errorf("%s: kv %+v, alone %+v", reqs[i].ID, r.kv, alone[i].kv)
		}
	}
	for _, id := range []string{"a", "c"} {
		obs := e.observations(id)
		if len(obs) < 2 || !obs[0].Prefill || obs[0].Plan == nil {
			t.Fatalf("%s: no prompt plan observed: %+v", id, obs)
		}
		// After the plan the sequence decodes in its stream of the decode context.
		for _, o := range obs[1:] {
			if o.Attended > 1024 {
				t.Errorf("%s: a decode step attended %d cells, more than a stream", id, o.Attended)
			}
		}
	}
	if moved.Load() != 2 || stayed.Load() != 0 {
		t.Errorf("after their prompt plans %d compressed sequences were in their stream, %d not", moved.Load(), stayed.Load())
	}
	for k := range e.ppools {
		if e.pctx.SeqPosMax(k) != -1 {
			t.Errorf("cells remain in stream %d of the prefill context", k)
		}
	}
	if st := e.Stats(); st.SlotsBusy != 0 || st.KVCellsUsed != 0 {
		t.Errorf("leaked: %+v", st)
	}
}

// A prompt longer than a stream is served by a compressing policy whose cells
// fit the stream, and answers as on one context with room for it; full, and a
// prompt whose compressed cells would not fit, are refused before anything runs.
func TestPromptLongerThanAStreamIsEncodedInThePrefillContext(t *testing.T) {
	const stream = 256
	prompt := strings.Repeat(longPrompt, 8) // about 2x a stream
	spec := cfg(elasticcache.Elastic, 0.3)
	e := startEngine(t, twoContexts(2, stream, 1024))
	got := run(t, e, greedyReq("long", prompt, 24, spec))
	if got.err != nil {
		t.Fatal(got.err)
	}
	if got.usage.PromptTokens <= stream || got.kv.FinalCells > stream {
		t.Fatalf("prompt %d tokens, %d cells in the stream at the end: the test needs a prompt longer than a %d-cell stream",
			got.usage.PromptTokens, got.kv.FinalCells, stream)
	}
	one := startEngine(t, Options{Parallel: 1, CtxSize: 2048})
	if want := run(t, one, greedyReq("long", prompt, 24, spec)); got.text != want.text {
		t.Errorf("answer differs from one context:\n%q\n%q", got.text, want.text)
	}

	refused := []struct {
		name  string
		req   *completion.Request
		limit int
		raise string
	}{
		{"full", greedyReq("full", prompt, 4, cfg(elasticcache.Full, 1)), stream - 1, "raise --ctx-size"},
		// elastic 0.9 keeps 0.9 of the prompt: the longest that fits a stream.
		{"elastic 0.9", greedyReq("e9", prompt, 4, cfg(elasticcache.Elastic, 0.9)), limitOf(e, cfg(elasticcache.Elastic, 0.9)), "or lower the budget"},
		{"longer than the prefill context", greedyReq("huge", strings.Repeat(longPrompt, 40), 4, cfg(elasticcache.Elastic, 0.1)), 1023, "raise --prefill-ctx-size"},
	}
	for _, tc := range refused {
		_, err := e.Submit(context.Background(), tc.req)
		var tl *completion.PromptTooLongError
		if !errors.As(err, &tl) || tl.Limit != tc.limit || tl.Tokens <= tl.Limit || !strings.Contains(tl.Error(), tc.raise) {
			t.Errorf("%s: got %v, want a prompt-too-long error with limit %d that says to raise %s", tc.name, err, tc.limit, tc.raise)
		}
	}
	if l, sp := limitOf(e, cfg(elasticcache.Elastic, 0.9)), cfg(elasticcache.Elastic, 0.9); sp.MaxCellsAfterPrompt(l, 1) > stream ||
		sp.MaxCellsAfterPrompt(l+1, 1) <= stream {
		t.Errorf("elastic 0.9 limit %d is not the longest prompt whose cells fit a stream", l)
	}
}

// quantModel is a small random text model whose attention heads (32 elements)
// llama.cpp can store in q8_0 and q4_0 blocks; the default test model's are 16.
var quantModel = sync.OnceValues(func() (*llama.Model, error) {
	opt := testmodel.DefaultOptions()
	opt.Embd, opt.Heads, opt.KVHeads, opt.FF, opt.Seed = 128, 4, 2, 256, 3
	mp, _, err := testmodel.Ensure(opt)
	if err != nil {
		return nil, err
	}
	return llama.LoadModel(mp, llama.ModelParams{UseMmap: true})
})

func startQuantEngine(t *testing.T, opts Options) *testEngine {
	t.Helper()
	m, err := quantModel()
	if err != nil {
		t.Fatal(err)
	}
	return startEngineOn(t, m, nil, opts)
}

func limitOf(e *testEngine, spec elasticcache.Spec) int {
	l, _ := e.promptLimit(spec)
	return l
}

// Every policy at budget 1 equals full on the two-context engine, with f16 rows and
// with q8_0 keys.
func TestTwoContextsBudgetOneEqualsFull(t *testing.T) {
	for _, kv := range []string{"f16", "q8_0"} {
		t.Run(kv, func(t *testing.T) {
			opts := twoContexts(1, 1024, 1024)
			opts.KVType = kv
			e := startQuantEngine(t, opts)
			full := run(t, e, greedyReq("full", longPrompt, 24, cfg(elasticcache.Full, 1)))
			for _, p := range allPolicies {
				if got := run(t, e, greedyReq(string(p), longPrompt, 24, cfg(p, 1))); got.text != full.text {
					t.Errorf("%s@1 differs from full:\n%q\n%q", p, got.text, full.text)
				}
			}
		})
	}
}

// The move converts rows to the decode context's layout: q8_0 keys, and with flash
// attention in the decode context V rows not transposed (q8_0 too). Compressed
// sequences then decode there; h2o, which reads attention at each decode step, is
// refused; bytes saved count the decode context's real row size.
func TestMoveIntoAQuantizedFlashAttentionDecodeContext(t *testing.T) {
	opts := twoContexts(2, 1024, 1024)
	opts.KVType, opts.DecodeFlashAttn = "q8_0", true
	e := startQuantEngine(t, opts)
	f16 := startQuantEngine(t, twoContexts(2, 1024, 1024))
	dec, ref := e.Contexts()[0], f16.Contexts()[0]
	if !dec.FlashAttn || dec.BytesPerCell >= ref.BytesPerCell || e.Contexts()[1].FlashAttn {
		t.Fatalf("contexts %+v, f16 %+v", e.Contexts(), f16.Contexts())
	}
	for _, p := range []elasticcache.Policy{elasticcache.Elastic, elasticcache.Local} {
		got := run(t, e, greedyReq(string(p), strings.Repeat(longPrompt, 3), 20, cfg(p, 0.5)))
		if got.err != nil || got.usage.CompletionTokens != 20 {
			t.Fatalf("%s: %+v", p, got)
		}
		want := int64(got.kv.PromptEntries+got.usage.CompletionTokens-1-got.kv.FinalCells) * dec.BytesPerCell
		if got.kv.BytesSaved != want {
			t.Errorf("%s: bytes saved %d, want %d (%d bytes per cell)", p, got.kv.BytesSaved, want, dec.BytesPerCell)
		}
	}
	_, err := e.Submit(context.Background(), greedyReq("h2o", longPrompt, 4, cfg(elasticcache.H2O, 0.5)))
	var pu *completion.PolicyUnsupportedError
	if !errors.As(err, &pu) || pu.Policy != elasticcache.H2O {
		t.Fatalf("h2o with decode flash attention: %v", err)
	}
}

// A request that fails or is cancelled while its prompt is in the prefill context
// frees it: the next compressed request runs.
func TestFailureInThePrefillContextFreesIt(t *testing.T) {
	e := startEngine(t, twoContexts(2, 1024, 1024))
	fault := func(id string) error {
		if id == "bad" {
			return errors.New("injected failure")
		}
		return nil
	}
	e.onFault.Store(&fault)
	bad, err := e.Submit(context.Background(), greedyReq("bad", longPrompt, 8, cfg(elasticcache.Elastic, 0.5)))
	if err != nil {
		t.Fatal(err)
	}
	if r := collect(t, bad); r.err == nil {
		t.Fatalf("bad request: %+v", r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if ch, err := e.Submit(ctx, greedyReq("gone", longPrompt, 8, cfg(elasticcache.Elastic, 0.5))); err == nil {
		collect(t, ch)
	}
	if r := run(t, e, greedyReq("good", longPrompt, 8, cfg(elasticcache.Elastic, 0.5))); r.err != nil || r.usage.CompletionTokens != 8 {
		t.Fatalf("good request: %+v", r)
	}
	for k, p := range e.ppools {
		if e.pctx.SeqPosMax(k) != -1 || p.free() != p.size() {
			t.Fatalf("cells remain in stream %d of the prefill context", k)
		}
	}
}

// A conversation's next turn continues from its held cells in the decode context,
// compressed or not.
func TestTwoContextsKeepConversations(t *testing.T) {
	for _, spec := range []elasticcache.Spec{cfg(elasticcache.Full, 1), cfg(elasticcache.Elastic, 0.5)} {
		t.Run(string(spec.Policy()), func(t *testing.T) {
			opts := twoContexts(2, 1024, 1024)
			opts.Reuse, opts.ReuseCompressed = true, true
			e := startEngine(t, opts)
			first := greedyReq("t1", "What is in the picture? "+longPrompt, 10, spec, testPNG(t, 2))
			first.AnswerPrefix = " "
			r1 := run(t, e, first)
			second := turn2(first, r1.text, "Tell me more about its colors.")
			second.ID = "t2"
			r2 := run(t, e, second)
			if r2.err != nil || r2.usage.CachedTokens == 0 {
				t.Fatalf("second turn did not continue the held conversation: %+v", r2)
			}
			if spec.Policy() == elasticcache.Full {
				plain := startEngine(t, twoContexts(2, 1024, 1024))
				if want := run(t, plain, noReuse(second)); r2.text != want.text {
					t.Errorf("reused turn differs from encoding it again:\n%q\n%q", r2.text, want.text)
				}
			}
		})
	}
}
