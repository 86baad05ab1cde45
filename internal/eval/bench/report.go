package bench

import (
	"encoding/csv"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// columns of the table and the CSV, in order: the CSV's name, the markdown
// header, and the cell of a level.
var columns = []struct {
	csv, md string
	cell    func(r *Result, lv *Level) string
}{
	{"server", "server", func(r *Result, _ *Level) string { return r.Label }},
	{"concurrency", "conc.", func(_ *Result, lv *Level) string { return strconv.Itoa(lv.Concurrency) }},
	{"requests", "req.", func(_ *Result, lv *Level) string { return strconv.Itoa(lv.Requests) }},
	{"failed", "failed", func(_ *Result, lv *Level) string { return strconv.Itoa(lv.Failed) }},
	{"ttft_p50_ms", "TTFT p50 ms", msCell(func(lv *Level) Dist { return lv.TTFT }, p50)},
	{"ttft_p90_ms", "p90", msCell(func(lv *Level) Dist { return lv.TTFT }, p90)},
	{"ttft_p99_ms", "p99", msCell(func(lv *Level) Dist { return lv.TTFT }, p99)},
	{"itl_p50_ms", "ITL p50 ms", msCell(func(lv *Level) Dist { return lv.ITL }, p50)},
	{"itl_p90_ms", "p90", msCell(func(lv *Level) Dist { return lv.ITL }, p90)},
	{"itl_p99_ms", "p99", msCell(func(lv *Level) Dist { return lv.ITL }, p99)},
	{"tpot_p50_ms", "TPOT p50 ms", msCell(func(lv *Level) Dist { return lv.TPOT }, p50)},
	{"tpot_p90_ms", "p90", msCell(func(lv *Level) Dist { return lv.TPOT }, p90)},
	{"e2e_p50_ms", "E2E p50 ms", msCell(func(lv *Level) Dist { return lv.E2E }, p50)},
	{"e2e_p90_ms", "p90", msCell(func(lv *Level) Dist { return lv.E2E }, p90)},
	{"e2e_p99_ms", "p99", msCell(func(lv *Level) Dist { return lv.E2E }, p99)},
	{"req_per_s", "req/s", func(_ *Result, lv *Level) string { return fmt.Sprintf("%.2f", lv.ReqPerSec) }},
	{"output_tok_per_s", "out tok/s", func(_ *Result, lv *Level) string { return fmt.Sprintf("%.1f", lv.OutTokPerSec) }},
	{"output_tokens_per_req", "out tok/req", func(_ *Result, lv *Level) string {
		if lv.OK == 0 {
			return ""
		}
		return fmt.Sprintf("%.1f", float64(lv.OutputTokens)/float64(lv.OK))
	}},
	{"prompt_tokens_per_req", "prompt tok/req", func(_ *Result, lv *Level) string {
		if lv.OK == 0 || lv.UsageMissing == lv.OK {
			return ""
		}
		return fmt.Sprintf("%.1f", float64(lv.PromptTokens)/float64(lv.OK-lv.UsageMissing))
	}},
	{"kv_policy", "KV policy", kvCell(func(k *KVSummary) string { return k.Policy + " " + strconv.FormatFloat(k.Budget, 'g', -1, 64) })},
	{"kv_peak_cells", "KV peak cells", kvCell(func(k *KVSummary) string { return fmt.Sprintf("%.1f", k.PeakCells) })},
	{"kv_final_cells", "KV final cells", kvCell(func(k *KVSummary) string { return fmt.Sprintf("%.1f", k.FinalCells) })},
	{"kv_bytes_saved", "KV bytes saved", kvCell(func(k *KVSummary) string { return fmt.Sprintf("%.0f", k.BytesSaved) })},
	{"errors", "errors", func(_ *Result, lv *Level) string { return errorKinds(lv.Errors) }},
}

func p50(d Dist) float64 { return d.P50 }
func p90(d Dist) float64 { return d.P90 }
func p99(d Dist) float64 { return d.P99 }

// msCell renders a percentile of a distribution; blank when it has no samples.
func msCell(of func(*Level) Dist, p func(Dist) float64) func(*Result, *Level) string {
	return func(_ *Result, lv *Level) string {
		d := of(lv)
		if d.N == 0 {
			return ""
		}
		return fmt.Sprintf("%.1f", p(d))
	}
}

// kvCell is blank when the server reported no kv_cache.
func kvCell(f func(*KVSummary) string) func(*Result, *Level) string {
	return func(_ *Result, lv *Level) string {
		if lv.KV == nil {
			return ""
		}
		return f(lv.KV)
	}
}

// Header is the CSV header row.
func Header() []string {
	h := make([]string, len(columns))
	for i, c := range columns {
		h[i] = c.csv
	}
	return h
}

// Rows are the CSV rows, one per level.
func (r *Result) Rows() [][]string {
	out := make([][]string, len(r.Levels))
	for i := range r.Levels {
		row := make([]string, len(columns))
		for j, c := range columns {
			row[j] = c.cell(r, &r.Levels[i])
		}
		out[i] = row
	}
	return out
}

// Markdown is the results as a markdown table (header included).
func (r *Result) Markdown() string {
	var b strings.Builder
	b.WriteString("|")
	sep := "|"
	for i, c := range columns {
		b.WriteString(" " + c.md + " |")
		if i == 0 || c.csv == "kv_policy" || c.csv == "errors" {
			sep += " --- |"
		} else {
			sep += " ---: |"
		}
	}
	b.WriteString("\n" + sep + "\n")
	for _, row := range r.Rows() {
		b.WriteString("|")
		for _, cell := range row {
			b.WriteString(" " + strings.ReplaceAll(cell, "|", "/") + " |")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// WriteCSV writes the header and one row per level.
func (r *Result) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(Header()); err != nil {
		return err
	}
	if err := cw.WriteAll(r.Rows()); err != nil {
		return err
	}
	cw.Flush()
	return cw.Error()
}

// WriteFiles writes bench.csv and bench.md in dir (created if needed) and
// returns their paths.
func (r *Result) WriteFiles(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var buf strings.Builder
	if err := r.WriteCSV(&buf); err != nil {
		return nil, err
	}
	csvPath := filepath.Join(dir, "bench.csv")
	mdPath := filepath.Join(dir, "bench.md")
	if err := os.WriteFile(csvPath, []byte(buf.String()), 0o644); err != nil {
		return nil, err
	}
	md := fmt.Sprintf("Serving benchmark: %s (%s), model %q\n\n%s", r.Label, r.URL, r.Model, r.Markdown())
	if err := os.WriteFile(mdPath, []byte(md), 0o644); err != nil {
		return nil, err
	}
	return []string{csvPath, mdPath}, nil
}
