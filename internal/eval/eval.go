// Package eval runs the Elastic Cache evaluation protocol in process, through
// the engine (no HTTP): perplexity of reference answers under teacher forcing,
// ROUGE of greedy generations against the uncompressed cache's, and latency of
// a batch of long prompts, for every cache policy and budget. cmd/elastic-eval
// is its command line; report writes the tables and plots.
//
// Every policy and budget sees exactly the same samples: when a sample fails
// under any configuration (a missing image, a prompt that does not fit), it is
// skipped for all of them, with a message naming it, and counted.
package eval

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/report"
	"github.com/elasticserve/elasticserve/llama"
)

// Options configure a Runner.
type Options struct {
	Model  string // GGUF text model
	MMProj string // GGUF projector; "" for a text-only model

	Parallel  int // sequences decoded together in ppl and rouge (default 1: bit-reproducible)
	CtxSize   int // KV cells in total for ppl and rouge (default Parallel * SeqCells)
	BatchSize int // prompt tokens per decode call (default 512)
	Threads   int // CPU threads (default: all)
	// Unified shares all KV cells between the sequences (engine.Options.Unified).
	Unified bool
	// KVType is the KV row type (engine.Options.KVType; "" is f16).
	KVType string
	// PrefillCtx, when > 0, encodes compressed prompts in a prefill context of
	// that many cells and moves them into their stream, as the server does
	// (engine.Options.PrefillCtx); 0 compresses in place.
	PrefillCtx int
	GPULayers  int // layers offloaded to a GPU when one is present: -1 all, 0 none

	// Policies are the compressed policies compared with full ("full" in the
	// list is ignored: full always runs, first, as the baseline).
	Policies []elasticcache.Policy
	Budgets  []float64 // each in (0, 1]
	Sink     int
	Distance int
	// Selection is the selection rule of every compressed setting ("": paper).
	Selection elasticcache.Selection
	// EvictMerged is the evaluation-only ablation of elasticcache.Config: elastic
	// evicts what it would merge, at the same anchors.
	EvictMerged bool

	MaxTokens int    // rouge: tokens generated per sample (default 64)
	System    string // optional system message put before every prompt
	Seed      int64  // sample subset, synthetic latency prompts, sampler seed
	// Layout orders a prompt's text and image parts: LayoutAsIs (default, ""
	// too), LayoutQuestionFirst or LayoutImageFirst. The text is kept as it is.
	Layout string
	// Protocol names the settings for the results' notes ("" : "default").
	Protocol string

	// Progress receives progress bars and skip messages (nil: silent).
	Progress io.Writer
	// Log receives the engine's log (zerolog JSON); nil discards it.
	Log io.Writer
}

// The prompt layouts of Options.Layout.
const (
	// LayoutAsIs keeps the dataset's order (the synthetic set puts the image first).
	LayoutAsIs = "as-is"
	// LayoutQuestionFirst puts the text parts before the image, as the LLaVA-1.5
	// conversation template of the published evaluation scripts does
	// ("USER: <question>\n<image> ASSISTANT:").
	LayoutQuestionFirst = "question-first"
	// LayoutImageFirst puts the image before the text parts.
	LayoutImageFirst = "image-first"
)

// Layouts lists the accepted Options.Layout values.
var Layouts = []string{LayoutAsIs, LayoutQuestionFirst, LayoutImageFirst}

// LLaVASystem is LLaVA-1.5's system prompt (its conversation template
// "vicuna_v1"), which the published Elastic Cache evaluation scripts put
// before every question.
const LLaVASystem = "A chat between a curious human and an artificial intelligence assistant. " +
	"The assistant gives helpful, detailed, and polite answers to the human's questions."

// SeqCells is the default number of KV cells per sequence for ppl and rouge.
const SeqCells = 2048

func (o *Options) defaults() error {
	if o.Parallel <= 0 {
		o.Parallel = 1
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 512
	}
	if o.Threads <= 0 {
		o.Threads = runtime.NumCPU()
	}
	if o.MaxTokens <= 0 {
		o.MaxTokens = 64
	}
	if o.CtxSize <= 0 {
		o.CtxSize = o.Parallel * max(SeqCells, 1024+o.MaxTokens)
	}
	if len(o.Budgets) == 0 {
		o.Budgets = []float64{0.2, 0.5, 0.8}
	}
	if o.Layout == "" {
		o.Layout = LayoutAsIs
	}
	if !slices.Contains(Layouts, o.Layout) {
		return fmt.Errorf("unknown prompt layout %q (want %s)", o.Layout, strings.Join(Layouts, ", "))
	}
	if o.Protocol == "" {
		o.Protocol = "default"
	}
	for _, b := range o.Budgets {
		c := elasticcache.Config{Policy: elasticcache.Elastic, Budget: b, Sink: o.Sink, Distance: o.Distance, Selection: o.Selection}
		if _, err := c.Spec(); err != nil {
			return err
		}
	}
	return nil
}

// Runner holds a loaded model.
type Runner struct {
	opts   Options
	model  *llama.Model
	vision *llama.Vision
	log    zerolog.Logger
	watch  *watcher
	// explain, while Explain runs, records the plans and decode evictions.
	explain *explainObserver
}

// Open loads the model (and the projector when given).
func Open(o Options) (*Runner, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	llama.Init(llama.LogError)
	model, err := llama.LoadModel(o.Model, llama.ModelParams{UseMmap: true, GPULayers: o.GPULayers})
	if err != nil {
		return nil, err
	}
	r := &Runner{opts: o, model: model, log: zerolog.Nop(), watch: newWatcher()}
	if o.Log != nil {
		r.log = zerolog.New(o.Log).With().Timestamp().Logger()
	}
	if o.MMProj != "" {
		r.vision, err = llama.LoadVision(model, o.MMProj, llama.VisionParams{Threads: o.Threads, UseGPU: llama.HasGPU()})
		if err != nil {
			model.Close()
			return nil, err
		}
	}
	return r, nil
}

// Close frees the model.
func (r *Runner) Close() {
	if r.vision != nil {
		r.vision.Close()
	}
	r.model.Close()
}

// Model is the loaded text model.
func (r *Runner) Model() *llama.Model { return r.model }

// Vision is the loaded image encoder (nil without a projector).
func (r *Runner) Vision() *llama.Vision { return r.vision }

// Configs lists the cache settings compared: full first, then every policy at
// every budget, in the order given.
// Options.defaults validated every setting, so they are Specs here.
func (r *Runner) Configs() []elasticcache.Spec {
	spec := elasticcache.MustSpec
	full := spec(elasticcache.Config{Policy: elasticcache.Full, Budget: 1, Sink: r.opts.Sink, Distance: r.opts.Distance})
	out := []elasticcache.Spec{full}
	for _, p := range r.opts.Policies {
		if p == elasticcache.Full {
			continue
		}
		for _, b := range r.opts.Budgets {
			out = append(out, spec(elasticcache.Config{Policy: p, Budget: b, Sink: r.opts.Sink, Distance: r.opts.Distance,
				Selection: r.opts.Selection, EvictMerged: r.opts.EvictMerged}))
		}
	}
	return out
}

// ParsePolicies reads a comma-separated policy list ("elastic,h2o,local").
func ParsePolicies(s string) ([]elasticcache.Policy, error) {
	var out []elasticcache.Policy
	for _, f := range strings.Split(s, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		p, err := elasticcache.ParsePolicy(f)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// startEngine starts an engine; stop drains it and frees its context.
func (r *Runner) startEngine(parallel, ctxSize int) (*engine.Engine, func(), error) {
	e, err := engine.Start(r.model, r.vision, engine.Options{
		Parallel:   parallel,
		CtxSize:    ctxSize,
		Unified:    r.opts.Unified,
		KVType:     r.opts.KVType,
		PrefillCtx: r.opts.PrefillCtx,
		BatchSize:  r.opts.BatchSize,
		Threads:    r.opts.Threads,
		QueueSize:  max(64, 2*parallel),
		Log:        r.log,
		Observe:    r.observe,
	})
	if err != nil {
		return nil, nil, err
	}
	stop := func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // nothing of ours is left running: stop at once
		e.Stop(ctx)
	}
	return e, stop, nil
}

// messages builds the chat for one prompt, in which dataset.ImageToken stands for
// each image, after the optional system message, its parts ordered by
// Options.Layout.
func (r *Runner) messages(prompt string, images [][]byte) ([]completion.Message, error) {
	parts, err := completion.SplitImages(prompt, dataset.ImageToken, images)
	if err != nil {
		return nil, err
	}
	parts = arrange(parts, r.opts.Layout)
	var msgs []completion.Message
	if r.opts.System != "" {
		msgs = append(msgs, completion.Message{Role: "system", Parts: []completion.Part{completion.Text(r.opts.System)}})
	}
	return append(msgs, completion.Message{Role: "user", Parts: parts}), nil
}

// arrange orders a prompt's parts for a layout: question-first moves the text
// parts before the images, image-first the images before the text; each group
// keeps its own order and every part its content. Any other layout (as-is)
// returns the parts unchanged.
func arrange(parts []completion.Part, layout string) []completion.Part {
	var first, second []completion.Part
	for _, p := range parts {
		isImage := p.Kind == completion.PartImage
		switch layout {
		case LayoutQuestionFirst:
			if isImage {
				second = append(second, p)
			} else {
				first = append(first, p)
			}
		case LayoutImageFirst:
			if isImage {
				first = append(first, p)
			} else {
				second = append(second, p)
			}
		default:
			return parts
		}
	}
	return append(first, second...)
}

// ProtocolNote describes the prompt protocol for the results' notes.
func (o Options) ProtocolNote() string {
	sys := "no system prompt"
	switch {
	case o.System == LLaVASystem:
		sys = "LLaVA-1.5's system prompt"
	case o.System != "":
		sys = fmt.Sprintf("system prompt %q", o.System)
	}
	return fmt.Sprintf("protocol %s: layout %s, %s, sink %d", cmp.Or(o.Protocol, "default"), cmp.Or(o.Layout, LayoutAsIs), sys, o.Sink)
}

func greedy(seed int64) completion.Sampling {
	return completion.Sampling{Temperature: 0, RepeatPenalty: 1, Seed: uint32(seed)}
}

// watcher follows the engine's observations: each request's largest number of
// cells held, the largest number held by all live requests together, and the
// decode steps taken since the last prompt finished encoding (for the batched
// decode throughput of a latency run).
type watcher struct {
	mu      sync.Mutex
	held    map[string]int
	peak    map[string]int
	sum     int
	peakSum int

	lastPrefill time.Time // last prefill observation
	lastStep    time.Time // last decode step observation
	steps       int       // decode steps (tokens) since lastPrefill
	attSum      int64     // attended cells summed over the window's decode steps
	attN        int
}

func newWatcher() *watcher { return &watcher{held: map[string]int{}, peak: map[string]int{}} }

func (w *watcher) observe(o engine.Observation) {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sum += o.Held - w.held[o.RequestID]
	w.held[o.RequestID] = o.Held
	w.peak[o.RequestID] = max(w.peak[o.RequestID], o.Held)
	w.peakSum = max(w.peakSum, w.sum)
	if o.Prefill {
		w.lastPrefill, w.steps = now, 0
	} else {
		w.lastStep = now
		w.steps++
		w.attSum += int64(o.Attended)
		w.attN++
	}
}

// finished forgets a request and returns its peak.
func (w *watcher) finished(id string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	p := w.peak[id]
	w.sum -= w.held[id]
	delete(w.held, id)
	delete(w.peak, id)
	return p
}

// startWindow starts a new window for the peak of all requests together and
// for the decode steps.
func (w *watcher) startWindow() {
	w.mu.Lock()
	w.peakSum = w.sum
	w.lastPrefill, w.lastStep, w.steps = time.Time{}, time.Time{}, 0
	w.attSum, w.attN = 0, 0
	w.mu.Unlock()
}

func (w *watcher) totalPeak() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.peakSum
}

// meanAttended is the mean attention span (cells, padded) of the window's decode steps.
func (w *watcher) meanAttended() float64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.attN == 0 {
		return 0
	}
	return float64(w.attSum) / float64(w.attN)
}

// steadyDecode returns the decode steps observed after the window's last
// prefill and the time they took (zero when there were none).
func (w *watcher) steadyDecode() (int, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.steps == 0 || w.lastPrefill.IsZero() || !w.lastStep.After(w.lastPrefill) {
		return 0, 0
	}
	return w.steps, w.lastStep.Sub(w.lastPrefill)
}

// readImage loads an image file for a sample ("" means none).
func readImage(path string) ([][]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("image %s is empty", path)
	}
	return [][]byte{b}, nil
}

// configName is "elastic@0.5" (or "full").
func configName(c elasticcache.Spec) string {
	if c.Policy() == elasticcache.Full {
		return string(c.Policy())
	}
	return fmt.Sprintf("%s@%g", c.Policy(), c.Budget())
}

func row(metric string, c elasticcache.Spec) report.Row {
	return report.Row{Metric: metric, Policy: string(c.Policy()), Budget: c.Budget()}
}
