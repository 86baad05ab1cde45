package eval

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/progress"
)

// SampleExplain is what one configuration did to one sample's cache.
type SampleExplain struct {
	Sample    dataset.Sample
	Regions   *engine.PromptRegions
	N, K      int // prompt entries, entries per layer after phase 1
	Generated int // tokens that entered the cache during generation
	Layers    []completion.LayerRegions
	Text      string // the greedy generation
}

// ConfigExplain is one configuration over all samples.
type ConfigExplain struct {
	Config  elasticcache.Spec
	Samples []SampleExplain
	Layers  []completion.LayerRegions // summed over the samples
	Total   completion.LayerRegions   // summed over the layers too
}

// Explanation is the outcome of Explain.
type Explanation struct {
	Configs []ConfigExplain // every compressed configuration of Runner.Configs, in order
	Skipped []string
	Notes   []string // region spans not found, deduplicated
	Layers  int
}

// explainObserver records, per request, the engine's trace (the prefill plan
// and every decode step). The decode loop only appends; the replay happens once
// the request is done.
type explainObserver struct {
	mu   sync.Mutex
	reqs map[string]*engine.Trace
}

func (x *explainObserver) observe(o engine.Observation) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if tr := x.reqs[o.RequestID]; tr != nil { // else not a request of Explain
		tr.Observe(o)
	}
}

func (x *explainObserver) start(id string) {
	x.mu.Lock()
	x.reqs[id] = &engine.Trace{}
	x.mu.Unlock()
}

func (x *explainObserver) finish(id string) *engine.Trace {
	x.mu.Lock()
	defer x.mu.Unlock()
	tr := x.reqs[id]
	delete(x.reqs, id)
	return tr
}

// observe passes the engine's observations to the watcher and, while Explain
// runs, to its observer.
func (r *Runner) observe(o engine.Observation) {
	r.watch.observe(o)
	if x := r.explain; x != nil {
		x.observe(o)
	}
}

// Explain runs every sample greedily (Options.MaxTokens tokens, as ROUGE does)
// under every compressed configuration of Configs (full is not run) and counts,
// per layer and region, the prompt entries phase 1 kept, merged and evicted and
// the entries evicted during generation. Under the reference selection's
// compacted positions (Spec.CompactPositions) the kept prompt entries are
// mapped back from their relabelled positions 0..K-1 to their prompt
// positions, so their decode evictions are counted in their own regions too.
func (r *Runner) Explain(ctx context.Context, samples []dataset.Sample) (*Explanation, error) {
	if r.vision == nil && slices.ContainsFunc(samples, func(s dataset.Sample) bool { return s.Image != "" }) {
		return nil, errors.New("the dataset has images but no projector was loaded (pass --mmproj)")
	}
	cfgs := r.Configs()[1:]
	if len(cfgs) == 0 {
		return nil, errors.New("explain needs a compressed policy (elastic, h2o or local)")
	}
	x := &explainObserver{reqs: map[string]*engine.Trace{}}
	r.explain = x
	defer func() { r.explain = nil }()
	e, stop, err := r.startEngine(1, r.opts.CtxSize/r.opts.Parallel)
	if err != nil {
		return nil, err
	}
	defer stop()
	nl := len(e.PlannedLayers())

	out := &Explanation{Layers: nl}
	for _, c := range cfgs {
		out.Configs = append(out.Configs, ConfigExplain{Config: c, Layers: make([]completion.LayerRegions, nl)})
	}
	bar := progress.New(r.opts.Progress, "explain", len(samples)*len(cfgs))
	defer bar.Finish()
	notes := map[string]bool{}
	for _, s := range samples {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		res, err := r.explainSample(ctx, e, x, s, cfgs)
		switch {
		case err == nil:
		case ctx.Err() != nil || errors.Is(err, completion.ErrShuttingDown):
			return nil, cmpErr(ctx.Err(), fmt.Errorf("%s: %w", s.Name(), err))
		default:
			msg := fmt.Sprintf("skipping %s: %v", s.Name(), err)
			out.Skipped = append(out.Skipped, msg)
			bar.Printf("elastic-eval: explain: %s", msg)
			bar.Add(len(cfgs))
			continue
		}
		for ci := range cfgs {
			ce := &out.Configs[ci]
			ce.Samples = append(ce.Samples, res[ci])
			for l, lr := range res[ci].Layers {
				for g := range completion.NumRegions {
					ce.Layers[l][g].Add(lr[g])
					ce.Total[g].Add(lr[g])
				}
			}
			for _, n := range res[ci].Regions.Notes {
				if !notes[n] {
					notes[n] = true
					out.Notes = append(out.Notes, n)
				}
			}
		}
		bar.Add(len(cfgs))
	}
	if len(out.Configs[0].Samples) == 0 && len(samples) > 0 {
		return out, errors.New("no sample could be explained")
	}
	return out, nil
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (r *Runner) explainSample(ctx context.Context, e *engine.Engine, x *explainObserver, s dataset.Sample, cfgs []elasticcache.Spec) ([]SampleExplain, error) {
	msgs, err := r.sampleMessages(s)
	if err != nil {
		return nil, err
	}
	pr, err := engine.Regions(r.model, r.vision, msgs)
	if err != nil {
		return nil, skip("%v", err)
	}
	var out []SampleExplain
	for ci, c := range cfgs {
		req := &completion.Request{
			ID:        fmt.Sprintf("explain-%d-%d", s.Index, ci),
			Messages:  msgs,
			MaxTokens: r.opts.MaxTokens,
			Sampling:  greedy(r.opts.Seed),
			Cache:     c,
		}
		x.start(req.ID)
		res, err := e.Complete(ctx, req)
		tr := x.finish(req.ID)
		r.watch.finished(req.ID)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", configName(c), err)
		}
		se, err := replay(pr, tr, len(e.PlannedLayers()), c.CompactPositions())
		if err != nil {
			return nil, fmt.Errorf("%s: %w", configName(c), err)
		}
		se.Sample, se.Text = s, res.Text
		out = append(out, se)
	}
	return out, nil
}

// replay turns a request's trace into per-layer region counts (engine.Replay).
func replay(pr *engine.PromptRegions, tr *engine.Trace, nl int, compact bool) (SampleExplain, error) {
	se := SampleExplain{Regions: pr, N: pr.N(), K: pr.N()}
	rp, err := engine.Replay(pr, tr, nl, compact)
	if err != nil {
		return se, err
	}
	se.K, se.Generated, se.Layers = rp.K, rp.Generated, rp.Layers
	return se, nil
}

// Markdown renders one table per configuration: for each layer ("all" first:
// the sum over the layers) and region, the entries summed over the samples.
func (x *Explanation) Markdown(title string, notes []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s\n\n", title)
	for _, n := range notes {
		fmt.Fprintf(&b, "- %s\n", n)
	}
	for _, n := range x.Notes {
		fmt.Fprintf(&b, "- %s\n", n)
	}
	for _, s := range x.Skipped {
		fmt.Fprintf(&b, "- %s\n", s)
	}
	if len(notes)+len(x.Notes)+len(x.Skipped) > 0 {
		b.WriteString("\n")
	}
	for _, ce := range x.Configs {
		fmt.Fprintf(&b, "## %s: %d samples, %d layers\n\n", configName(ce.Config), len(ce.Samples), x.Layers)
		b.WriteString("Entries summed over the samples (\"all\": and over the layers). Phase 1: every prompt entry is kept, merged into a kept entry or evicted; decode: evicted during generation; held: left at the end. Percentages are of the region's entries.\n\n")
		b.WriteString("| layer | region | entries | kept | merged | evicted | decode evicted | held at end |\n")
		b.WriteString("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
		write := func(layer string, lr completion.LayerRegions) {
			for g := range completion.NumRegions {
				c := lr[g]
				if c.Entries == 0 && c.DecodeEvicted == 0 && c.Held == 0 {
					continue
				}
				pct := func(v int) string {
					if c.Entries == 0 {
						return fmt.Sprint(v)
					}
					return fmt.Sprintf("%d (%.0f%%)", v, 100*float64(v)/float64(c.Entries))
				}
				if g == completion.RegionAnswer {
					fmt.Fprintf(&b, "| %s | %s | %d | - | - | - | %s | %s |\n", layer, g, c.Entries, pct(c.DecodeEvicted), pct(c.Held))
					continue
				}
				fmt.Fprintf(&b, "| %s | %s | %d | %s | %s | %s | %s | %s |\n", layer, g, c.Entries,
					pct(c.Kept), pct(c.Merged), pct(c.Evicted), pct(c.DecodeEvicted), pct(c.Held))
			}
		}
		write("all", ce.Total)
		for l, lr := range ce.Layers {
			write(fmt.Sprint(l), lr)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// CSV renders every configuration, layer ("all" included) and region as a row.
func (x *Explanation) CSV() string {
	var b bytes.Buffer
	b.WriteString("policy,budget,samples,layer,region,entries,kept,merged,evicted,decode_evicted,held\n")
	for _, ce := range x.Configs {
		write := func(layer string, lr completion.LayerRegions) {
			for g := range completion.NumRegions {
				c := lr[g]
				fmt.Fprintf(&b, "%s,%g,%d,%s,%s,%d,%d,%d,%d,%d,%d\n", ce.Config.Policy(), ce.Config.Budget(), len(ce.Samples),
					layer, g, c.Entries, c.Kept, c.Merged, c.Evicted, c.DecodeEvicted, c.Held)
			}
		}
		write("all", ce.Total)
		for l, lr := range ce.Layers {
			write(fmt.Sprint(l), lr)
		}
	}
	return b.String()
}

// ExplainRun is what RunExplain measured and wrote.
type ExplainRun struct {
	*Explanation
	Markdown string
	CSV      string
	Files    []string // explain.md and explain.csv in RunOptions.Out
}

// RunExplain loads ro.Data, draws ro.MaxSamples samples with Options.Seed (as
// Run does), runs Explain on them and, when ro.Out is set, writes explain.md
// and explain.csv there.
func (r *Runner) RunExplain(ctx context.Context, ro RunOptions) (*ExplainRun, error) {
	if ro.Data == "" {
		return nil, errors.New("explain needs a dataset (--data)")
	}
	set, err := dataset.Load(ro.Data, ro.Images)
	if err != nil {
		return nil, err
	}
	for _, s := range set.Skipped {
		r.printf("elastic-eval: skipping %s", s)
	}
	samples := dataset.Select(set.Samples, ro.MaxSamples, r.opts.Seed)
	if len(samples) == 0 {
		return nil, fmt.Errorf("dataset %s has no usable sample", ro.Data)
	}
	x, err := r.Explain(ctx, samples)
	if err != nil {
		return nil, err
	}
	notes := []string{
		fmt.Sprintf("model %s%s", r.opts.Model, ifNotEmpty(", projector ", r.opts.MMProj)),
		fmt.Sprintf("dataset %s: %d samples drawn (seed %d), %d explained; %d greedy tokens per sample",
			ro.Data, len(samples), r.opts.Seed, len(x.Configs[0].Samples), r.opts.MaxTokens),
		r.opts.ProtocolNote() + fmt.Sprintf(", distance %d", r.opts.Distance),
	}
	out := &ExplainRun{Explanation: x, Markdown: x.Markdown("elastic-eval explain: "+filepath.Base(r.opts.Model), notes), CSV: x.CSV()}
	if ro.Out != "" {
		if err := os.MkdirAll(ro.Out, 0o755); err != nil {
			return out, err
		}
		for _, f := range []struct{ name, text string }{{"explain.md", out.Markdown}, {"explain.csv", out.CSV}} {
			p := filepath.Join(ro.Out, f.name)
			if err := os.WriteFile(p, []byte(f.text), 0o644); err != nil {
				return out, err
			}
			out.Files = append(out.Files, p)
		}
	}
	return out, nil
}
