package eval

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/progress"
	"github.com/elasticserve/elasticserve/internal/eval/report"
	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

// LatencyOptions shape the latency run (the paper's setting is the default).
type LatencyOptions struct {
	PromptTokens int // P: tokens of each prompt, image included (default 900)
	GenTokens    int // G: tokens generated per sequence (default 512)
	Batch        int // B: sequences run together (default 8)
	Repeat       int // runs per configuration; the run with the median total time is kept (default 1)
}

func (lo *LatencyOptions) defaults() {
	if lo.PromptTokens <= 0 {
		lo.PromptTokens = 900
	}
	if lo.GenTokens <= 0 {
		lo.GenTokens = 512
	}
	if lo.Batch <= 0 {
		lo.Batch = 8
	}
	if lo.Repeat <= 0 {
		lo.Repeat = 1
	}
}

// LatencyPad is the slack per sequence added to P+G when sizing the context.
const LatencyPad = 64

// LatencyResult is the outcome of a latency run.
type LatencyResult struct {
	Options      LatencyOptions
	PromptTokens int      // actual prompt length (at most Options.PromptTokens)
	CtxSize      int      // cells allocated: Batch * (P + G + LatencyPad)
	Notes        []string // warnings (e.g. a sequence that ended before G tokens)
	Rows         []report.Row
}

// Latency runs B sequences of a synthetic P-token prompt (one drawn picture
// per sequence, when the model has a projector, plus repeated descriptive
// text) generating G tokens each, greedily, under full and then every policy
// and budget, in one engine sized for full: B * (P + G + LatencyPad) cells.
//
// Reported per configuration: mean prefill (prompt encoding) and compress
// (prefill plan) time per sequence, mean decode time per sequence, the batched
// decode throughput (tokens decoded by all sequences between the end of the
// batch's last prompt encoding and the last decode step, over that time), the
// wall time from
// submitting the batch to its last token, the largest number of KV cells the
// sequences held together after any cache step, the mean attention span of a
// decode step (cells llama.cpp attends to, padded), and the speedup of the wall
// time over full's in the same run. The engine encodes one prompt at a time,
// interleaved with the decode steps of the sequences already generating.
func (r *Runner) Latency(ctx context.Context, lo LatencyOptions) (*LatencyResult, error) {
	lo.defaults()
	res := &LatencyResult{Options: lo}
	contents, images, n, err := r.latencyPrompts(lo.PromptTokens, lo.Batch)
	if err != nil {
		return nil, err
	}
	res.PromptTokens = n
	res.CtxSize = lo.Batch * (lo.PromptTokens + lo.GenTokens + LatencyPad)
	e, stop, err := r.startEngine(lo.Batch, res.CtxSize)
	if err != nil {
		return nil, err
	}
	defer stop()

	// Warm-up (threads, caches, allocator), not timed.
	msgs := make([][]completion.Message, len(contents))
	for i, c := range contents {
		if msgs[i], err = r.messages(c, images[i]); err != nil {
			return nil, err
		}
	}
	warm := &completion.Request{ID: "latency-warmup", Messages: msgs[0],
		MaxTokens: 4, Sampling: greedy(r.opts.Seed), Cache: r.Configs()[0]}
	if _, err := e.Complete(ctx, warm); err != nil {
		return nil, fmt.Errorf("latency warm-up: %w", err)
	}
	r.watch.finished(warm.ID)

	cfgs := r.Configs()
	bar := progress.New(r.opts.Progress, "latency", len(cfgs)*lo.Repeat)
	defer bar.Finish()
	for _, c := range cfgs {
		var runs []report.Row
		for rep := range lo.Repeat {
			rw, notes, err := r.latencyRun(ctx, e, c, rep, msgs, lo.GenTokens)
			if err != nil {
				return nil, fmt.Errorf("latency %s: %w", configName(c), err)
			}
			for _, n := range notes {
				if !slices.Contains(res.Notes, n) {
					res.Notes = append(res.Notes, n)
					bar.Printf("elastic-eval: latency: %s", n)
				}
			}
			runs = append(runs, rw)
			bar.Add(1)
		}
		slices.SortStableFunc(runs, func(a, b report.Row) int { return cmp.Compare(a.TotalMs, b.TotalMs) })
		res.Rows = append(res.Rows, runs[len(runs)/2])
	}
	if full := res.Rows[0]; full.TotalMs > 0 {
		for i := range res.Rows {
			if res.Rows[i].TotalMs > 0 {
				res.Rows[i].Speedup = full.TotalMs / res.Rows[i].TotalMs
			}
		}
	}
	return res, nil
}

func (r *Runner) latencyRun(ctx context.Context, e *engine.Engine, c elasticcache.Spec, rep int, msgs [][]completion.Message, gen int) (report.Row, []string, error) {
	b := len(msgs)
	outs := make([]completion.Result, b)
	errs := make([]error, b)
	r.watch.startWindow()
	start := time.Now()
	var wg sync.WaitGroup
	for i := range b {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := &completion.Request{
				ID:        fmt.Sprintf("latency-%s-%d-%d", configName(c), rep, i),
				Messages:  msgs[i],
				MaxTokens: gen,
				Sampling:  greedy(r.opts.Seed),
				Cache:     c,
			}
			outs[i], errs[i] = e.Complete(ctx, req)
			r.watch.finished(req.ID)
		}()
	}
	wg.Wait()
	total := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return report.Row{}, nil, err
	}
	rw := row(report.Latency, c)
	rw.Samples, rw.Batch = b, b
	rw.TotalMs = float64(total.Microseconds()) / 1000
	rw.PeakCells = float64(r.watch.totalPeak())
	rw.Attended = r.watch.meanAttended()
	if steps, span := r.watch.steadyDecode(); span > 0 {
		rw.DecodeTokS = float64(steps) / span.Seconds()
	}
	var notes []string
	nb := float64(b)
	for i, o := range outs {
		f := o.Final
		rw.PromptTokens += f.Usage.PromptTokens
		rw.GenTokens += float64(f.Usage.CompletionTokens) / nb
		if f.Usage.CompletionTokens < gen {
			notes = append(notes, fmt.Sprintf("%s: sequence %d stopped after %d of %d tokens (%s); its time covers fewer tokens",
				configName(c), i, f.Usage.CompletionTokens, gen, f.FinishReason))
		}
		if kv := f.KV; kv != nil {
			rw.PrefillMs += kv.PrefillMs / nb
			rw.CompressMs += kv.CompressMs / nb
			rw.DecodeMs += kv.DecodeMs / nb
			rw.Kept += float64(kv.Kept) / nb
			rw.Merged += float64(kv.Merged) / nb
			rw.Evicted += float64(kv.Evicted) / nb
		}
	}
	rw.PromptTokens /= b
	return rw, notes, nil
}

// latencyPrompts builds b prompts of at most p tokens each: picture i of the
// synthetic generator (when the model has a projector), then as many words of
// repeated descriptive text as fit, then an instruction. It returns the
// contents, their images and the token count of the first prompt.
func (r *Runner) latencyPrompts(p, b int) ([]string, [][][]byte, int, error) {
	const instruction = "Describe the image in detail."
	var text []string
	for _, s := range shapes.Generate(r.opts.Seed, 16) {
		text = append(text, s.QAs[0].Answer)
	}
	base := strings.Fields(strings.Join(text, " "))
	var words []string
	for len(words) < p {
		words = append(words, base...)
	}
	images := make([][][]byte, b)
	if r.vision != nil {
		o := shapes.DefaultOptions()
		o.IDPrefix = "latency"
		for i := range b {
			s, err := shapes.New(o, r.opts.Seed, 1000+i)
			if err != nil {
				return nil, nil, 0, err
			}
			png, err := s.PNG()
			if err != nil {
				return nil, nil, 0, err
			}
			images[i] = [][]byte{png}
		}
	}
	content := func(w int) string {
		c := strings.Join(words[:w], " ") + "\n" + instruction
		if r.vision != nil {
			c = dataset.ImageToken + "\n" + c
		}
		return c
	}
	count := func(w int) (int, error) { return r.tokenCount(content(w), images[0]) }
	n0, err := count(0)
	if err != nil {
		return nil, nil, 0, err
	}
	if n0 > p {
		return nil, nil, 0, fmt.Errorf("the prompt length %d is too small: the template, image and instruction alone take %d tokens", p, n0)
	}
	// Largest word count whose prompt fits in p tokens (each word is at least a token).
	lo, hi, best := 0, min(len(words), p), n0
	for lo < hi {
		mid := (lo + hi + 1) / 2
		n, err := count(mid)
		if err != nil {
			return nil, nil, 0, err
		}
		if n <= p {
			lo, best = mid, n
		} else {
			hi = mid - 1
		}
	}
	contents := make([]string, b)
	for i := range contents {
		contents[i] = content(lo)
	}
	return contents, images, best, nil
}
