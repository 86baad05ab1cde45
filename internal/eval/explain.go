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
	"github.com/elasticserve/elasticserve/llama"
)

// Region is the part of a sequence a cache entry belongs to.
type Region int

// The regions of Explain, in table order.
const (
	RegionSystem   Region = iota // the tokens of the system message's text
	RegionImage                  // the embeddings of an image
	RegionQuestion               // the tokens of the user message's text parts
	RegionTemplate               // everything else in the prompt: BOS, role markers, newlines
	RegionAnswer                 // generated tokens
	NumRegions
)

var regionNames = [NumRegions]string{"system", "image", "question", "template", "answer"}

func (g Region) String() string {
	if g >= 0 && g < NumRegions {
		return regionNames[g]
	}
	return fmt.Sprintf("region(%d)", int(g))
}

// PromptRegions labels every position of a prompt as the engine encodes it.
type PromptRegions struct {
	Of      []Region // region of each prompt position; len is N
	Size    [NumRegions]int
	ImageNs []int    // N of each image chunk, in order
	Notes   []string // text spans that could not be located (counted as template)
}

// N is the number of prompt positions.
func (p *PromptRegions) N() int { return len(p.Of) }

// Regions labels the prompt positions of msgs, as engine.PromptChunks lays them
// out: positions of image chunks are "image"; the text of system messages is
// "system" and that of the other messages "question", found by tokenizing each
// text part with the model's tokenizer and locating the tokens, in prompt order,
// inside the text chunks; everything else is "template". A part whose tokens
// cannot be found is left as template and named in Notes.
//
// The tokenizer may tokenize a text differently inside the rendered prompt than
// alone (a SentencePiece leading space, a BPE merge with the template's next
// character): the part is tried as is and with a leading space, then with its
// first and/or last token matched only by its text (the prompt's token there
// spells the same word, with or without a leading space, or begins with the
// last token's text), or without its first token when that token is only a
// space.
func Regions(m *llama.Model, v *llama.Vision, msgs []engine.Message) (*PromptRegions, error) {
	chunks, err := engine.PromptChunks(m, v, msgs)
	if err != nil {
		return nil, err
	}
	pr := &PromptRegions{}
	// texts: the prompt's text tokens with their positions, chunk by chunk.
	type textChunk struct {
		start int
		toks  []llama.Token
	}
	var texts []textChunk
	n := 0
	for _, c := range chunks {
		if c.Image {
			pr.ImageNs = append(pr.ImageNs, c.N)
			for range c.N {
				pr.Of = append(pr.Of, RegionImage)
			}
		} else {
			texts = append(texts, textChunk{start: n, toks: c.Tokens})
			for range c.N {
				pr.Of = append(pr.Of, RegionTemplate)
			}
		}
		n += c.N
	}
	piece := func(t llama.Token) string { return string(m.TokenPiece(t, true)) }
	cursor := 0 // prompt position the next span starts at or after
	for _, msg := range msgs {
		region := RegionQuestion
		if msg.Role == "system" {
			region = RegionSystem
		}
		for _, part := range msg.Parts {
			if part.Kind != completion.PartText || strings.TrimSpace(part.Text) == "" {
				continue
			}
			start, end, ok := -1, -1, false
			for _, text := range []string{part.Text, " " + part.Text, strings.TrimSpace(part.Text)} {
				want, err := m.Tokenize(text, false, false)
				if err != nil {
					return nil, fmt.Errorf("tokenize: %w", err)
				}
				if len(want) == 0 {
					continue
				}
				for _, tc := range texts {
					if tc.start+len(tc.toks) <= cursor {
						continue
					}
					from := max(0, cursor-tc.start)
					if s, e, found := locate(tc.toks, from, want, piece); found {
						start, end, ok = tc.start+s, tc.start+e, true
						break
					}
				}
				if ok {
					break
				}
			}
			if !ok {
				pr.Notes = append(pr.Notes, fmt.Sprintf("%s text %q not found among the prompt's tokens: counted as template", region, abbrev(part.Text, 40)))
				continue
			}
			for p := start; p < end; p++ {
				pr.Of[p] = region
			}
			cursor = end
		}
	}
	for _, g := range pr.Of {
		pr.Size[g]++
	}
	return pr, nil
}

// locate finds want in toks at or after from and returns the span [s, e) it
// covers. An exact match is preferred; failing that, want's first and/or last
// token may be matched by text only (see Regions).
func locate(toks []llama.Token, from int, want []llama.Token, piece func(llama.Token) string) (int, int, bool) {
	if s, e, ok := locate1(toks, from, want, piece); ok {
		return s, e, true
	}
	// A leading token that is only the tokenizer's space prefix (a tokenizer
	// that spells the space apart) has no counterpart after a newline.
	if len(want) > 1 && strings.TrimSpace(piece(want[0])) == "" {
		return locate1(toks, from, want[1:], piece)
	}
	return 0, 0, false
}

func locate1(toks []llama.Token, from int, want []llama.Token, piece func(llama.Token) string) (int, int, bool) {
	if i := index(toks, from, want); i >= 0 {
		return i, i + len(want), true
	}
	sameWord := func(a, b llama.Token) bool {
		pa, pb := strings.TrimLeft(piece(a), " "), strings.TrimLeft(piece(b), " ")
		return pa != "" && pa == pb
	}
	startsWith := func(a, b llama.Token) bool { // a's text begins with b's
		pa, pb := piece(a), piece(b)
		return pb != "" && strings.HasPrefix(pa, pb)
	}
	for _, trim := range [][2]int{{1, 0}, {0, 1}, {1, 1}} {
		head, tail := trim[0], trim[1]
		core := want[head : len(want)-tail]
		if len(core) == 0 {
			continue
		}
		for i := from + head; i <= len(toks)-len(core); {
			j := index(toks, i, core)
			if j < 0 {
				break
			}
			s, e := j-head, j+len(core)+tail
			okHead := head == 0 || (s >= from && sameWord(toks[s], want[0]))
			okTail := tail == 0 || (e <= len(toks) && startsWith(toks[e-1], want[len(want)-1]))
			if okHead && okTail {
				return s, e, true
			}
			i = j + 1
		}
	}
	return 0, 0, false
}

// index is the first i >= from where toks[i:] starts with want, or -1.
func index(toks []llama.Token, from int, want []llama.Token) int {
	for i := from; i+len(want) <= len(toks); i++ {
		if slices.Equal(toks[i:i+len(want)], want) {
			return i
		}
	}
	return -1
}

func abbrev(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n]) + "..."
}

// RegionCounts are one region's entries in one layer.
type RegionCounts struct {
	Entries int // prompt entries of the region (answer: generated tokens that entered the cache)
	// Phase 1 (prompt plan): every prompt entry is kept, merged into a kept entry,
	// or evicted. Without a plan (full, or nothing to drop) every entry is kept.
	Kept, Merged, Evicted int
	DecodeEvicted         int // entries evicted during generation (phase 2)
	Held                  int // entries still held when the request ended
}

func (c *RegionCounts) add(o RegionCounts) {
	c.Entries += o.Entries
	c.Kept += o.Kept
	c.Merged += o.Merged
	c.Evicted += o.Evicted
	c.DecodeEvicted += o.DecodeEvicted
	c.Held += o.Held
}

// LayerRegions are one layer's counts, by region.
type LayerRegions [NumRegions]RegionCounts

// SampleExplain is what one configuration did to one sample's cache.
type SampleExplain struct {
	Sample    dataset.Sample
	Regions   *PromptRegions
	N, K      int // prompt entries, entries per layer after phase 1
	Generated int // tokens that entered the cache during generation
	Layers    []LayerRegions
	Text      string // the greedy generation
}

// ConfigExplain is one configuration over all samples.
type ConfigExplain struct {
	Config  elasticcache.Spec
	Samples []SampleExplain
	Layers  []LayerRegions // summed over the samples
	Total   LayerRegions   // summed over the layers too
}

// Explanation is the outcome of Explain.
type Explanation struct {
	Configs []ConfigExplain // every compressed configuration of Runner.Configs, in order
	Skipped []string
	Notes   []string // region spans not found, deduplicated
	Layers  int
}

// explainObserver records, per request, the prefill plan and every decode
// step's (T, evicted position, held). The decode loop only appends; the
// replay happens once the request is done.
type explainObserver struct {
	mu   sync.Mutex
	reqs map[string]*explainTrace
}

type explainTrace struct {
	prefill bool
	n       int // T at the prefill observation: the prompt's length
	plan    *elasticcache.PrefillPlan
	steps   []explainStep
}

type explainStep struct{ t, evicted, held int }

func (x *explainObserver) observe(o engine.Observation) {
	x.mu.Lock()
	defer x.mu.Unlock()
	tr := x.reqs[o.RequestID]
	if tr == nil {
		return // not a request of Explain
	}
	if o.Prefill {
		tr.prefill, tr.n, tr.plan = true, o.T, o.Plan
		return
	}
	tr.steps = append(tr.steps, explainStep{t: o.T, evicted: o.Evicted, held: o.Held})
}

func (x *explainObserver) start(id string) {
	x.mu.Lock()
	x.reqs[id] = &explainTrace{}
	x.mu.Unlock()
}

func (x *explainObserver) finish(id string) *explainTrace {
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
	nl := r.model.Info().Layers
	x := &explainObserver{reqs: map[string]*explainTrace{}}
	r.explain = x
	defer func() { r.explain = nil }()
	e, stop, err := r.startEngine(1, r.opts.CtxSize/r.opts.Parallel)
	if err != nil {
		return nil, err
	}
	defer stop()

	out := &Explanation{Layers: nl}
	for _, c := range cfgs {
		out.Configs = append(out.Configs, ConfigExplain{Config: c, Layers: make([]LayerRegions, nl)})
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
		case ctx.Err() != nil || errors.Is(err, engine.ErrShuttingDown):
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
				for g := range NumRegions {
					ce.Layers[l][g].add(lr[g])
					ce.Total[g].add(lr[g])
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
	pr, err := Regions(r.model, r.vision, msgs)
	if err != nil {
		return nil, skip("%v", err)
	}
	var out []SampleExplain
	for ci, c := range cfgs {
		req := &engine.Request{
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
		se, err := replay(pr, tr, r.model.Info().Layers, c.CompactPositions())
		if err != nil {
			return nil, fmt.Errorf("%s: %w", configName(c), err)
		}
		se.Sample, se.Text = s, res.Text
		out = append(out, se)
	}
	return out, nil
}

// replay turns a request's trace into per-layer region counts: phase 1 from the
// plan, then the decode steps, each appending the generated positions up to T
// to every layer and evicting, in every layer, the entry at the index that the
// evicted position has among the engine's positions (the engine evicts the same
// index in every layer; its positions are layer 0's kept prompt positions, or
// 0..K-1 when compact, then the generated tokens').
func replay(pr *PromptRegions, tr *explainTrace, nl int, compact bool) (SampleExplain, error) {
	se := SampleExplain{Regions: pr, N: pr.N(), K: pr.N(), Layers: make([]LayerRegions, nl)}
	if tr == nil || !tr.prefill {
		return se, errors.New("the engine reported no prefill")
	}
	if tr.n != pr.N() {
		return se, fmt.Errorf("the engine encoded %d prompt tokens, the regions cover %d", tr.n, pr.N())
	}
	n := pr.N()
	held := make([][]int, nl) // prompt positions (n+g: generated token g) held per layer, in order
	for l := range nl {
		lr := &se.Layers[l]
		for g := range NumRegions {
			lr[g].Entries = pr.Size[g]
		}
		if tr.plan == nil {
			held[l] = make([]int, n)
			for p := range n {
				held[l][p] = p
				lr[pr.Of[p]].Kept++
			}
			continue
		}
		if len(tr.plan.Layers) != nl || tr.plan.N != n {
			return se, fmt.Errorf("the plan covers %d layers and %d entries, want %d and %d", len(tr.plan.Layers), tr.plan.N, nl, n)
		}
		lp := tr.plan.Layers[l]
		se.K = tr.plan.K
		state := make([]int8, n) // 0 evicted, 1 merged, 2 kept
		for _, g := range lp.Groups {
			for _, p := range g {
				state[p] = 1
			}
		}
		for _, p := range lp.Keep {
			state[p] = 2
		}
		for p, st := range state {
			c := &lr[pr.Of[p]]
			switch st {
			case 2:
				c.Kept++
			case 1:
				c.Merged++
			default:
				c.Evicted++
			}
		}
		held[l] = slices.Clone(lp.Keep)
	}
	// pos: the engine's position of each held entry (the same in every layer).
	pos := slices.Clone(held[0])
	shift := 0
	if compact && tr.plan != nil {
		shift = n - tr.plan.K
		for i := range pos {
			pos[i] = i
		}
	}
	next := n
	region := func(p int) Region {
		if p >= n {
			return RegionAnswer
		}
		return pr.Of[p]
	}
	for _, st := range tr.steps {
		for ; next < st.t; next++ {
			for l := range nl {
				held[l] = append(held[l], next)
			}
			pos = append(pos, next-shift)
			se.Generated++
		}
		if st.evicted >= 0 {
			idx := slices.Index(pos, st.evicted)
			if idx < 0 {
				return se, fmt.Errorf("decode step at T=%d evicted position %d, which the sequence does not hold", st.t, st.evicted)
			}
			pos = slices.Delete(pos, idx, idx+1)
			for l := range nl {
				se.Layers[l][region(held[l][idx])].DecodeEvicted++
				held[l] = slices.Delete(held[l], idx, idx+1)
			}
		}
		if len(pos) != st.held {
			return se, fmt.Errorf("decode step at T=%d: the engine holds %d entries, the replay %d", st.t, st.held, len(pos))
		}
	}
	for l := range nl {
		se.Layers[l][RegionAnswer].Entries = se.Generated
		for _, p := range held[l] {
			se.Layers[l][region(p)].Held++
		}
	}
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
		write := func(layer string, lr LayerRegions) {
			for g := range NumRegions {
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
				if g == RegionAnswer {
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
		write := func(layer string, lr LayerRegions) {
			for g := range NumRegions {
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
