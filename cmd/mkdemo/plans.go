package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// planLayer is one layer's phase 1 result as the engine applied it.
type planLayer struct {
	Keep   []int   `json:"keep"`
	Groups [][]int `json:"groups"`
}

// planRow is one question's record for tools/demo-vlm/elastic_check.py.
type planRow struct {
	ID        string `json:"id"`
	Question  string `json:"question"`
	TextFirst bool   `json:"text_first"`
	Image     string `json:"image"` // relative to the questions file's folder
	// N and K: prompt entries and entries kept per layer (K == N, Layers nil:
	// the policy left the cache as it was).
	N      int         `json:"N"`
	K      int         `json:"K"`
	Layers []planLayer `json:"layers"`
	// Held: entries the sequence held after each decode step (T = N+1, N+2, ...);
	// Evicted: the position that step evicted, -1 for none.
	Held    []int `json:"held"`
	Evicted []int `json:"evicted"`
	// Scores (with --scores): llama.cpp's head-averaged attention column sums per
	// layer and prompt position, captured in a separate context that decodes the
	// prompt in the engine's batches (one decode per chunk), for the analysis of
	// plan differences: ties and float rounding versus rule differences.
	Scores           [][]float32 `json:"scores,omitempty"`
	Answer           string      `json:"answer"` // the engine's greedy text, untrimmed
	CompletionTokens int         `json:"completion_tokens"`
	FinishReason     string      `json:"finish_reason"`
}

// planFile is what `mkdemo plans` writes.
type planFile struct {
	Policy    string    `json:"policy"`
	Budget    float64   `json:"budget"`
	Sink      int       `json:"sink"`
	Distance  int       `json:"distance"`
	Selection string    `json:"selection"`
	KVType    string    `json:"kv_type"`
	Parallel  int       `json:"parallel"`
	MaxTokens int       `json:"max_tokens"`
	Questions string    `json:"questions"` // the questions file (images are relative to it)
	Rows      []planRow `json:"rows"`
	// ImageEmbd (with --scores): clip.cpp's image embeddings per image file
	// (n_tokens x embd, row-major), so the PyTorch side can start from the
	// engine's embeddings and isolate the text model's arithmetic.
	ImageEmbd map[string][]float32 `json:"image_embd,omitempty"`
}

// planRecorder collects the engine's observations per request ID.
type planRecorder struct {
	mu   sync.Mutex
	rows map[string]*planRow
}

func (r *planRecorder) observe(o engine.Observation) {
	r.mu.Lock()
	defer r.mu.Unlock()
	row := r.rows[o.RequestID]
	if row == nil {
		return
	}
	if !o.Prefill {
		row.Held = append(row.Held, o.Held)
		row.Evicted = append(row.Evicted, o.Evicted)
		return
	}
	row.N, row.K = o.T, o.Held
	if o.Plan == nil {
		return
	}
	row.N, row.K = o.Plan.N, o.Plan.K
	row.Layers = make([]planLayer, len(o.Plan.Layers))
	for l, lp := range o.Plan.Layers { // copied: the plan is the engine's
		pl := planLayer{Keep: slices.Clone(lp.Keep), Groups: make([][]int, len(lp.Keep))}
		for i := range lp.Keep {
			pl.Groups[i] = []int{}
			if i < len(lp.Groups) && lp.Groups[i] != nil {
				pl.Groups[i] = slices.Clone(lp.Groups[i])
			}
		}
		row.Layers[l] = pl
	}
}

func plansCmd(fs *flag.FlagSet, args []string) error {
	dir := fs.String("dir", "models/demo", "folder with model.gguf and mmproj.gguf")
	qpath := fs.String("questions", "models/demo/heldout.json", "held-out questions")
	out := fs.String("out", "", "JSON output (required)")
	cache := addCacheFlags(fs, "elastic", 0.5) // elastic_check.py implements the paper selection
	parallel := fs.Int("parallel", 1, "engine slots (1: every step decodes one sequence alone)")
	threads := fs.Int("threads", 2, "threads")
	kvType := fs.String("kv-type", "", "KV cache type (default f16)")
	maxTokens := fs.Int("max-tokens", 64, "answer length limit")
	limit := fs.Int("limit", 0, "first N questions only (0: all)")
	withScores := fs.Bool("scores", false, "also record llama.cpp's importance scores of every prompt")
	fs.Parse(args)
	if *out == "" {
		return errors.New("plans: --out is required")
	}
	qf, imgs, err := ReadQuestions(*qpath)
	if err != nil {
		return err
	}
	qs := qf.Questions
	if *limit > 0 && *limit < len(qs) {
		qs = qs[:*limit]
	}
	spec, err := cache.spec()
	if err != nil {
		return err
	}
	rec := &planRecorder{rows: map[string]*planRow{}}
	rows := make([]*planRow, len(qs))
	for i, q := range qs {
		rows[i] = &planRow{ID: q.ID, Question: q.Question, TextFirst: q.TextFirst, Image: q.Image}
		rec.rows[fmt.Sprintf("q%d", i)] = rows[i]
	}
	llama.Init(llama.LogError)
	a, err := startObserved(*dir, *parallel, *threads, *kvType, rec.observe)
	if err != nil {
		return err
	}
	defer a.Close()
	start := time.Now()
	type res struct {
		i   int
		r   completion.Result
		err error
	}
	results := make(chan res)
	sem := make(chan struct{}, max(1, min(32, *parallel*2)))
	go func() {
		for i, q := range qs {
			sem <- struct{}{}
			go func() {
				defer func() { <-sem }()
				req := &completion.Request{
					ID:        fmt.Sprintf("q%d", i), // the key of rec.rows
					Messages:  []completion.Message{userTurn(q.Question, imgs[q.Image], q.TextFirst)},
					MaxTokens: *maxTokens,
					Sampling:  completion.Sampling{Temperature: 0, RepeatPenalty: 1},
					Cache:     spec,
				}
				r, err := a.Engine.Complete(context.Background(), req)
				results <- res{i, r, err}
			}()
		}
	}()
	var errs []error
	for range qs {
		r := <-results
		if r.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", qs[r.i].ID, r.err))
			continue
		}
		rec.mu.Lock()
		rows[r.i].Answer = r.r.Text
		rows[r.i].CompletionTokens = r.r.Final.Usage.CompletionTokens
		rows[r.i].FinishReason = r.r.Final.FinishReason
		rec.mu.Unlock()
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	var embds map[string][]float32
	if *withScores {
		embds = map[string][]float32{}
		for i, q := range qs {
			sc, n, emb, err := captureScores(a, q, imgs[q.Image], *threads, *kvType)
			if err != nil {
				return fmt.Errorf("%s: scores: %w", q.ID, err)
			}
			if n != rows[i].N {
				return fmt.Errorf("%s: scores: prompt of %d tokens, the engine had %d", q.ID, n, rows[i].N)
			}
			rows[i].Scores = sc
			embds[q.Image] = emb
		}
	}
	c := spec.Config()
	pf := planFile{Policy: string(c.Policy), Budget: c.Budget, Sink: c.Sink, Distance: c.Distance, Selection: string(spec.Selection()),
		KVType: *kvType, Parallel: *parallel, MaxTokens: *maxTokens, Questions: *qpath, ImageEmbd: embds}
	if pf.KVType == "" {
		pf.KVType = "f16"
	}
	for _, r := range rows {
		pf.Rows = append(pf.Rows, *r)
	}
	fmt.Printf("%d questions in %s (policy %s, selection %s, budget %g)\n", len(rows), time.Since(start).Round(time.Millisecond), c.Policy, c.Selection, c.Budget)
	b, err := json.Marshal(pf)
	if err != nil {
		return err
	}
	return os.WriteFile(*out, b, 0o644)
}

// captureScores decodes q's prompt in a fresh context, one decode per chunk as the
// engine's prefill does (prompts here are shorter than a batch), with attention
// capture on, and returns the per-layer column sums of the prompt's cells.
// It also returns the image chunk's embeddings.
func captureScores(a *Answerer, q Question, img []byte, threads int, kvType string) ([][]float32, int, []float32, error) {
	text, images, err := engine.RenderPrompt(a.Model, []completion.Message{userTurn(q.Question, img, q.TextFirst)})
	if err != nil {
		return nil, 0, nil, err
	}
	p, err := a.Vision.Tokenize(text, images, true)
	if err != nil {
		return nil, 0, nil, err
	}
	defer p.Close()
	ctx, err := llama.NewContext(a.Model, llama.ContextParams{NCtx: 1024, NBatch: 512, NSeqMax: 1, Threads: threads,
		Capture: true, TypeK: kvType, TypeV: kvType})
	if err != nil {
		return nil, 0, nil, err
	}
	defer ctx.Close()
	embd := a.Vision.EmbdSize()
	var imgEmbd []float32
	ctx.CaptureReset()
	pos := 0
	for ci, c := range p.Chunks {
		last := ci == len(p.Chunks)-1 // the engine asks for the last prompt token's logits
		if c.NTokens > 512 {
			return nil, 0, nil, fmt.Errorf("chunk %d has %d tokens, more than one batch", ci, c.NTokens)
		}
		var b *llama.Batch
		nonCausal := false
		switch c.Kind {
		case llama.ChunkText:
			b = llama.NewBatch(len(c.Tokens), 0, 1)
			for i, t := range c.Tokens {
				b.Add(t, pos+i, 0, last && i == len(c.Tokens)-1)
			}
		case llama.ChunkImage:
			e, err := p.EncodeImage(c)
			if err != nil {
				return nil, 0, nil, err
			}
			imgEmbd = e
			b = llama.NewBatch(c.NTokens, embd, 1)
			for i := range c.NTokens {
				b.AddEmbd(e[i*embd:(i+1)*embd], pos+i, 0, last && i == c.NTokens-1)
			}
			nonCausal = a.Vision.NonCausal()
		}
		if nonCausal {
			ctx.SetCausal(false)
		}
		ctx.CaptureEnable(true)
		err = ctx.Decode(b)
		ctx.CaptureEnable(false)
		if nonCausal {
			ctx.SetCausal(true)
		}
		pos += b.Len()
		b.Close()
		if err != nil {
			return nil, 0, nil, fmt.Errorf("decode chunk %d: %w", ci, err)
		}
	}
	sums, err := ctx.CaptureSums(0, pos)
	return sums, pos, imgEmbd, err
}
