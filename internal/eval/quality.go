package eval

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/answer"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/progress"
	"github.com/elasticserve/elasticserve/internal/eval/report"
	"github.com/elasticserve/elasticserve/internal/eval/rouge"
	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

// SampleResult is one sample's outcome under every configuration; slices are
// indexed like Quality.Configs.
type SampleResult struct {
	Sample dataset.Sample
	Tokens int       // ppl: reference answer tokens scored
	NLL    []float64 // ppl: summed negative log-likelihood of the answer
	Text   []string  // rouge: the greedy generation
	KV     []*completion.KVReport
	Peak   []int // largest number of cells the sequence held after a cache step
}

// Quality is the outcome of a ppl or rouge run.
type Quality struct {
	Metric  string
	Configs []elasticcache.Spec
	Samples []SampleResult // samples scored under every configuration, in input order
	Skipped []string       // one message per sample left out
	Rows    []report.Row   // one per configuration, over all samples (Kind "all")
	// KindRows split the samples by answer length when both kinds are present:
	// one row per configuration over the long-answer samples (Kind "long"),
	// then one per configuration over the short-answer ones (Kind "short").
	// See LongAnswer. Empty when every sample is of one kind.
	KindRows []report.Row
}

// PPL scores each sample's reference answer under teacher forcing: the prompt
// is encoded, the prefill plan applied, then the answer tokens are fed one by
// one with the decode policy applied after every token. A configuration's
// perplexity is exp(sum of NLL / sum of answer tokens) over the scored samples.
func (r *Runner) PPL(ctx context.Context, samples []dataset.Sample) (*Quality, error) {
	return r.quality(ctx, report.PPL, samples, r.pplSample)
}

// ROUGE generates greedily (Options.MaxTokens tokens) under full, then under
// every policy and budget, and scores each generation against full's with
// ROUGE-1/2/L F1. Samples with a short exact answer (see ShortAnswer) are also
// scored for accuracy with answer.Correct, full included.
func (r *Runner) ROUGE(ctx context.Context, samples []dataset.Sample) (*Quality, error) {
	return r.quality(ctx, report.ROUGE, samples, r.rougeSample)
}

// ShortAnswer reports whether a sample is scored for accuracy: its kind is one
// of the synthetic set's exact-answer kinds (color, count, position, exists),
// or it has no kind and its answer is 1 to 3 words (answer.Short).
func ShortAnswer(s dataset.Sample) bool {
	if s.Kind != "" {
		k := shapes.QAKind(s.Kind)
		return slices.Contains(shapes.QAKinds, k) && k.Short()
	}
	return answer.Short(s.Answer)
}

// LongAnswer reports whether a sample belongs to the long-answer rows
// (report.KindLong): every sample that is not scored for accuracy
// (!ShortAnswer), i.e. the synthetic set's descriptions, or, without a kind,
// answers of more than 3 words. The others make the short-answer rows.
func LongAnswer(s dataset.Sample) bool { return !ShortAnswer(s) }

type sampleFunc func(ctx context.Context, e *engine.Engine, s dataset.Sample, cfgs []elasticcache.Spec, bar *progress.Bar) (SampleResult, error)

// skip builds a sample-level error. Every error of a sample's requests leaves the
// sample out and the run goes on, except the context ending or the engine
// shutting down, which end the run.
func skip(format string, args ...any) error { return fmt.Errorf(format, args...) }

func (r *Runner) quality(ctx context.Context, metric string, samples []dataset.Sample, one sampleFunc) (*Quality, error) {
	if r.vision == nil && slices.ContainsFunc(samples, func(s dataset.Sample) bool { return s.Image != "" }) {
		return nil, errors.New("the dataset has images but no projector was loaded (pass --mmproj)")
	}
	cfgs := r.Configs()
	q := &Quality{Metric: metric, Configs: cfgs}
	e, stop, err := r.startEngine(r.opts.Parallel, r.opts.CtxSize)
	if err != nil {
		return nil, err
	}
	defer stop()

	bar := progress.New(r.opts.Progress, metric, len(samples)*len(cfgs))
	defer bar.Finish()
	results := make([]*SampleResult, len(samples))
	skipped := make([]string, len(samples))
	var fatal error
	var mu sync.Mutex
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range min(r.opts.Parallel, max(len(samples), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				s := samples[i]
				res, err := one(ctx, e, s, cfgs, bar)
				switch {
				case err == nil:
					results[i] = &res
				case ctx.Err() != nil || errors.Is(err, completion.ErrShuttingDown):
					mu.Lock()
					fatal = cmp.Or(ctx.Err(), fmt.Errorf("%s: %w", s.Name(), err))
					mu.Unlock()
				default:
					skipped[i] = fmt.Sprintf("skipping %s: %v", s.Name(), err)
					bar.Printf("elastic-eval: %s: %s", metric, skipped[i])
					done := len(res.KV)
					bar.Add(len(cfgs) - done)
				}
			}
		}()
	}
feed:
	for i := range samples {
		mu.Lock()
		stopNow := fatal != nil
		mu.Unlock()
		if stopNow {
			break
		}
		select {
		case jobs <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if fatal == nil && ctx.Err() != nil {
		fatal = ctx.Err()
	}
	if fatal != nil {
		return nil, fatal
	}
	for i, res := range results {
		if res != nil {
			q.Samples = append(q.Samples, *res)
		} else if skipped[i] != "" {
			q.Skipped = append(q.Skipped, skipped[i])
		}
	}
	q.Rows = aggregate(metric, cfgs, q.Samples)
	q.KindRows = splitRows(metric, cfgs, q.Samples)
	return q, nil
}

func (r *Runner) pplSample(ctx context.Context, e *engine.Engine, s dataset.Sample, cfgs []elasticcache.Spec, bar *progress.Bar) (SampleResult, error) {
	res := SampleResult{Sample: s}
	msgs, err := r.sampleMessages(s)
	if err != nil {
		return res, err
	}
	toks, err := r.model.Tokenize(s.Answer, false, false)
	if err != nil {
		return res, skip("tokenize the answer: %v", err)
	}
	if len(toks) == 0 {
		return res, skip("the answer has no tokens")
	}
	force := make([]int32, len(toks))
	for i, t := range toks {
		force[i] = int32(t)
	}
	res.Tokens = len(force)
	for ci, c := range cfgs {
		req := &completion.Request{
			ID:       fmt.Sprintf("ppl-%d-%d", s.Index, ci),
			Messages: msgs,
			Sampling: greedy(r.opts.Seed),
			Force:    force,
			Cache:    c,
		}
		out, err := e.Complete(ctx, req)
		peak := r.watch.finished(req.ID)
		if err != nil {
			return res, fmt.Errorf("%s: %w", configName(c), err)
		}
		if out.Final.NLLTokens != len(force) {
			return res, skip("%s: only %d of the %d answer tokens fit in a sequence of %d cells (raise --ctx-size)",
				configName(c), out.Final.NLLTokens, len(force), e.SeqCells())
		}
		res.NLL = append(res.NLL, out.Final.NLL)
		res.KV = append(res.KV, out.Final.KV)
		res.Peak = append(res.Peak, peak)
		bar.Add(1)
	}
	return res, nil
}

func (r *Runner) rougeSample(ctx context.Context, e *engine.Engine, s dataset.Sample, cfgs []elasticcache.Spec, bar *progress.Bar) (SampleResult, error) {
	res := SampleResult{Sample: s}
	msgs, err := r.sampleMessages(s)
	if err != nil {
		return res, err
	}
	for ci, c := range cfgs {
		req := &completion.Request{
			ID:        fmt.Sprintf("rouge-%d-%d", s.Index, ci),
			Messages:  msgs,
			MaxTokens: r.opts.MaxTokens,
			Sampling:  greedy(r.opts.Seed),
			Cache:     c,
		}
		out, err := e.Complete(ctx, req)
		peak := r.watch.finished(req.ID)
		if err != nil {
			return res, fmt.Errorf("%s: %w", configName(c), err)
		}
		res.Text = append(res.Text, out.Text)
		res.KV = append(res.KV, out.Final.KV)
		res.Peak = append(res.Peak, peak)
		bar.Add(1)
	}
	return res, nil
}

// aggregate turns per-sample results into one row per configuration.
func aggregate(metric string, cfgs []elasticcache.Spec, samples []SampleResult) []report.Row {
	rows := make([]report.Row, len(cfgs))
	n := float64(len(samples))
	for ci, c := range cfgs {
		rw := row(metric, c)
		rw.Samples = len(samples)
		accOK := 0
		for _, s := range samples {
			if kv := s.KV[ci]; kv != nil {
				rw.Kept += float64(kv.Kept)
				rw.Merged += float64(kv.Merged)
				rw.Evicted += float64(kv.Evicted)
			}
			rw.PeakCells += float64(s.Peak[ci])
			switch metric {
			case report.PPL:
				rw.NLL += s.NLL[ci]
				rw.Tokens += s.Tokens
			case report.ROUGE:
				sc := rouge.Compute(s.Text[0], s.Text[ci])
				rw.ROUGE1 += sc.R1.F1
				rw.ROUGE2 += sc.R2.F1
				rw.ROUGEL += sc.RL.F1
				if ShortAnswer(s.Sample) {
					rw.AccN++
					if answer.Correct(s.Text[ci], s.Sample.Answer) {
						accOK++
					}
				}
			}
		}
		if n > 0 {
			rw.Kept, rw.Merged, rw.Evicted, rw.PeakCells = rw.Kept/n, rw.Merged/n, rw.Evicted/n, rw.PeakCells/n
			rw.ROUGE1, rw.ROUGE2, rw.ROUGEL = rw.ROUGE1/n, rw.ROUGE2/n, rw.ROUGEL/n
		}
		if metric == report.PPL {
			rw.PPL = math.NaN()
			if rw.Tokens > 0 {
				rw.PPL = math.Exp(rw.NLL / float64(rw.Tokens))
			}
		}
		if rw.AccN > 0 {
			rw.Accuracy = float64(accOK) / float64(rw.AccN)
		}
		rows[ci] = rw
	}
	return rows
}

// splitRows aggregates the long-answer samples and the short-answer samples
// separately (rows of Kind "long", then "short"), or returns nil when all
// samples are of one kind (the "all" rows are then that kind's).
func splitRows(metric string, cfgs []elasticcache.Spec, samples []SampleResult) []report.Row {
	var long, short []SampleResult
	for _, s := range samples {
		if LongAnswer(s.Sample) {
			long = append(long, s)
		} else {
			short = append(short, s)
		}
	}
	if len(long) == 0 || len(short) == 0 {
		return nil
	}
	var rows []report.Row
	for _, g := range []struct {
		kind    string
		samples []SampleResult
	}{{report.KindLong, long}, {report.KindShort, short}} {
		for _, rw := range aggregate(metric, cfgs, g.samples) {
			rw.Kind = g.kind
			rows = append(rows, rw)
		}
	}
	return rows
}

// tokenCount is the prompt length the engine will see for content and images.
func (r *Runner) tokenCount(content string, images [][]byte) (int, error) {
	msgs, err := r.messages(content, images)
	if err != nil {
		return 0, err
	}
	return engine.CountPrompt(r.model, r.vision, msgs)
}

// sampleMessages reads a sample's image and builds its chat; a failure is a skip
// (the sample is left out of every configuration).
func (r *Runner) sampleMessages(s dataset.Sample) ([]completion.Message, error) {
	imgs, err := readImage(s.Image)
	if err != nil {
		return nil, skip("%v", err)
	}
	msgs, err := r.messages(s.Prompt, imgs)
	if err != nil {
		return nil, skip("%v", err)
	}
	return msgs, nil
}
