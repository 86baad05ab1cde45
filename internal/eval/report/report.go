// Package report turns elastic-eval measurements into a CSV file, a markdown
// table and PNG plots of each metric against the KV budget (one line per
// policy, and a flat dashed line for the uncompressed "full" cache, like the
// figures of the Elastic Cache paper).
package report

import (
	"encoding/csv"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The metrics.
const (
	PPL     = "ppl"
	ROUGE   = "rouge"
	Latency = "latency"
)

// FullPolicy is the policy name of the uncompressed baseline.
const FullPolicy = "full"

// The sample groups of Row.Kind (ppl and rouge).
const (
	KindAll   = "all"   // every sample scored (Row.Kind "" means the same)
	KindLong  = "long"  // long answers: descriptions
	KindShort = "short" // short exact answers (color, count, position, yes/no)
)

// Kinds lists the sample groups in the order they are reported.
var Kinds = []string{KindAll, KindLong, KindShort}

// Row is one policy and budget of one metric. Fields that do not belong to the
// row's metric are left zero and are not written.
type Row struct {
	Metric  string
	Policy  string
	Budget  float64
	Samples int // samples scored (ppl, rouge) or sequences run (latency)
	// Kind is the group of samples a ppl or rouge row is computed on: KindAll
	// ("" means the same), KindLong or KindShort. Latency rows have none.
	Kind string

	// ppl: exp(NLL / Tokens) over the whole set.
	PPL    float64
	NLL    float64
	Tokens int

	// rouge: mean F1 against the full cache's output; Accuracy over the AccN
	// samples that have a short exact answer (answer.Correct).
	ROUGE1, ROUGE2, ROUGEL float64
	Accuracy               float64
	AccN                   int

	// Cache use, mean per sample (ppl, rouge) or per sequence (latency).
	Kept, Merged, Evicted float64
	// PeakCells: ppl and rouge, mean of each sample's peak cells; latency, the
	// largest number of cells held at once by all sequences together.
	PeakCells float64

	// latency
	Batch        int
	PromptTokens int
	GenTokens    float64 // mean generated tokens per sequence
	PrefillMs    float64 // mean per sequence: prompt encoding
	CompressMs   float64 // mean per sequence: the prefill plan (capture read-out, merge, rewrite)
	DecodeMs     float64 // mean per sequence: generation
	DecodeTokS   float64 // batched decode: tokens decoded after the batch's last prompt encoding / their wall time
	TotalMs      float64 // wall time from submitting the batch to its last token
	Speedup      float64 // full's TotalMs / this row's TotalMs, same run
	Attended     float64 // mean attention span of a decode step, in cells (llama.cpp pads it)
}

// Results is one evaluation run.
type Results struct {
	Title string   // e.g. the model file
	Notes []string // lines printed under the title (dataset, skips, settings)
	Rows  []Row
}

// column describes one value column.
type column struct {
	key     string // CSV header and plot file stem
	title   string // markdown header and plot axis
	metrics []string
	prec    int
	get     func(Row) float64
	plot    bool
	better  string // "lower" or "higher", for the plot title
}

var columns = []column{
	{key: "ppl", title: "PPL", metrics: []string{PPL}, prec: 4, get: func(r Row) float64 { return r.PPL }, plot: true, better: "lower"},
	{key: "nll", title: "NLL", metrics: []string{PPL}, prec: 4, get: func(r Row) float64 { return r.NLL }},
	{key: "tokens", title: "tokens", metrics: []string{PPL}, get: func(r Row) float64 { return float64(r.Tokens) }},
	{key: "rouge1", title: "ROUGE-1", metrics: []string{ROUGE}, prec: 4, get: func(r Row) float64 { return r.ROUGE1 }, plot: true, better: "higher"},
	{key: "rouge2", title: "ROUGE-2", metrics: []string{ROUGE}, prec: 4, get: func(r Row) float64 { return r.ROUGE2 }, plot: true, better: "higher"},
	{key: "rougeL", title: "ROUGE-L", metrics: []string{ROUGE}, prec: 4, get: func(r Row) float64 { return r.ROUGEL }, plot: true, better: "higher"},
	{key: "accuracy", title: "accuracy", metrics: []string{ROUGE}, prec: 4, get: func(r Row) float64 { return r.Accuracy }, plot: true, better: "higher"},
	{key: "acc_n", title: "acc n", metrics: []string{ROUGE}, get: func(r Row) float64 { return float64(r.AccN) }},
	{key: "batch", title: "B", metrics: []string{Latency}, get: func(r Row) float64 { return float64(r.Batch) }},
	{key: "prompt_tokens", title: "P", metrics: []string{Latency}, get: func(r Row) float64 { return float64(r.PromptTokens) }},
	{key: "gen_tokens", title: "G", metrics: []string{Latency}, prec: 1, get: func(r Row) float64 { return r.GenTokens }},
	{key: "prefill_ms", title: "prefill ms", metrics: []string{Latency}, prec: 1, get: func(r Row) float64 { return r.PrefillMs }},
	{key: "compress_ms", title: "compress ms", metrics: []string{Latency}, prec: 2, get: func(r Row) float64 { return r.CompressMs }},
	{key: "decode_ms", title: "decode ms", metrics: []string{Latency}, prec: 1, get: func(r Row) float64 { return r.DecodeMs }},
	{key: "decode_tok_s", title: "decode tok/s", metrics: []string{Latency}, prec: 1, get: func(r Row) float64 { return r.DecodeTokS }, plot: true, better: "higher"},
	{key: "total_ms", title: "total ms", metrics: []string{Latency}, prec: 1, get: func(r Row) float64 { return r.TotalMs }, plot: true, better: "lower"},
	{key: "speedup", title: "speedup", metrics: []string{Latency}, prec: 3, get: func(r Row) float64 { return r.Speedup }, plot: true, better: "higher"},
	{key: "attended", title: "attended cells", metrics: []string{Latency}, prec: 1, get: func(r Row) float64 { return r.Attended }},
	{key: "peak_cells", title: "peak KV cells", metrics: []string{PPL, ROUGE, Latency}, prec: 1, get: func(r Row) float64 { return r.PeakCells }, plot: true, better: "lower"},
	{key: "kept", title: "kept", metrics: []string{PPL, ROUGE, Latency}, prec: 1, get: func(r Row) float64 { return r.Kept }},
	{key: "merged", title: "merged", metrics: []string{PPL, ROUGE, Latency}, prec: 1, get: func(r Row) float64 { return r.Merged }},
	{key: "evicted", title: "evicted", metrics: []string{PPL, ROUGE, Latency}, prec: 1, get: func(r Row) float64 { return r.Evicted }},
}

// Group is the row's sample group: Kind, with "" read as KindAll for ppl and
// rouge rows; "" for latency rows.
func (r Row) Group() string {
	if r.Metric == Latency {
		return ""
	}
	if r.Kind == "" {
		return KindAll
	}
	return r.Kind
}

func (c column) applies(r Row) bool {
	if !slices.Contains(c.metrics, r.Metric) {
		return false
	}
	return c.key != "accuracy" || r.AccN > 0
}

// Metrics returns the metrics present, in the order ppl, rouge, latency.
func (res *Results) Metrics() []string {
	var out []string
	for _, m := range []string{PPL, ROUGE, Latency} {
		if slices.ContainsFunc(res.Rows, func(r Row) bool { return r.Metric == m }) {
			out = append(out, m)
		}
	}
	return out
}

// CSVHeader is the first line of WriteCSV. The last column, kind, is the
// row's sample group (Row.Group): all, long or short; empty for latency.
func CSVHeader() []string {
	h := []string{"metric", "policy", "budget", "samples"}
	for _, c := range columns {
		h = append(h, c.key)
	}
	return append(h, "kind")
}

// WriteCSV writes one line per row, in the order of Rows; values that do not
// apply are empty.
func (res *Results) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(CSVHeader()); err != nil {
		return err
	}
	for _, r := range res.Rows {
		rec := []string{r.Metric, r.Policy, strconv.FormatFloat(r.Budget, 'g', -1, 64), strconv.Itoa(r.Samples)}
		for _, c := range columns {
			v := ""
			if c.applies(r) {
				v = strconv.FormatFloat(c.get(r), 'g', -1, 64)
			}
			rec = append(rec, v)
		}
		rec = append(rec, r.Group())
		if err := cw.Write(rec); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

var sectionTitles = map[string]string{
	PPL:     "Perplexity of the reference answers (teacher forcing; lower is better)",
	ROUGE:   "ROUGE F1 of greedy output against the full cache's output (higher is better)",
	Latency: "Latency",
}

// KindTitles name the sample groups in the markdown sub-sections and plot titles.
var KindTitles = map[string]string{
	KindLong:  "Long answers (descriptions)",
	KindShort: "Short exact answers",
}

// Markdown renders a section per metric with a table of its columns over all
// samples, then, when there are rows for them, one sub-section per sample
// group (long answers, short answers) with the same columns.
func (res *Results) Markdown() string {
	var b strings.Builder
	if res.Title != "" {
		fmt.Fprintf(&b, "# %s\n\n", res.Title)
	}
	for _, n := range res.Notes {
		fmt.Fprintf(&b, "- %s\n", n)
	}
	if len(res.Notes) > 0 {
		b.WriteString("\n")
	}
	for _, m := range res.Metrics() {
		fmt.Fprintf(&b, "## %s\n\n", sectionTitles[m])
		for _, k := range res.groups(m) {
			rows := res.rowsOf(m, k)
			if k != KindAll && k != "" {
				fmt.Fprintf(&b, "### %s\n\n", kindTitle(k))
			}
			res.table(&b, m, k, rows)
		}
	}
	return b.String()
}

func kindTitle(k string) string {
	if t, ok := KindTitles[k]; ok {
		return t
	}
	return "Samples of kind " + k
}

// groups lists the sample groups that have rows of the metric: "" for latency,
// else KindAll, KindLong, KindShort (then any other), in that order.
func (res *Results) groups(metric string) []string {
	var out []string
	for _, r := range res.Rows {
		if r.Metric == metric && !slices.Contains(out, r.Group()) {
			out = append(out, r.Group())
		}
	}
	order := func(k string) int {
		if i := slices.Index(Kinds, k); i >= 0 {
			return i
		}
		return len(Kinds)
	}
	slices.SortStableFunc(out, func(a, b string) int { return order(a) - order(b) })
	return out
}

// table writes the markdown table of one metric's rows of one sample group.
func (res *Results) table(b *strings.Builder, m, kind string, rows []Row) {
	var cols []column
	for _, c := range columns {
		if slices.ContainsFunc(rows, c.applies) {
			cols = append(cols, c)
		}
	}
	hdr := []string{"policy", "budget", "n"}
	for _, c := range cols {
		hdr = append(hdr, c.title)
		if c.key == "ppl" {
			hdr = append(hdr, "vs full")
		}
	}
	b.WriteString("| " + strings.Join(hdr, " | ") + " |\n|")
	for i := range hdr {
		if i < 2 {
			b.WriteString(" --- |")
		} else {
			b.WriteString(" ---: |")
		}
	}
	b.WriteString("\n")
	full, hasFull := res.full(m, kind)
	for _, r := range rows {
		cells := []string{r.Policy, strconv.FormatFloat(r.Budget, 'f', -1, 64), strconv.Itoa(r.Samples)}
		for _, c := range cols {
			if !c.applies(r) {
				cells = append(cells, "")
				continue
			}
			cells = append(cells, format(c.get(r), c.prec))
			if c.key == "ppl" {
				d := ""
				if hasFull && full.PPL > 0 {
					d = fmt.Sprintf("%+.2f%%", 100*(r.PPL/full.PPL-1))
				}
				cells = append(cells, d)
			}
		}
		b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
	}
	b.WriteString("\n")
}

func format(v float64, prec int) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 0):
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}

// rowsOf returns the rows of a metric and sample group (Row.Group).
func (res *Results) rowsOf(metric, kind string) []Row {
	var out []Row
	for _, r := range res.Rows {
		if r.Metric == metric && r.Group() == kind {
			out = append(out, r)
		}
	}
	return out
}

func (res *Results) full(metric, kind string) (Row, bool) {
	for _, r := range res.Rows {
		if r.Metric == metric && r.Group() == kind && r.Policy == FullPolicy {
			return r, true
		}
	}
	return Row{}, false
}

// WriteAll writes results.csv, results.md and the plots into dir (created)
// and returns the paths written.
func (res *Results) WriteAll(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var files []string
	csvPath := filepath.Join(dir, "results.csv")
	f, err := os.Create(csvPath)
	if err != nil {
		return nil, err
	}
	if err := res.WriteCSV(f); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	files = append(files, csvPath)
	mdPath := filepath.Join(dir, "results.md")
	if err := os.WriteFile(mdPath, []byte(res.Markdown()), 0o644); err != nil {
		return nil, err
	}
	files = append(files, mdPath)
	plots, err := res.Plots(dir)
	files = append(files, plots...)
	return files, err
}
