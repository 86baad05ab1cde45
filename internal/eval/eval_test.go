package eval

import (
	"context"
	"encoding/csv"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/report"
	"github.com/elasticserve/elasticserve/internal/eval/shapes"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// These tests run the real engine on the tiny random-weight test model (no
// mocks). One thread keeps them steady on a loaded 2-core machine.

var allPolicies = []elasticcache.Policy{elasticcache.Elastic, elasticcache.H2O, elasticcache.Local}

func openRunner(t *testing.T, budgets []float64) *Runner {
	t.Helper()
	mp, vp, err := testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	r, err := Open(Options{Model: mp, MMProj: vp, Threads: 1, Policies: allPolicies, Budgets: budgets,
		Sink: elasticcache.DefaultSink, Distance: elasticcache.DefaultDistance, MaxTokens: 6, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

func synthData(t *testing.T, n int, kinds ...shapes.QAKind) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := dataset.WriteSynthetic(dataset.SynthOptions{Dir: dir, N: n, Seed: 5, Shapes: shapes.DefaultOptions(), Kinds: kinds}); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "data.json")
}

// PPL under full is exp(total NLL / total tokens) of the engine's forced
// decoding, each sample's NLL equals a direct llama.cpp decode loop's, and at
// budget 1.0 every policy gives full's PPL.
func TestPPLMatchesDirectDecodeLoopAndBudgetOne(t *testing.T) {
	start := time.Now()
	r := openRunner(t, []float64{1})
	set, err := dataset.Load(synthData(t, 1, shapes.Describe, shapes.ColorOf), "")
	if err != nil || len(set.Samples) != 2 {
		t.Fatalf("%v %+v", err, set)
	}
	q, err := r.PPL(context.Background(), set.Samples)
	if err != nil {
		t.Fatal(err)
	}
	if len(q.Samples) != 2 || len(q.Skipped) != 0 || len(q.Rows) != 1+len(allPolicies) {
		t.Fatalf("samples %d, skipped %v, rows %d", len(q.Samples), q.Skipped, len(q.Rows))
	}
	var nll float64
	var toks int
	for _, s := range q.Samples {
		want := directNLL(t, r, s.Sample)
		if got := s.NLL[0]; math.Abs(got-want) > 1e-4*math.Abs(want) {
			t.Errorf("%s: engine NLL %.6f, direct loop %.6f", s.Sample.ID, got, want)
		}
		nll += s.NLL[0]
		toks += s.Tokens
	}
	full := q.Rows[0]
	if full.Policy != "full" || full.Tokens != toks || full.PPL != math.Exp(nll/float64(toks)) {
		t.Fatalf("full row %+v, want PPL exp(%g/%d)", full, nll, toks)
	}
	t.Logf("full PPL %.4f over %d tokens", full.PPL, toks)
	for _, rw := range q.Rows[1:] {
		if rw.Budget != 1 || rw.PPL != full.PPL || rw.NLL != full.NLL {
			t.Errorf("%s@%g: PPL %.10g, full %.10g", rw.Policy, rw.Budget, rw.PPL, full.PPL)
		}
	}
	t.Logf("took %s", time.Since(start))
}

// directNLL scores the sample's answer with a plain llama.cpp context: the same
// chat template and prompt chunks as the engine, then one token per decode.
func directNLL(t *testing.T, r *Runner, s dataset.Sample) float64 {
	t.Helper()
	m, v := r.Model(), r.Vision()
	ctx, err := llama.NewContext(m, llama.ContextParams{NCtx: 1024, NBatch: 512, NSeqMax: 1, Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Close()
	text, err := m.ApplyChatTemplate("", []llama.ChatMessage{{Role: "user", Content: strings.Replace(s.Prompt, dataset.ImageToken, llama.MediaMarker(), 1)}}, true)
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(s.Image)
	if err != nil {
		t.Fatal(err)
	}
	p, err := v.Tokenize(text, [][]byte{img}, true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	pos := 0
	var logits []float32
	for i, ch := range p.Chunks {
		last := i == len(p.Chunks)-1
		var b *llama.Batch
		switch ch.Kind {
		case llama.ChunkText:
			b = llama.NewBatch(ch.NTokens, 0, 1)
			for j, tok := range ch.Tokens {
				b.Add(tok, pos+j, 0, last && j == ch.NTokens-1)
			}
		case llama.ChunkImage:
			embd, err := p.EncodeImage(ch)
			if err != nil {
				t.Fatal(err)
			}
			w := v.EmbdSize()
			b = llama.NewBatch(ch.NTokens, w, 1)
			for j := range ch.NTokens {
				b.AddEmbd(embd[j*w:(j+1)*w], pos+j, 0, last && j == ch.NTokens-1)
			}
			ctx.SetCausal(!v.NonCausal())
		}
		err := ctx.Decode(b)
		ctx.SetCausal(true)
		b.Close()
		if err != nil {
			t.Fatal(err)
		}
		if last {
			logits = slices.Clone(ctx.Logits(ch.NTokens - 1))
		}
		pos += ch.NTokens
	}
	answer, err := m.Tokenize(s.Answer, false, false)
	if err != nil || len(answer) == 0 {
		t.Fatalf("answer tokens %v: %v", answer, err)
	}
	nll := engine.NegLogProb(logits, answer[0])
	b := llama.NewBatch(1, 0, 1)
	defer b.Close()
	for i := 1; i < len(answer); i++ {
		b.Clear()
		b.Add(answer[i-1], pos, 0, true)
		pos++
		if err := ctx.Decode(b); err != nil {
			t.Fatal(err)
		}
		nll += engine.NegLogProb(ctx.Logits(0), answer[i])
	}
	return nll
}

// A sweep over 4 synthetic samples (plus a broken entry and a missing image,
// which are skipped and counted) writes a CSV, a markdown table and PNG plots
// that parse.
func TestSweepWritesParsableFiles(t *testing.T) {
	start := time.Now()
	r := openRunner(t, []float64{0.5})
	data := synthData(t, 1)
	// Add a malformed entry and one whose image is missing.
	b, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	extra := `{"id": "broken", "conversations": [{"from": "human", "value": "no answer"}]},
	{"id": "lost", "image": "images/none.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]},`
	if err := os.WriteFile(data, []byte("["+extra+string(b[1:])), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "out")
	var progress strings.Builder
	r.opts.Progress = &progress
	res, err := r.Run(context.Background(), RunOptions{
		Metrics:    []string{report.Latency, report.PPL, report.ROUGE},
		Data:       data,
		MaxSamples: 4,
		Latency:    LatencyOptions{PromptTokens: 220, GenTokens: 8, Batch: 2},
		Out:        out,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Dataset.Skipped) != 2 || len(res.Samples) != 4 {
		t.Fatalf("skipped %v, samples %d", res.Dataset.Skipped, len(res.Samples))
	}
	for _, want := range []string{`skipping id "broken" (entry 0): malformed entry`, `skipping id "lost" (entry 1): image`} {
		if !strings.Contains(progress.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, progress.String())
		}
	}
	nCfg := 1 + len(allPolicies)
	// ppl, rouge and latency over all samples, then ppl and rouge over the
	// long answers and the short ones: 1 description and 3 short answers.
	if len(res.Results.Rows) != 3*nCfg+2*2*nCfg {
		t.Fatalf("%d rows", len(res.Results.Rows))
	}
	for i, rw := range res.Results.Rows[3*nCfg:] {
		metric, kind, n, accN := report.PPL, report.KindLong, 1, 0
		if i/(2*nCfg) == 1 {
			metric = report.ROUGE
		}
		if i%(2*nCfg) >= nCfg {
			kind, n, accN = report.KindShort, 3, 3
		}
		if rw.Metric != metric || rw.Kind != kind || rw.Samples != n {
			t.Errorf("row %d: %s %s %d samples; want %s %s %d", 3*nCfg+i, rw.Metric, rw.Kind, rw.Samples, metric, kind, n)
		}
		if rw.Metric == report.ROUGE && rw.AccN != accN {
			t.Errorf("row %d (%s): accuracy on %d samples", 3*nCfg+i, kind, rw.AccN)
		}
	}
	if !slices.Contains(res.Results.Notes, "ppl: also reported apart: 1 long-answer samples (descriptions: PPL, ROUGE) and 3 short-answer samples (accuracy)") ||
		!slices.Contains(res.Results.Notes, "protocol default: layout as-is, no system prompt, sink 4") {
		t.Errorf("notes %q", res.Results.Notes)
	}
	if res.Latency.PromptTokens > 220 || res.Latency.PromptTokens < 200 {
		t.Errorf("latency prompt is %d tokens, want about 220", res.Latency.PromptTokens)
	}
	for _, rw := range res.Results.Rows[:3*nCfg] {
		switch rw.Metric {
		case report.PPL:
			if rw.Samples != 4 || !(rw.PPL > 1) || math.IsInf(rw.PPL, 0) {
				t.Errorf("ppl row %+v", rw)
			}
		case report.ROUGE:
			if rw.Policy == "full" && (rw.ROUGE1 != 1 || rw.ROUGEL != 1) {
				t.Errorf("full against itself: %+v", rw)
			}
			if rw.AccN != 3 { // the 4 samples drawn with seed 1 are 1 description and 3 short answers
				t.Errorf("%s@%g: accuracy scored on %d samples, want 3", rw.Policy, rw.Budget, rw.AccN)
			}
		case report.Latency:
			if rw.Batch != 2 || rw.GenTokens != 8 || rw.TotalMs <= 0 || rw.PeakCells <= 0 || rw.Speedup <= 0 {
				t.Errorf("latency row %+v", rw)
			}
			if rw.Policy != "full" && rw.PeakCells >= res.Results.Rows[2*nCfg].PeakCells {
				t.Errorf("%s@%g holds %g cells at its peak, full %g", rw.Policy, rw.Budget, rw.PeakCells, res.Results.Rows[2*nCfg].PeakCells)
			}
		}
	}

	f, err := os.Open(filepath.Join(out, "results.csv"))
	if err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(f).ReadAll()
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1+3*nCfg+4*nCfg || !slices.Equal(recs[0], report.CSVHeader()) {
		t.Fatalf("csv: %d records, header %v", len(recs), recs[0])
	}
	kind := slices.Index(recs[0], "kind")
	if kind != len(recs[0])-1 || recs[1][kind] != "all" || recs[2*nCfg+1][kind] != "" || recs[3*nCfg+1][kind] != "long" || recs[4*nCfg+1][kind] != "short" {
		t.Errorf("csv kind column %d: %q %q %q %q", kind, recs[1][kind], recs[2*nCfg+1][kind], recs[3*nCfg+1][kind], recs[4*nCfg+1][kind])
	}
	ppl := slices.Index(recs[0], "ppl")
	if v, err := strconv.ParseFloat(recs[1][ppl], 64); err != nil || v != res.PPL.Rows[0].PPL {
		t.Errorf("csv ppl %q, want %g", recs[1][ppl], res.PPL.Rows[0].PPL)
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| policy | budget | n | PPL |", "| elastic | 0.5 | 4 |", "ROUGE-L", "speedup", "2 skipped while loading",
		"### Long answers (descriptions)", "| elastic | 0.5 | 1 |", "### Short exact answers", "| elastic | 0.5 | 3 |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q", want)
		}
	}
	nPNG := 0
	for _, p := range res.Files {
		if filepath.Ext(p) != ".png" {
			continue
		}
		nPNG++
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := png.Decode(f); err != nil {
			t.Errorf("%s: %v", p, err)
		}
		f.Close()
	}
	if nPNG < 8 {
		t.Errorf("%d plots: %v", nPNG, res.Files)
	}
	t.Logf("took %s\n%s", time.Since(start), res.Results.Markdown())
}

// A sample whose prompt cannot fit is skipped for every policy, named, and the
// run goes on.
func TestOversizedSampleIsSkippedEverywhere(t *testing.T) {
	r := openRunner(t, []float64{0.5})
	r.opts.CtxSize = 200 // one sequence of 200 cells: the 144-token image fits, a long question does not
	set, err := dataset.Load(synthData(t, 1, shapes.Count, shapes.Exists), "")
	if err != nil {
		t.Fatal(err)
	}
	long := set.Samples[1]
	long.ID = "too-long"
	long.Prompt += strings.Repeat(" more words", 30)
	samples := []dataset.Sample{set.Samples[0], long}
	var progress strings.Builder
	r.opts.Progress = &progress
	q, err := r.ROUGE(context.Background(), samples)
	if err != nil {
		t.Fatal(err)
	}
	if len(q.Samples) != 1 || len(q.Skipped) != 1 || !strings.Contains(q.Skipped[0], `id "too-long"`) {
		t.Fatalf("scored %d, skipped %v", len(q.Samples), q.Skipped)
	}
	if !strings.Contains(progress.String(), `skipping id "too-long"`) {
		t.Errorf("no message on stderr:\n%s", progress.String())
	}
	for _, rw := range q.Rows {
		if rw.Samples != 1 {
			t.Errorf("%s@%g scored %d samples", rw.Policy, rw.Budget, rw.Samples)
		}
	}
}

// The layout reorders a prompt's parts (the text kept as it is) and the system
// prompt comes first; the engine renders the question before the image with
// question-first.
func TestLayoutOrdersParts(t *testing.T) {
	img := []byte("png")
	kinds := func(msgs []completion.Message) string {
		var s []string
		for _, m := range msgs {
			for _, p := range m.Parts {
				if p.Kind == completion.PartImage {
					s = append(s, m.Role+":image")
				} else {
					s = append(s, m.Role+":"+p.Text)
				}
			}
		}
		return strings.Join(s, " | ")
	}
	for _, c := range []struct {
		layout, system, prompt, want string
	}{
		{"", "", "<image>\nWhat color is the circle?", "user:image | user:What color is the circle?"},
		{LayoutAsIs, "", "Q?\n<image>", "user:Q? | user:image"},
		{LayoutQuestionFirst, "", "<image>\nWhat color is the circle?", "user:What color is the circle? | user:image"},
		{LayoutQuestionFirst, "", "Look.\n<image>\nWhat color?", "user:Look. | user:What color? | user:image"},
		{LayoutImageFirst, "", "Q?\n<image>", "user:image | user:Q?"},
		{LayoutImageFirst, "", "<image>\nQ?", "user:image | user:Q?"},
		{LayoutQuestionFirst, "Be nice.", "<image>\nQ?", "system:Be nice. | user:Q? | user:image"},
	} {
		r := &Runner{opts: Options{Layout: c.layout, System: c.system}}
		msgs, err := r.messages(c.prompt, [][]byte{img})
		if err != nil {
			t.Fatal(err)
		}
		if got := kinds(msgs); got != c.want {
			t.Errorf("layout %q, prompt %q: parts %q, want %q", c.layout, c.prompt, got, c.want)
		}
	}
	if err := (&Options{Layout: "sideways"}).defaults(); err == nil || !strings.Contains(err.Error(), `"sideways"`) {
		t.Errorf("unknown layout: %v", err)
	}

	// Through the engine's prompt builder on the test model's chat template.
	r := openRunner(t, []float64{0.5})
	r.opts.Layout, r.opts.System = LayoutQuestionFirst, LLaVASystem
	set, err := dataset.Load(synthData(t, 1, shapes.ColorOf), "")
	if err != nil {
		t.Fatal(err)
	}
	s := set.Samples[0]
	if !strings.HasPrefix(s.Prompt, dataset.ImageToken+"\n") {
		t.Fatalf("the synthetic prompt %q does not start with the image", s.Prompt)
	}
	imgs, err := readImage(s.Image)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := r.messages(s.Prompt, imgs)
	if err != nil {
		t.Fatal(err)
	}
	text, _, err := engine.RenderPrompt(r.Model(), msgs)
	if err != nil {
		t.Fatal(err)
	}
	question := strings.TrimPrefix(s.Prompt, dataset.ImageToken+"\n")
	sys, q, m := strings.Index(text, LLaVASystem), strings.Index(text, question+"\n"+llama.MediaMarker()), strings.Index(text, llama.MediaMarker())
	if sys < 0 || q < 0 || !(sys < q && q < m) {
		t.Errorf("rendered prompt (system at %d, question at %d, image at %d):\n%s", sys, q, m, text)
	}
}

// Long and short answers are aggregated apart, each over its own samples,
// after the rows of all samples; the groups add up to all.
func TestSplitRowsLongAndShort(t *testing.T) {
	cfgs := []elasticcache.Spec{
		elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.Full, Budget: 1, Sink: 4, Distance: -25}),
		elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.Elastic, Budget: 0.5, Sink: 4, Distance: -25}),
	}
	mk := func(kind, answer string, nll float64, toks int, text string) SampleResult {
		return SampleResult{Sample: dataset.Sample{Kind: kind, Answer: answer}, Tokens: toks,
			NLL: []float64{nll, 2 * nll}, Text: []string{text, text + " more"}, KV: make([]*completion.KVReport, 2), Peak: []int{10, 5}}
	}
	samples := []SampleResult{
		mk("describe", "There is a red circle at the top left.", 3, 10, "a red circle"),
		mk("color", "red", 1, 2, "red"),
		mk("count", "two", 1, 2, "three"),
		mk("", "A long answer without a kind here.", 2, 8, "long"), // no kind, more than 3 words: long
		mk("", "blue", 1, 1, "blue"),                               // no kind, 1 word: short
	}
	for _, metric := range []string{report.PPL, report.ROUGE} {
		all := aggregate(metric, cfgs, samples)
		split := splitRows(metric, cfgs, samples)
		if len(split) != 2*len(cfgs) {
			t.Fatalf("%s: %d split rows", metric, len(split))
		}
		for i, rw := range split {
			kind, n, acc := report.KindLong, 2, 0
			if i >= len(cfgs) {
				kind, n, acc = report.KindShort, 3, 3
			}
			if rw.Kind != kind || rw.Samples != n || rw.Policy != string(cfgs[i%len(cfgs)].Policy()) {
				t.Errorf("%s row %d: kind %q, %d samples, policy %s; want %q, %d", metric, i, rw.Kind, rw.Samples, rw.Policy, kind, n)
			}
			if metric == report.ROUGE && rw.AccN != acc {
				t.Errorf("rouge %s row: accuracy on %d samples, want %d", kind, rw.AccN, acc)
			}
		}
		for ci := range cfgs {
			l, s, a := split[ci], split[len(cfgs)+ci], all[ci]
			if a.Kind != "" || a.Samples != 5 {
				t.Errorf("%s all row %+v", metric, a)
			}
			if metric == report.PPL && (l.Tokens+s.Tokens != a.Tokens || math.Abs(l.NLL+s.NLL-a.NLL) > 1e-12) {
				t.Errorf("ppl: long %d tokens %g NLL + short %d %g != all %d %g", l.Tokens, l.NLL, s.Tokens, s.NLL, a.Tokens, a.NLL)
			}
			if metric == report.ROUGE && math.Abs(l.ROUGEL*2+s.ROUGEL*3-a.ROUGEL*5) > 1e-9 {
				t.Errorf("rouge-L means: long %g, short %g, all %g", l.ROUGEL, s.ROUGEL, a.ROUGEL)
			}
		}
		if metric == report.ROUGE && (split[len(cfgs)].Accuracy != 2.0/3 || all[0].Accuracy != 2.0/3) {
			t.Errorf("full accuracy: short %g, all %g; want 2/3", split[len(cfgs)].Accuracy, all[0].Accuracy)
		}
		// One kind only: no split.
		if rows := splitRows(metric, cfgs, samples[1:3]); rows != nil {
			t.Errorf("%s: split rows for short answers only: %+v", metric, rows)
		}
	}
}

// The evict-merged ablation keeps elastic's anchors and evicts instead of merging:
// its rows report no merged entries and as many evicted as the merge would average.
func TestEvictMergedAblation(t *testing.T) {
	r := openRunner(t, []float64{0.5})
	r.opts.Policies = []elasticcache.Policy{elasticcache.Elastic}
	data := synthData(t, 2, shapes.ColorOf)
	run := func(evict bool) report.Row {
		r.opts.EvictMerged = evict
		res, err := r.Run(context.Background(), RunOptions{Metrics: []string{report.ROUGE}, Data: data})
		if err != nil {
			t.Fatal(err)
		}
		return res.Results.Rows[1] // full, then elastic@0.5
	}
	merged, evicted := run(false), run(true)
	if merged.Kept != evicted.Kept || merged.Merged == 0 || evicted.Merged != 0 || evicted.Evicted < merged.Merged {
		t.Fatalf("merge: kept %g merged %g; ablation: kept %g merged %g evicted %g",
			merged.Kept, merged.Merged, evicted.Kept, evicted.Merged, evicted.Evicted)
	}
}
