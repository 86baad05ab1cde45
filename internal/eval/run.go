package eval

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/report"
)

// RunOptions select what Run measures.
type RunOptions struct {
	Metrics    []string // report.PPL, report.ROUGE, report.Latency, in any order
	Data       string   // dataset JSON (ppl and rouge)
	Images     string   // image folder ("" : the dataset's folder)
	MaxSamples int      // at most this many samples, drawn with Options.Seed (0: all)
	Latency    LatencyOptions
	Out        string // folder for results.csv, results.md and the plots ("" : none)
}

// RunResult is everything Run measured.
type RunResult struct {
	Results *report.Results
	Files   []string // files written to RunOptions.Out
	Dataset *dataset.Set
	Samples []dataset.Sample // the samples evaluated
	PPL     *Quality
	ROUGE   *Quality
	Latency *LatencyResult
}

// ParseMetrics reads a comma-separated metric list; "all" is ppl,rouge,latency.
func ParseMetrics(s string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(s, ",") {
		f = strings.ToLower(strings.TrimSpace(f))
		switch f {
		case "":
			continue
		case "all":
			out = append(out, report.PPL, report.ROUGE, report.Latency)
		case report.PPL, report.ROUGE, report.Latency:
			out = append(out, f)
		default:
			return nil, fmt.Errorf("unknown metric %q (want ppl, rouge, latency or all)", f)
		}
	}
	out = slices.Compact(sortMetrics(out))
	if len(out) == 0 {
		return nil, errors.New("no metric given")
	}
	return out, nil
}

func sortMetrics(m []string) []string {
	order := map[string]int{report.PPL: 0, report.ROUGE: 1, report.Latency: 2}
	slices.SortStableFunc(m, func(a, b string) int { return order[a] - order[b] })
	return m
}

// Run measures the chosen metrics for every configuration and, when ro.Out is
// set, writes the CSV, markdown and plots there.
func (r *Runner) Run(ctx context.Context, ro RunOptions) (*RunResult, error) {
	metrics := sortMetrics(slices.Clone(ro.Metrics))
	if len(metrics) == 0 {
		return nil, errors.New("no metric given")
	}
	out := &RunResult{Results: &report.Results{Title: "elastic-eval: " + filepath.Base(r.opts.Model)}}
	out.Results.Notes = r.settingNotes()
	if slices.Contains(metrics, report.PPL) || slices.Contains(metrics, report.ROUGE) {
		if err := r.loadSamples(ro, out); err != nil {
			return nil, err
		}
	}
	// Rows over a group of samples (long, short answers) come after all the
	// others, so the rows over all samples keep their places in results.csv.
	var kindRows []report.Row
	for _, m := range metrics {
		rows, err := r.runMetric(ctx, m, ro, out)
		if err != nil {
			return nil, err
		}
		kindRows = append(kindRows, rows...)
	}
	out.Results.Rows = append(out.Results.Rows, kindRows...)
	out.Results.Notes = append(out.Results.Notes, fmt.Sprintf("threads %d, parallel %d (ppl, rouge), batch size %d", r.opts.Threads, r.opts.Parallel, r.opts.BatchSize))
	if ro.Out != "" {
		files, err := out.Results.WriteAll(ro.Out)
		out.Files = files
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// settingNotes are the notes that say what a run compares: the model, the
// policies and budgets, the selection, an ablation, the protocol.
func (r *Runner) settingNotes() []string {
	notes := []string{fmt.Sprintf("model %s%s", r.opts.Model, ifNotEmpty(", projector ", r.opts.MMProj))}
	var pols []string
	for _, c := range r.Configs()[1:] {
		if !slices.Contains(pols, string(c.Policy())) {
			pols = append(pols, string(c.Policy()))
		}
	}
	notes = append(notes, fmt.Sprintf("policies %s at budgets %s, against full; sink %d, distance %d",
		strings.Join(append([]string{}, pols...), ", "), joinFloats(r.opts.Budgets), r.opts.Sink, r.opts.Distance))
	if sel := r.opts.Selection; sel != "" && sel != elasticcache.PaperSelection {
		notes = append(notes, fmt.Sprintf("selection %s for every compressed setting", sel))
	}
	if r.opts.EvictMerged {
		notes = append(notes, "ablation: elastic evicts the entries it would merge (same anchors)")
	}
	return append(notes, r.opts.ProtocolNote())
}

// loadSamples loads the dataset that ppl and rouge score and picks the
// samples evaluated.
func (r *Runner) loadSamples(ro RunOptions, out *RunResult) error {
	if ro.Data == "" {
		return errors.New("ppl and rouge need a dataset (--data)")
	}
	set, err := dataset.Load(ro.Data, ro.Images)
	if err != nil {
		return err
	}
	for _, s := range set.Skipped {
		r.printf("elastic-eval: skipping %s", s)
	}
	out.Dataset = set
	out.Samples = dataset.Select(set.Samples, ro.MaxSamples, r.opts.Seed)
	out.Results.Notes = append(out.Results.Notes, fmt.Sprintf("dataset %s (%s layout): %d usable entries, %d skipped while loading; %d evaluated (seed %d)",
		ro.Data, set.Format, len(set.Samples), len(set.Skipped), len(out.Samples), r.opts.Seed))
	if len(out.Samples) == 0 {
		return fmt.Errorf("dataset %s has no usable sample", ro.Data)
	}
	return nil
}

// runMetric runs metric m, adds its rows and notes to out, and returns its
// rows over groups of samples (which go last).
func (r *Runner) runMetric(ctx context.Context, m string, ro RunOptions, out *RunResult) ([]report.Row, error) {
	notes := &out.Results.Notes
	switch m {
	case report.PPL:
		q, err := r.PPL(ctx, out.Samples)
		if err != nil {
			return nil, fmt.Errorf("ppl: %w", err)
		}
		out.PPL = q
		out.Results.Rows = append(out.Results.Rows, q.Rows...)
		*notes = append(*notes, fmt.Sprintf("ppl: %d samples scored, %d skipped; %d answer tokens", len(q.Samples), len(q.Skipped), q.Rows[0].Tokens))
		*notes = appendSplitNote(*notes, q)
		return q.KindRows, nil
	case report.ROUGE:
		q, err := r.ROUGE(ctx, out.Samples)
		if err != nil {
			return nil, fmt.Errorf("rouge: %w", err)
		}
		out.ROUGE = q
		out.Results.Rows = append(out.Results.Rows, q.Rows...)
		*notes = append(*notes, fmt.Sprintf("rouge: %d samples scored, %d skipped; %d greedy tokens per sample; accuracy on %d short-answer samples",
			len(q.Samples), len(q.Skipped), r.opts.MaxTokens, q.Rows[0].AccN))
		*notes = appendSplitNote(*notes, q)
		return q.KindRows, nil
	case report.Latency:
		l, err := r.Latency(ctx, ro.Latency)
		if err != nil {
			return nil, err
		}
		out.Latency = l
		out.Results.Rows = append(out.Results.Rows, l.Rows...)
		*notes = append(*notes, fmt.Sprintf("latency: B=%d sequences, P=%d prompt tokens, G=%d generated, %d KV cells, %d run(s) per setting (median kept)",
			l.Options.Batch, l.PromptTokens, l.Options.GenTokens, l.CtxSize, l.Options.Repeat))
		*notes = append(*notes, l.Notes...)
	}
	return nil, nil
}

// appendSplitNote says how a ppl or rouge run's samples split into long and
// short answers, when they do.
func appendSplitNote(notes []string, q *Quality) []string {
	long, short := 0, 0
	for _, rw := range q.KindRows {
		if rw.Policy != report.FullPolicy {
			continue
		}
		switch rw.Kind {
		case report.KindLong:
			long = rw.Samples
		case report.KindShort:
			short = rw.Samples
		}
	}
	if long+short == 0 {
		return notes
	}
	return append(notes, fmt.Sprintf("%s: also reported apart: %d long-answer samples (descriptions: PPL, ROUGE) and %d short-answer samples (accuracy)",
		q.Metric, long, short))
}

func (r *Runner) printf(format string, args ...any) {
	if r.opts.Progress != nil {
		fmt.Fprintf(r.opts.Progress, format+"\n", args...)
	}
}

func ifNotEmpty(prefix, s string) string {
	if s == "" {
		return ""
	}
	return prefix + s
}

func joinFloats(v []float64) string {
	s := make([]string, len(v))
	for i, f := range v {
		s[i] = fmt.Sprintf("%g", f)
	}
	return strings.Join(s, ", ")
}
