package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

var (
	tmModel  *llama.Model
	tmVision *llama.Vision
)

func TestMain(m *testing.M) {
	llama.Init(llama.LogError)
	mp, vp, err := testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		panic(err)
	}
	if tmModel, err = llama.LoadModel(mp, llama.ModelParams{UseMmap: true}); err != nil {
		panic(err)
	}
	if tmVision, err = llama.LoadVision(tmModel, vp, llama.VisionParams{Threads: 1}); err != nil {
		panic(err)
	}
	code := m.Run()
	tmVision.Close()
	tmModel.Close()
	os.Exit(code)
}

type testEngine struct {
	*Engine
	mu  sync.Mutex
	obs []Observation
	// Hooks a test installs after start; the decode loop reads them atomically.
	onObserve atomic.Pointer[func(Observation)]
	onFault   atomic.Pointer[func(string) error]
}

func startEngine(t testing.TB, opts Options) *testEngine {
	t.Helper()
	return startEngineOn(t, tmModel, tmVision, opts)
}

// startEngineOn is startEngine on another model (vision may be nil).
func startEngineOn(t testing.TB, model *llama.Model, vision *llama.Vision, opts Options) *testEngine {
	t.Helper()
	if opts.Parallel == 0 {
		opts.Parallel = 2
	}
	if opts.CtxSize == 0 {
		opts.CtxSize = 2048 * opts.Parallel
	}
	if opts.BatchSize == 0 {
		opts.BatchSize = 256
	}
	opts.Threads = 1
	opts.Log = zerolog.Nop()
	te := &testEngine{}
	opts.Observe = func(o Observation) {
		te.mu.Lock()
		te.obs = append(te.obs, o)
		te.mu.Unlock()
		if h := te.onObserve.Load(); h != nil {
			(*h)(o)
		}
	}
	opts.Fault = func(id string) error {
		if h := te.onFault.Load(); h != nil {
			return (*h)(id)
		}
		return nil
	}
	e, err := Start(model, vision, opts)
	if err != nil {
		t.Fatal(err)
	}
	te.Engine = e
	t.Cleanup(func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // fail whatever a failed test left running
		e.Stop(ctx)
	})
	return te
}

func (te *testEngine) observations(id string) []Observation {
	te.mu.Lock()
	defer te.mu.Unlock()
	var out []Observation
	for _, o := range te.obs {
		if o.RequestID == id {
			out = append(out, o)
		}
	}
	return out
}

type result struct {
	text   string
	finish string
	usage  completion.Usage
	kv     *completion.KVReport
	err    error
}

func collect(t testing.TB, ch <-chan completion.Event) result {
	t.Helper()
	var r result
	timeout := time.After(5 * time.Minute)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				r.err = fmt.Errorf("channel closed before the final event")
				return r
			}
			r.text += ev.Text
			if ev.Done {
				r.finish, r.usage, r.kv, r.err = ev.FinishReason, ev.Usage, ev.KV, ev.Err
				return r
			}
		case <-timeout:
			t.Fatal("request did not finish")
		}
	}
}

func greedyReq(id, prompt string, maxTokens int, cache elasticcache.Spec, images ...[]byte) *completion.Request {
	var parts []completion.Part
	for _, img := range images {
		parts = append(parts, completion.Image(img))
	}
	return &completion.Request{
		ID:        id,
		Messages:  []completion.Message{{Role: "user", Parts: append(parts, completion.Text(prompt))}},
		MaxTokens: maxTokens,
		Sampling:  completion.Sampling{Temperature: 0, RepeatPenalty: 1},
		Cache:     cache,
	}
}

func run(t testing.TB, e *testEngine, req *completion.Request) result {
	t.Helper()
	ch, err := e.Submit(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	r := collect(t, ch)
	if r.err != nil {
		t.Fatalf("%s: %v", req.ID, r.err)
	}
	return r
}

func cfg(p elasticcache.Policy, b float64) elasticcache.Spec {
	c := elasticcache.DefaultConfig()
	c.Policy, c.Budget = p, b
	return elasticcache.MustSpec(c)
}

// refCfg is cfg with the published code's selection rules.
func refCfg(p elasticcache.Policy, b float64) elasticcache.Spec {
	c := cfg(p, b).Config()
	c.Selection = elasticcache.ReferenceSelection
	return elasticcache.MustSpec(c)
}

func testPNG(t testing.TB, seed int) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, 48, 48))
	for y := range 48 {
		for x := range 48 {
			img.SetRGBA(x, y, color.RGBA{uint8(x * 5 * seed), uint8(y * 3), uint8(200 - 40*seed), 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

var allPolicies = []elasticcache.Policy{elasticcache.Elastic, elasticcache.H2O, elasticcache.Local}

const longPrompt = "Describe the picture in detail, listing every shape, its color and where it is. "

func TestBudgetOneMatchesFullForEveryPolicy(t *testing.T) {
	e := startEngine(t, Options{Parallel: 1})
	for _, withImage := range []bool{false, true} {
		var imgs [][]byte
		if withImage {
			imgs = [][]byte{testPNG(t, 1)}
		}
		full := run(t, e, greedyReq("full", longPrompt, 40, cfg(elasticcache.Full, 1), imgs...))
		if full.usage.CompletionTokens != 40 || full.finish != completion.FinishLength {
			t.Fatalf("full: %d tokens, finish %q", full.usage.CompletionTokens, full.finish)
		}
		for _, p := range allPolicies {
			for _, spec := range []elasticcache.Spec{cfg(p, 1), refCfg(p, 1)} {
				got := run(t, e, greedyReq(string(p), longPrompt, 40, spec, imgs...))
				if got.text != full.text {
					t.Errorf("image=%v %s@1.0 (%s) differs from full:\n%q\n%q", withImage, p, spec.Selection(), got.text, full.text)
				}
				if got.kv.Kept != got.kv.PromptEntries || got.kv.Evicted != 0 || got.kv.Merged != 0 {
					t.Errorf("%s@1.0 (%s) changed the cache: %+v", p, spec.Selection(), got.kv)
				}
			}
		}
	}
}

// After the prefill plan every sequence holds K = ceil(b*N) cells; during decode it
// never holds more than ceil(b*T)+1; and attention spans fewer cells than under full.
func TestPolicyKeepsBudgetDuringPrefillAndDecode(t *testing.T) {
	e := startEngine(t, Options{Parallel: 1})
	img := testPNG(t, 2)
	full := run(t, e, greedyReq("ref-full", longPrompt, 48, cfg(elasticcache.Full, 1), img))
	fullObs := e.observations("ref-full")
	fullSpan := fullObs[len(fullObs)-1].Attended
	for _, p := range allPolicies {
		for _, b := range []float64{0.2, 0.5, 0.8} {
			id := fmt.Sprintf("%s@%.1f", p, b)
			c := cfg(p, b)
			r := run(t, e, greedyReq(id, longPrompt, 48, c, img))
			n := r.kv.PromptEntries
			if n != full.usage.PromptTokens || n < 144 {
				t.Fatalf("%s: prompt entries %d, full had %d", id, n, full.usage.PromptTokens)
			}
			k := c.KeepCount(n)
			if r.kv.Kept != k {
				t.Errorf("%s: kept %d, want ceil(%.1f*%d) = %d", id, r.kv.Kept, b, n, k)
			}
			obs := e.observations(id)
			if len(obs) == 0 || !obs[0].Prefill || obs[0].Held != k {
				t.Fatalf("%s: first observation %+v, want %d cells after prefill", id, obs[0], k)
			}
			if p := obs[0].Plan; p == nil || p.N != n || p.K != k || len(p.Layers) != tmModel.Info().Layers || p.Merged() != r.kv.Merged {
				t.Fatalf("%s: observed plan %+v, want N=%d K=%d over every layer, %d merged", id, p, n, k, r.kv.Merged)
			}
			decodeEvictions := 0
			for _, o := range obs[1:] {
				if bound := c.KeepCount(o.T) + 1; o.Held > bound {
					t.Fatalf("%s: T=%d holds %d cells > ceil(b*T)+1 = %d", id, o.T, o.Held, bound)
				}
				if o.Evicted >= 0 {
					decodeEvictions++
				}
			}
			if want := r.kv.Evicted - obs[0].Plan.Evicted(); decodeEvictions != want {
				t.Errorf("%s: %d decode steps report an eviction, the report counts %d", id, decodeEvictions, want)
			}
			last := obs[len(obs)-1]
			if b <= 0.5 && last.Attended >= fullSpan {
				t.Errorf("%s: attention spans %d cells, full spans %d", id, last.Attended, fullSpan)
			}
			if r.kv.BytesSaved <= 0 || r.kv.FinalCells >= n+48 {
				t.Errorf("%s: report %+v saves nothing", id, r.kv)
			}
			t.Logf("%s: N=%d K=%d final=%d attended=%d (full %d) merged=%d evicted=%d", id, n, k, r.kv.FinalCells, last.Attended, fullSpan, r.kv.Merged, r.kv.Evicted)
		}
	}
}

// The engine's cell bookkeeping (which cell holds which position) matches what
// llama.cpp reports, with evictions, rewrites and several sequences sharing a pool.
func TestCellBookkeepingMatchesLlama(t *testing.T) {
	for _, unified := range []bool{false, true} {
		t.Run(fmt.Sprintf("unified=%v", unified), func(t *testing.T) {
			e := startEngine(t, Options{Parallel: 4, CtxSize: 4 * 1024, Unified: unified, UBatchSize: 64})
			checked := 0
			check := func(o Observation) {
				if (o.T%37 == 0 || o.Prefill) && bookkeepingAgrees(t, e, o) {
					checked++
				}
			}
			e.onObserve.Store(&check)
			reqs := []*completion.Request{
				greedyReq("h2o", strings.Repeat("abc ", 30), 120, cfg(elasticcache.H2O, 0.5)),
				greedyReq("elastic-reference", longPrompt, 100, refCfg(elasticcache.Elastic, 0.5), testPNG(t, 2)),
				greedyReq("elastic", longPrompt, 120, cfg(elasticcache.Elastic, 0.4), testPNG(t, 1)),
				greedyReq("local", strings.Repeat("xyz ", 20), 90, cfg(elasticcache.Local, 0.6)),
			}
			var chans []<-chan completion.Event
			for _, r := range reqs {
				ch, err := e.Submit(context.Background(), r)
				if err != nil {
					t.Fatal(err)
				}
				chans = append(chans, ch)
			}
			for _, ch := range chans {
				if r := collect(t, ch); r.err != nil {
					t.Fatal(r.err)
				}
			}
			if checked < 6 {
				t.Fatalf("only %d snapshots checked", checked)
			}
		})
	}
}

// bookkeepingAgrees compares the cells and positions the engine recorded for
// observation o's sequence with those llama.cpp lists, reporting a difference as
// an error; it reports whether they agree.
func bookkeepingAgrees(t *testing.T, e *testEngine, o Observation) bool {
	s := e.slots[o.Slot]
	got, err := e.ctx.SeqCells(0, o.Slot)
	if err != nil {
		t.Error(err)
		return false
	}
	// llama.cpp lists a sequence's cells in cell order.
	cells, pos := s.cache.cells, s.cache.pos
	order := make([]int, len(cells))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return cells[order[a]] < cells[order[b]] })
	if len(got) != len(order) {
		t.Errorf("slot %d T=%d: llama holds %d cells, bookkeeping %d", o.Slot, o.T, len(got), len(order))
		return false
	}
	for k, i := range order {
		if got[k].Index != cells[i] || got[k].Pos != pos[i] {
			t.Errorf("slot %d T=%d: cell-order entry %d: llama cell %d pos %d, bookkeeping cell %d pos %d", o.Slot, o.T, k, got[k].Index, got[k].Pos, cells[i], pos[i])
			return false
		}
	}
	return true
}

// A burst of prompts encoded in their streams shares llama_decode calls (equal
// tokens per stream, cut into ubatches of 64 here): one call carries all four, the
// engine's cells are llama.cpp's, and every answer is the one the request gets
// alone. A picture prompt joins once its text follows the picture, and a
// compressing request (local, in its stream) shares calls too.
//
// Also on Gemma 3 (a window cache beside the full-attention one) and Qwen2.5-VL
// (M-RoPE positions after the picture).
func TestPromptsOfABurstShareCalls(t *testing.T) {
	full := elasticcache.Spec{}
	onBurstFamilies(t, Options{Parallel: 5, CtxSize: 5 * 1024, UBatchSize: 64, BatchSize: 512}, func() []*completion.Request {
		return []*completion.Request{
			greedyReq("a", "Tell me about the red circle. "+longPrompt, 8, full),
			greedyReq("b", strings.Repeat("A blue square and a green triangle. ", 9), 8, full),
			greedyReq("c", "What is in the picture? "+longPrompt, 8, full, testPNG(t, 1)),
			greedyReq("d", strings.Repeat("xyz ", 40), 8, cfg(elasticcache.Local, 0.6)),
		}
	})
}

// onBurstFamilies runs testBurst on the test model, Gemma 3 and Qwen2.5-VL.
func onBurstFamilies(t *testing.T, opts Options, reqs func() []*completion.Request) {
	_, gm, gv := loadFamily(t, testmodel.ArchGemma3)
	_, qm, qv := loadFamily(t, testmodel.ArchQwen25VL)
	for _, mv := range []struct {
		name string
		m    *llama.Model
		v    *llama.Vision
	}{{"test-model", tmModel, tmVision}, {"gemma3", gm, gv}, {"qwen25vl", qm, qv}} {
		t.Run(mv.name, func(t *testing.T) { testBurst(t, mv.m, mv.v, opts, reqs) })
	}
}

// A burst of prompts of compressing policies shares calls in the prefill
// context, each prompt in a stream of its own, the attention that elastic and h2o
// plan with captured per stream: one call carries all four, and every answer,
// kept count and merge is the one the request gets alone. On the three families.
func TestCompressedPromptsOfABurstShareThePrefillContext(t *testing.T) {
	opts := Options{Parallel: 5, CtxSize: 5 * 1024, UBatchSize: 64, BatchSize: 512, PrefillCtx: 1024, PrefillStreams: 4}
	onBurstFamilies(t, opts, func() []*completion.Request {
		return []*completion.Request{
			greedyReq("a", "Tell me about the red circle. "+longPrompt, 8, cfg(elasticcache.Elastic, 0.5)),
			greedyReq("b", strings.Repeat("A blue square and a green triangle. ", 9), 8, cfg(elasticcache.H2O, 0.6)),
			greedyReq("c", "What is in the picture? "+longPrompt, 8, cfg(elasticcache.Elastic, 0.3), testPNG(t, 1)),
			greedyReq("d", strings.Repeat("xyz ", 40), 8, cfg(elasticcache.Local, 0.6)),
		}
	})
}

// testBurst runs the requests of reqs one at a time, then as a burst admitted
// together, on engines with opts, and checks that the burst's prompts shared a
// call and that every request answers as it does alone.
func testBurst(t *testing.T, m *llama.Model, v *llama.Vision, opts Options, reqs func() []*completion.Request) {
	full := elasticcache.Spec{}
	// A gate request holds the loop (its fault hook waits) until the burst is
	// queued, then fails, so the four are admitted together.
	alone := startEngineOn(t, m, v, opts)
	want := map[string]result{}
	for _, r := range reqs() {
		want[r.ID] = run(t, alone, r)
	}
	if got := alone.widestPromptCall.Load(); got > 1 {
		t.Fatalf("one request at a time: a call encoded %d prompts", got)
	}

	e := startEngineOn(t, m, v, opts)
	checked := 0
	check := func(o Observation) {
		if o.Prefill && bookkeepingAgrees(t, e, o) {
			checked++
		}
	}
	e.onObserve.Store(&check)
	// The burst is submitted only once the loop waits in the gate, so that no
	// request of it is admitted before the others.
	entered, released := make(chan struct{}), make(chan struct{})
	var once sync.Once
	fault := func(id string) error {
		if id == "gate" {
			once.Do(func() { close(entered) })
			<-released
			return errors.New("the gate opens")
		}
		return nil
	}
	e.onFault.Store(&fault)
	gate, err := e.Submit(context.Background(), greedyReq("gate", "wait", 1, full))
	if err != nil {
		t.Fatal(err)
	}
	<-entered
	var chans []<-chan completion.Event
	for _, r := range reqs() {
		ch, err := e.Submit(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		chans = append(chans, ch)
	}
	close(released)
	if r := collect(t, gate); r.err == nil {
		t.Fatal("the gate request did not fail")
	}
	for i, ch := range chans {
		r := collect(t, ch)
		if r.err != nil {
			t.Fatal(r.err)
		}
		id := reqs()[i].ID
		if w := want[id]; r.text != w.text || r.kv.Kept != w.kv.Kept || r.kv.Merged != w.kv.Merged {
			t.Errorf("%s: in a burst %q (kept %d, merged %d), alone %q (kept %d, merged %d)", id, r.text, r.kv.Kept, r.kv.Merged, w.text, w.kv.Kept, w.kv.Merged)
		}
	}
	if checked != 4 {
		t.Errorf("%d of 4 prompts' cells checked", checked)
	}
	// How many calls the rest takes depends on the pacer's measured times once the
	// first answers generate; the first call is the burst's, whatever the timing.
	if got := e.widestPromptCall.Load(); got != 4 {
		t.Errorf("the most prompts one call encoded: %d, want the burst's 4", got)
	}
}

// engineLayers is the hook's part-0 layers of ctx.
func engineLayers(t *testing.T, ctx *llama.Context) []int {
	t.Helper()
	l, err := ctx.CacheLayers(0)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Rows read back after a merge (the sequence state, decoded by kvstate.go's codecs:
// an oracle independent of the hook's ggml graph) equal the float64 group means
// (f16 tolerance).
func TestMergedRowsEqualOracleMeans(t *testing.T) {
	ctx, err := llama.NewContext(tmModel, llama.ContextParams{NCtx: 1024, NSeqMax: 1, Threads: 1, Capture: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	toks, err := tmModel.Tokenize(strings.Repeat("merge these rows together ", 8), true, false)
	if err != nil {
		t.Fatal(err)
	}
	n := len(toks)
	b := llama.NewBatch(n, 0, 1)
	defer b.Close()
	for i, tok := range toks {
		b.Add(tok, i, 0, i == n-1)
	}
	ctx.CaptureReset()
	ctx.CaptureEnable(true)
	if err := ctx.Decode(b); err != nil {
		t.Fatal(err)
	}
	ctx.CaptureEnable(false)
	scores, err := ctx.CaptureSums(0, n)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := elasticcache.NewTracker(cfg(elasticcache.Elastic, 0.3), tmModel.Info().Layers)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := tr.PlanPrefill(n, scores)
	if err != nil || plan == nil {
		t.Fatalf("plan %v err %v", plan, err)
	}
	before, err := ctx.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	// The engine's own path: a seqCache over the decoded cells hands the plan to the
	// KV hook, which merges in place.
	sc := &seqCache{lctx: ctx, seq: 0, pool: newCellPool(ctx.NCtxSeq(), 512), layers: engineLayers(t, ctx)}
	for i := range n {
		sc.placed(i, i)
	}
	sc.pool.assign(0, sc.cells)
	w := sc.newRewrite(plan.K, len(plan.Layers))
	for l, lp := range plan.Layers {
		for j, e := range lp.Keep {
			w.slot(l, j, e, lp.Groups[j]...)
		}
	}
	for j, e := range plan.Layers[0].Keep {
		w.meta(j, e, e)
	}
	if err := sc.apply(w); err != nil {
		t.Fatal(err)
	}
	after, err := ctx.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	if after.Cells() != plan.K {
		t.Fatalf("holds %d cells, want %d", after.Cells(), plan.K)
	}
	layersDiffer := false
	for l, lp := range plan.Layers {
		if l > 0 && fmt.Sprint(lp.Keep) != fmt.Sprint(plan.Layers[0].Keep) {
			layersDiffer = true
		}
		for _, kind := range []string{"K", "V"} {
			in, out := &before.K[l], &after.K[l]
			if kind == "V" {
				in, out = &before.V[l], &after.V[l]
			}
			rows := make([][]float32, n)
			for j := range rows {
				rows[j] = make([]float32, in.RowElems)
				in.Row(n, j, rows[j])
			}
			want := elasticcache.ApplyLayer(lp, rows)
			got := make([]float32, in.RowElems)
			for i := range want {
				out.Row(plan.K, i, got)
				for k := range got {
					// f16 storage: half a unit in the last place (2^-11 relative) plus a tiny absolute floor.
					tol := math.Abs(float64(want[i][k]))*math.Pow(2, -11) + 1e-6
					if math.Abs(float64(got[k]-want[i][k])) > tol {
						t.Fatalf("layer %d %s cell %d elem %d: got %g, oracle %g", l, kind, i, k, got[k], want[i][k])
					}
				}
			}
		}
	}
	// The test is about layer-wise merging: it must see layers choose differently.
	if !layersDiffer {
		t.Fatal("every layer chose the same anchors for this prompt; the test cannot show layer-wise merges")
	}
}

// Two parallel sequences with different policies each give what they give alone.
// mixedRequests are four requests, one per policy (two with a picture).
func mixedRequests(t *testing.T) []*completion.Request {
	return []*completion.Request{
		greedyReq("a", longPrompt, 32, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1)),
		greedyReq("b", "Tell me about squares and circles.", 32, cfg(elasticcache.Local, 0.6)),
		greedyReq("c", longPrompt+" Again.", 32, cfg(elasticcache.H2O, 0.5)),
		greedyReq("d", "What is there?", 32, cfg(elasticcache.Full, 1), testPNG(t, 2)),
	}
}

func TestParallelSequencesWithDifferentPoliciesMatchAlone(t *testing.T) {
	reqs := mixedRequests(t)
	alone := make([]string, len(reqs))
	{
		e := startEngine(t, Options{Parallel: 1, CtxSize: 2048})
		for i, r := range reqs {
			alone[i] = run(t, e, r).text
		}
	}
	e := startEngine(t, Options{Parallel: 4, CtxSize: 4 * 2048})
	for i, r := range runTogether(t, e, reqs) {
		if r.text != alone[i] {
			t.Errorf("%s: parallel output differs from alone:\n%q\n%q", reqs[i].ID, r.text, alone[i])
		}
	}
}

func TestStopStringsEndGenerationWithoutLeakingTheStop(t *testing.T) {
	e := startEngine(t, Options{Parallel: 1})
	ref := run(t, e, greedyReq("ref", "count", 40, cfg(elasticcache.Full, 1)))
	if len(ref.text) < 12 {
		t.Fatalf("reference too short: %q", ref.text)
	}
	stop := ref.text[8:11]
	req := greedyReq("stop", "count", 40, cfg(elasticcache.Full, 1))
	req.Stop = []string{stop}
	got := run(t, e, req)
	want := ref.text[:strings.Index(ref.text, stop)]
	if got.text != want || got.finish != completion.FinishStop {
		t.Fatalf("stop %q: got %q (%s), want %q", stop, got.text, got.finish, want)
	}
}

func TestCancelledRequestFreesItsSlot(t *testing.T) {
	e := startEngine(t, Options{Parallel: 1})
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := e.Submit(ctx, greedyReq("cancel", "go on forever", 0, cfg(elasticcache.Full, 1)))
	if err != nil {
		t.Fatal(err)
	}
	<-ch // first text
	cancel()
	deadline := time.Now().Add(10 * time.Second)
	for e.Stats().SlotsBusy != 0 || e.Stats().KVCellsUsed != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("slot not freed: %+v", e.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if e.ctx.SeqPosMax(0) != -1 {
		t.Fatalf("cells of the cancelled sequence remain (pos max %d)", e.ctx.SeqPosMax(0))
	}
	// The slot serves the next request.
	if r := run(t, e, greedyReq("after", "hi", 4, cfg(elasticcache.Full, 1))); r.usage.CompletionTokens != 4 {
		t.Fatalf("next request: %+v", r)
	}
}

// A prompt cancelled while it is encoded in chunks (another stream generating)
// leaves no cell behind in either context, and the slot serves the same request
// afterwards with the answer it gives in one piece.
func TestCancelledHalfEncodedPromptFreesItsCells(t *testing.T) {
	e := startEngine(t, Options{Parallel: 2, CtxSize: 2 * 2048, PrefillCtx: 2048, PrefillStreams: 2, PrefillChunk: 7})
	busyCtx, stopBusy := context.WithCancel(context.Background())
	defer stopBusy()
	busy, err := e.Submit(busyCtx, greedyReq("busy", "Keep talking about shapes.", 1500, cfg(elasticcache.Full, 1)))
	if err != nil {
		t.Fatal(err)
	}
	<-busy // generating
	long := strings.Repeat(longPrompt, 6)
	req := greedyReq("half", long, 8, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1))
	ctx, cancel := context.WithCancel(context.Background())
	before := e.promptCalls.Load()
	ch, err := e.Submit(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for e.promptCalls.Load()-before < 4 {
		if time.Now().After(deadline) {
			t.Fatal("the prompt's chunks never started")
		}
		time.Sleep(100 * time.Microsecond)
	}
	cancel()
	for ev := range ch { // closed once the engine has dropped the request
		if ev.Text != "" || ev.Done {
			t.Fatalf("the cancelled request went on to %+v: it was not cancelled mid-prompt", ev)
		}
	}
	stopBusy()
	for range busy {
	}
	for e.Stats().SlotsBusy != 0 || e.Stats().KVCellsUsed != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("cells not freed: %+v", e.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The loop is idle: its contexts may be read.
	for k, pool := range e.ppools {
		if p := e.pctx.SeqPosMax(k); p != -1 || pool.free() != pool.size() {
			t.Fatalf("prefill stream %d still holds the cancelled prompt: pos max %d, %d of %d cells free", k, p, pool.free(), pool.size())
		}
	}
	for s := range 2 {
		if p := e.ctx.SeqPosMax(s); p != -1 && e.Stats().KVCellsHeld == 0 {
			t.Fatalf("stream %d holds positions up to %d with nothing held", s, p)
		}
	}
	again := run(t, e, greedyReq("again", long, 8, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1)))
	whole := run(t, startEngine(t, Options{Parallel: 1, CtxSize: 2048}), greedyReq("whole", long, 8, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1)))
	if again.text != whole.text {
		t.Errorf("after the cancellation %q, in one piece %q", again.text, whole.text)
	}
}

func TestPromptLongerThanASlotIsAnInputError(t *testing.T) {
	e := startEngine(t, Options{Parallel: 2, CtxSize: 512})
	_, err := e.Submit(context.Background(), greedyReq("long", strings.Repeat("x", 400), 4, cfg(elasticcache.Full, 1)))
	var tl *completion.PromptTooLongError
	if !errors.As(err, &tl) || tl.Limit != e.SeqCells()-1 || tl.Tokens <= tl.Limit {
		t.Fatalf("got %v", err)
	}
}

// Forced decoding scores the reference tokens: under full it equals the NLL computed
// by a direct decode loop, and at budget 1 every policy gives the same value.
func TestForcedDecodingNLLMatchesDirectLoop(t *testing.T) {
	answer, err := tmModel.Tokenize(" a red circle at the top left", false, false)
	if err != nil {
		t.Fatal(err)
	}
	force := make([]int32, len(answer))
	for i, a := range answer {
		force[i] = int32(a)
	}
	e := startEngine(t, Options{Parallel: 1})
	req := greedyReq("ppl", "What is in the image?", 0, cfg(elasticcache.Full, 1))
	req.Force = force
	ch, err := e.Submit(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	var final completion.Event
	for ev := range ch {
		if ev.Done {
			final = ev
		}
	}
	if final.Err != nil || final.NLLTokens != len(force) {
		t.Fatalf("final %+v", final)
	}

	// Direct loop on a fresh context.
	ctx, err := llama.NewContext(tmModel, llama.ContextParams{NCtx: 2048, NSeqMax: 1, Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	text, err := tmModel.ApplyChatTemplate("", []llama.ChatMessage{{Role: "user", Content: "What is in the image?"}}, true)
	if err != nil {
		t.Fatal(err)
	}
	prompt, err := tmModel.Tokenize(text, true, true)
	if err != nil {
		t.Fatal(err)
	}
	b := llama.NewBatch(len(prompt)+1, 0, 1)
	defer b.Close()
	for i, tok := range prompt {
		b.Add(tok, i, 0, i == len(prompt)-1)
	}
	if err := ctx.Decode(b); err != nil {
		t.Fatal(err)
	}
	want := NegLogProb(ctx.Logits(len(prompt)-1), answer[0])
	for i := 1; i < len(answer); i++ {
		b.Clear()
		b.Add(answer[i-1], len(prompt)+i-1, 0, true)
		if err := ctx.Decode(b); err != nil {
			t.Fatal(err)
		}
		want += NegLogProb(ctx.Logits(0), answer[i])
	}
	if math.Abs(final.NLL-want) > 1e-4*math.Abs(want) {
		t.Fatalf("engine NLL %g, direct loop %g", final.NLL, want)
	}
	for _, p := range allPolicies {
		req := greedyReq("ppl-"+string(p), "What is in the image?", 0, cfg(p, 1))
		req.Force = force
		ch, err := e.Submit(context.Background(), req)
		if err != nil {
			t.Fatal(err)
		}
		for ev := range ch {
			if ev.Done && ev.NLL != final.NLL {
				t.Errorf("%s@1.0 NLL %g, full %g", p, ev.NLL, final.NLL)
			}
		}
	}
}

// A unified context sized for two full conversations serves four at once at budget
// 0.5: admission counts the cells each policy lets a sequence hold.
func TestBudgetHalfServesTwiceTheConversations(t *testing.T) {
	const conv = 250 // prompt + generated tokens of one conversation
	e := startEngine(t, Options{Parallel: 4, CtxSize: 512, Unified: true})
	if e.ctx.NCtx() < 2*conv || e.ctx.NCtx() >= 3*conv {
		t.Fatalf("context has %d cells; the test needs room for exactly 2 full conversations", e.ctx.NCtx())
	}
	prompt := "Tell me everything about the shapes in the picture, one by one."
	probe := run(t, e, greedyReq("probe", prompt, 1, cfg(elasticcache.Full, 1)))
	gen := conv - probe.usage.PromptTokens

	// maxBusy is the most slots in use at once while four conversations run,
	// read on the decode loop at each of their steps (Options.Fault), so no
	// instant between two samples is missed. The first step waits until all
	// four are queued, so how fast this goroutine submits does not matter
	// either.
	maxBusy := func(policy elasticcache.Policy, budget float64) int {
		var peak atomic.Int64
		queued := make(chan struct{})
		fault := func(string) error {
			<-queued
			if n := int64(e.Stats().SlotsBusy); n > peak.Load() {
				peak.Store(n) // only the loop writes it
			}
			return nil
		}
		e.onFault.Store(&fault)
		defer e.onFault.Store(nil)
		var chans []<-chan completion.Event
		for i := range 4 {
			ch, err := e.Submit(context.Background(), greedyReq(fmt.Sprintf("%s-%d", policy, i), prompt, gen, cfg(policy, budget)))
			if err != nil {
				close(queued)
				t.Fatalf("%s: submit %d: %v", policy, i, err)
			}
			chans = append(chans, ch)
		}
		close(queued)
		for _, ch := range chans {
			r := collect(t, ch)
			if r.err != nil || r.usage.CompletionTokens != gen {
				t.Fatalf("%s: %+v", policy, r)
			}
		}
		return int(peak.Load())
	}
	if got := maxBusy(elasticcache.Elastic, 0.5); got != 4 {
		t.Errorf("budget 0.5: at most %d conversations ran at once, want 4", got)
	}
	if got := maxBusy(elasticcache.Full, 1); got != 2 {
		t.Errorf("full: at most %d conversations ran at once, want 2 (the others wait)", got)
	}
}

// A failure or a panic while the engine works on one request (while its prompt is
// encoded, or while it generates) fails only that request: the other finishes, the
// engine keeps serving, and nothing leaks. A panic is reported as an internal error.
func TestFaultInOneRequestFailsOnlyThatRequest(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy elasticcache.Policy
		step   int // the bad request's step that fails: 1 is its first prompt batch
		panics bool
	}{
		{"error/elastic/decode", elasticcache.Elastic, 5, false},
		{"panic/elastic/prompt", elasticcache.Elastic, 1, true},
		{"panic/elastic/decode", elasticcache.Elastic, 4, true},
		{"panic/h2o/prompt", elasticcache.H2O, 1, true},
		{"panic/h2o/decode", elasticcache.H2O, 4, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEngine(t, Options{Parallel: 2})
			steps := map[string]int{} // the fault runs on the decode loop only
			fault := func(id string) error {
				steps[id]++
				if id != "bad" || steps[id] != tc.step {
					return nil
				}
				if tc.panics {
					panic("injected panic")
				}
				return fmt.Errorf("injected failure")
			}
			e.onFault.Store(&fault)
			bad, err := e.Submit(context.Background(), greedyReq("bad", "one", 20, cfg(tc.policy, 0.5)))
			if err != nil {
				t.Fatal(err)
			}
			good, err := e.Submit(context.Background(), greedyReq("good", "two", 20, cfg(tc.policy, 0.5)))
			if err != nil {
				t.Fatal(err)
			}
			r := collect(t, bad)
			var ie *completion.InternalError
			if r.err == nil || !strings.Contains(r.err.Error(), "injected") || tc.panics != errors.As(r.err, &ie) {
				t.Fatalf("bad request: %+v", r)
			}
			if tc.panics && ie.RequestID != "bad" {
				t.Fatalf("internal error names request %q", ie.RequestID)
			}
			if r := collect(t, good); r.err != nil || r.usage.CompletionTokens != 20 {
				t.Fatalf("good request: %+v", r)
			}
			if r := run(t, e, greedyReq("after", "three", 5, cfg(elasticcache.Full, 1))); r.usage.CompletionTokens != 5 {
				t.Fatalf("after: %+v", r)
			}
			if st := e.Stats(); st.SlotsBusy != 0 || st.KVCellsUsed != 0 {
				t.Fatalf("leaked: %+v", st)
			}
			if e.ctx.SeqPosMax(0) != -1 || e.ctx.SeqPosMax(1) != -1 {
				t.Fatal("cells of a finished sequence remain")
			}
		})
	}
}

// Each runtime invariant of the KV hook, broken on purpose right before the prompt
// plan, fails that request with an internal error naming it, is counted, and leaves
// the engine serving.
func TestBrokenKVInvariantFailsTheRequest(t *testing.T) {
	for _, tc := range []struct {
		name, what string
		corrupt    func(c *seqCache)
	}{
		// A silent all-zero capture would otherwise rank every entry the same.
		{"all-zero capture", "column sums", func(c *seqCache) {
			for _, row := range c.scores {
				clear(row)
			}
		}},
		{"one layer off", "column sums", func(c *seqCache) { c.scores[1][3] += 2 }},
		{"a row missing", "captured rows", func(c *seqCache) { c.capturedRows-- }},
		{"two cells swapped", "cells read back", func(c *seqCache) { c.pos[1], c.pos[2] = c.pos[2], c.pos[1] }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEngine(t, Options{Parallel: 1})
			var broke atomic.Bool
			e.beforeCompress = func(c *seqCache) {
				if !broke.Swap(true) {
					tc.corrupt(c)
				}
			}
			ch, err := e.Submit(context.Background(), greedyReq("broken", longPrompt, 8, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1)))
			if err != nil {
				t.Fatal(err)
			}
			r := collect(t, ch)
			var ie *completion.InternalError
			var inv *InvariantError
			if !errors.As(r.err, &ie) || !errors.As(r.err, &inv) || inv.What != tc.what {
				t.Fatalf("got %v, want an internal error for the %q invariant", r.err, tc.what)
			}
			if n := e.Stats().KVInvariantFailures; n != 1 {
				t.Fatalf("%d invariant failures counted, want 1", n)
			}
			// The same request, untouched, passes every check.
			if r := run(t, e, greedyReq("next", longPrompt, 8, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1))); r.kv.Kept >= r.kv.PromptEntries {
				t.Fatalf("next request was not compressed: %+v", r.kv)
			}
		})
	}
}

// Under the published code's rules the kept prompt cells are relabelled 0..K-1 and
// generation continues right after them; the cache stays within its bound.
func TestReferenceSelectionCompactsPositions(t *testing.T) {
	e := startEngine(t, Options{Parallel: 1})
	var afterPlan, last [2]int // held, largest position
	check := func(o Observation) {
		if o.RequestID != "ref" {
			return
		}
		got := [2]int{o.Held, e.ctx.SeqPosMax(o.Slot)}
		if o.Prefill {
			afterPlan = got
		}
		last = got
	}
	e.onObserve.Store(&check)
	r := run(t, e, greedyReq("ref", longPrompt, 24, refCfg(elasticcache.Elastic, 0.5), testPNG(t, 1)))
	k := r.kv.Kept
	if n := r.kv.PromptEntries; k >= n || afterPlan != [2]int{k, k - 1} {
		t.Fatalf("after the plan: held %d, largest position %d; want %d cells at 0..%d (N=%d)", afterPlan[0], afterPlan[1], k, k-1, n)
	}
	if want := k - 1 + r.usage.CompletionTokens - 1; last[1] != want {
		t.Fatalf("largest position after generating %d tokens is %d, want %d", r.usage.CompletionTokens, last[1], want)
	}
	// The published code keeps one entry fewer than the paper's ceil(b*N).
	paper := run(t, e, greedyReq("paper", longPrompt, 24, cfg(elasticcache.Elastic, 0.5), testPNG(t, 1)))
	if paper.kv.Kept != k+1 {
		t.Fatalf("paper rule kept %d entries, reference %d; want one more", paper.kv.Kept, k)
	}
}

// h2o sequences decode in one shared batch, their attention read from it per
// sequence (on a unified cache a query row attends only its own cells; with a
// stream per sequence the capture sums each stream apart): the answers and the
// evictions are those of each sequence decoded alone.
func TestH2OInASharedBatchMatchesAlone(t *testing.T) {
	reqs := []*completion.Request{
		greedyReq("h1", longPrompt, 40, cfg(elasticcache.H2O, 0.5), testPNG(t, 1)),
		greedyReq("h2", "Tell me about squares and circles. "+longPrompt, 40, cfg(elasticcache.H2O, 0.4)),
		greedyReq("h3", "What is there?", 40, cfg(elasticcache.H2O, 0.6), testPNG(t, 3)),
		greedyReq("e", longPrompt+" Again.", 40, cfg(elasticcache.Elastic, 0.5)),
	}
	type outcome struct {
		text    string
		evicted []int
	}
	evictions := func(te *testEngine, id string) []int {
		var out []int
		for _, o := range te.observations(id) {
			if !o.Prefill {
				out = append(out, o.Evicted)
			}
		}
		return out
	}
	alone := make([]outcome, len(reqs))
	{
		e := startEngine(t, Options{Parallel: 1, CtxSize: 2048, Unified: true})
		for i, r := range reqs {
			alone[i] = outcome{run(t, e, r).text, evictions(e, r.ID)}
		}
	}
	for _, unified := range []bool{true, false} {
		t.Run(fmt.Sprintf("unified=%v", unified), func(t *testing.T) {
			e := startEngine(t, Options{Parallel: 4, CtxSize: 4 * 2048, Unified: unified})
			for i, r := range runTogether(t, e, reqs) {
				got := outcome{r.text, evictions(e, reqs[i].ID)}
				if got.text != alone[i].text || !slices.Equal(got.evicted, alone[i].evicted) {
					t.Errorf("%s: shared batch %q evicting %v, alone %q evicting %v", reqs[i].ID, got.text, got.evicted, alone[i].text, alone[i].evicted)
				}
			}
			if w := e.widestDecodeCall.Load(); w < 2 {
				t.Errorf("the widest decode call carried %d sequences; the h2o sequences never shared one", w)
			}
		})
	}
}

// runTogether submits reqs at once and returns their results in order.
func runTogether(t *testing.T, e *testEngine, reqs []*completion.Request) []result {
	t.Helper()
	chans := make([]<-chan completion.Event, len(reqs))
	for i, r := range reqs {
		ch, err := e.Submit(context.Background(), r)
		if err != nil {
			t.Fatal(err)
		}
		chans[i] = ch
	}
	out := make([]result, len(reqs))
	for i, ch := range chans {
		if out[i] = collect(t, ch); out[i].err != nil {
			t.Fatal(out[i].err)
		}
	}
	return out
}
