package report

import (
	"encoding/csv"
	"image/png"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func sample() *Results {
	res := &Results{Title: "tiny.gguf", Notes: []string{"4 samples"}}
	res.Rows = append(res.Rows, Row{Metric: PPL, Policy: "full", Budget: 1, Samples: 4, PPL: 10, NLL: 23.02585, Tokens: 10, PeakCells: 200})
	res.Rows = append(res.Rows, Row{Metric: ROUGE, Policy: "full", Budget: 1, Samples: 4, ROUGE1: 1, ROUGE2: 1, ROUGEL: 1, Accuracy: 0.5, AccN: 2})
	res.Rows = append(res.Rows, Row{Metric: Latency, Policy: "full", Budget: 1, Samples: 2, Batch: 2, PromptTokens: 300, TotalMs: 100, Speedup: 1, DecodeTokS: 50, PeakCells: 700})
	for _, p := range []string{"elastic", "h2o", "local"} {
		for _, b := range []float64{0.8, 0.2, 0.5} { // out of order on purpose
			res.Rows = append(res.Rows,
				Row{Metric: PPL, Policy: p, Budget: b, Samples: 4, PPL: 10 + 5*(1-b), Tokens: 10, Kept: 100 * b, Merged: 3},
				Row{Metric: ROUGE, Policy: p, Budget: b, Samples: 4, ROUGE1: b, ROUGE2: b * b, ROUGEL: b, Accuracy: 0.5, AccN: 2},
				Row{Metric: Latency, Policy: p, Budget: b, Samples: 2, Batch: 2, TotalMs: 100 * b, Speedup: 1 / b, DecodeTokS: 50 / b, PeakCells: 700 * b})
		}
	}
	return res
}

func TestWriteAllFilesParse(t *testing.T) {
	dir := t.TempDir()
	files, err := sample().WriteAll(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(dir, "results.csv"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1+3+27 || !slices.Equal(recs[0], CSVHeader()) {
		t.Fatalf("%d records, header %v", len(recs), recs[0])
	}
	col := func(name string) int { return slices.Index(recs[0], name) }
	if recs[1][col("ppl")] != "10" || recs[1][col("rouge1")] != "" || recs[2][col("rougeL")] != "1" || recs[3][col("speedup")] != "1" {
		t.Fatalf("rows: %v / %v / %v", recs[1], recs[2], recs[3])
	}
	md, err := os.ReadFile(filepath.Join(dir, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"# tiny.gguf", "| policy | budget | n | PPL | vs full |", "| elastic | 0.2 | 4 | 14.0000 | +40.00% |",
		"ROUGE-L", "accuracy", "decode tok/s", "speedup"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	var pngs []string
	for _, p := range files {
		if strings.HasSuffix(p, ".png") {
			pngs = append(pngs, filepath.Base(p))
			r, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			img, err := png.Decode(r)
			r.Close()
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			if b := img.Bounds(); b.Dx() < 300 || b.Dy() < 200 {
				t.Fatalf("%s is %v", p, b)
			}
		}
	}
	want := []string{"ppl.png", "rouge1.png", "rouge2.png", "rougeL.png", "accuracy.png", "decode_tok_s.png", "total_ms.png", "speedup.png", "latency_peak_cells.png"}
	if !slices.Equal(pngs, want) {
		t.Fatalf("plots %v, want %v", pngs, want)
	}
}

func TestFlatValuesAndNoFullStillPlot(t *testing.T) {
	res := &Results{Rows: []Row{{Metric: PPL, Policy: "local", Budget: 0.5, PPL: 3}, {Metric: PPL, Policy: "local", Budget: 1, PPL: 3}}}
	files, err := res.Plots(t.TempDir())
	if err != nil || len(files) != 1 {
		t.Fatalf("%v %v", files, err)
	}
	if strings.Contains(res.Markdown(), "%") {
		t.Fatalf("a change against full was printed without a full row:\n%s", res.Markdown())
	}
}

// Rows of the long and short answers get the kind column in the CSV, their own
// markdown sub-sections (PPL compared with full of the same group) and their
// own plots; the rows of all samples are written as before.
func TestKindRows(t *testing.T) {
	res := sample()
	base := len(res.Rows)
	for _, k := range []struct {
		kind string
		n    int
		ppl  float64
		accN int
	}{{KindLong, 3, 20, 0}, {KindShort, 1, 2, 1}} {
		res.Rows = append(res.Rows,
			Row{Metric: PPL, Policy: "full", Budget: 1, Samples: k.n, Kind: k.kind, PPL: k.ppl, Tokens: 5},
			Row{Metric: PPL, Policy: "elastic", Budget: 0.5, Samples: k.n, Kind: k.kind, PPL: 1.5 * k.ppl, Tokens: 5},
			Row{Metric: ROUGE, Policy: "full", Budget: 1, Samples: k.n, Kind: k.kind, ROUGEL: 1, Accuracy: 1, AccN: k.accN},
			Row{Metric: ROUGE, Policy: "elastic", Budget: 0.5, Samples: k.n, Kind: k.kind, ROUGEL: 0.5, Accuracy: 0, AccN: k.accN})
	}
	dir := t.TempDir()
	files, err := res.WriteAll(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(dir, "results.csv"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	kind := slices.Index(recs[0], "kind")
	if len(recs) != 1+base+8 || kind != len(recs[0])-1 {
		t.Fatalf("%d records, kind column %d of %d", len(recs), kind, len(recs[0]))
	}
	want := map[int]string{1: "all", 2: "all", 3: "", base + 1: "long", base + 5: "short"}
	for i, k := range want {
		if recs[i][kind] != k {
			t.Errorf("record %d (%s): kind %q, want %q", i, recs[i][0], recs[i][kind], k)
		}
	}
	md := res.Markdown()
	for _, w := range []string{"### Long answers (descriptions)\n\n| policy | budget | n | PPL | vs full |",
		"| elastic | 0.5 | 3 | 30.0000 | +50.00% |", "| elastic | 0.5 | 1 | 3.0000 | +50.00% |", "### Short exact answers"} {
		if !strings.Contains(md, w) {
			t.Errorf("markdown lacks %q:\n%s", w, md)
		}
	}
	// The long answers' ROUGE table has no accuracy column (acc n is 0 there).
	i := strings.LastIndex(md, "### Long answers")
	if j := strings.Index(md[i:], "accuracy"); j >= 0 && j < strings.Index(md[i:], "### Short") {
		t.Errorf("long answers' ROUGE table shows accuracy:\n%s", md[i:])
	}
	var pngs []string
	for _, p := range files {
		pngs = append(pngs, filepath.Base(p))
	}
	for _, w := range []string{"ppl.png", "rougeL.png", "ppl_long.png", "rougeL_long.png", "accuracy_short.png", "ppl_short.png"} {
		if !slices.Contains(pngs, w) {
			t.Errorf("no %s in %v", w, pngs)
		}
	}
	if slices.Contains(pngs, "accuracy_long.png") {
		t.Errorf("accuracy plotted for long answers: %v", pngs)
	}
}
