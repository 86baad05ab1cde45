package integration

import (
	"context"
	"encoding/csv"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/internal/eval/bench"
)

// The serving benchmark (elastic-eval bench's package) against the real
// server: two concurrency levels of picture prompts under elastic 0.5. Every
// request succeeds, the latencies are ordered as they must be, the usage and
// the kv_cache extension are read from the final chunk, and the CSV has a
// row per level.
func TestServingBenchmarkAgainstTheServer(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	const maxTokens = 8
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := bench.Run(ctx, bench.Options{
		URL: s.URL + "/v1", Label: "elasticserve",
		Concurrency: []int{1, 3}, Requests: 3, MaxTokens: maxTokens, PromptWords: 24, Seed: 3, Warmup: 1,
		Image: redCircle(t), Timeout: time.Minute,
		Extra: map[string]any{"elastic_cache": map[string]any{"policy": "elastic", "budget": 0.5}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Levels) != 2 {
		t.Fatalf("%d levels, want 2", len(res.Levels))
	}
	for _, lv := range res.Levels {
		if lv.OK != 3 || lv.Failed != 0 {
			t.Fatalf("concurrency %d: ok %d failed %d (%s)", lv.Concurrency, lv.OK, lv.Failed, lv.FirstError)
		}
		if lv.UsageMissing != 0 || lv.OutputTokens <= 0 || lv.OutputTokens > 3*maxTokens {
			t.Errorf("concurrency %d: usage missing %d, output tokens %d (want 1..%d)", lv.Concurrency, lv.UsageMissing, lv.OutputTokens, 3*maxTokens)
		}
		// A picture prompt is longer than its image's tokens (144 for the test model).
		if lv.PromptTokens < 3*144 {
			t.Errorf("concurrency %d: prompt tokens %d, want >= %d", lv.Concurrency, lv.PromptTokens, 3*144)
		}
		if lv.TTFT.N != 3 || !(lv.TTFT.P50 > 0 && lv.TTFT.P50 <= lv.E2E.P50 && lv.E2E.P99 <= float64(lv.Wall.Milliseconds())+1) {
			t.Errorf("concurrency %d: TTFT %+v, E2E %+v, wall %v", lv.Concurrency, lv.TTFT, lv.E2E, lv.Wall)
		}
		if lv.ReqPerSec <= 0 || lv.OutTokPerSec <= 0 {
			t.Errorf("concurrency %d: %v req/s, %v tok/s", lv.Concurrency, lv.ReqPerSec, lv.OutTokPerSec)
		}
		kv := lv.KV
		if kv == nil || kv.Reports != 3 || kv.Policy != "elastic" || kv.Budget != 0.5 {
			t.Fatalf("concurrency %d: kv_cache %+v, want 3 elastic 0.5 reports", lv.Concurrency, kv)
		}
		// Elastic 0.5 keeps about half the prompt: fewer cells than prompt tokens,
		// and bytes saved against full.
		perReq := float64(lv.PromptTokens) / 3
		if !(kv.PeakCells > 0 && kv.FinalCells > 0 && kv.FinalCells < perReq && kv.BytesSaved > 0) {
			t.Errorf("concurrency %d: kv %+v with %.0f prompt tokens per request", lv.Concurrency, kv, perReq)
		}
	}
	files, err := res.WriteFiles(filepath.Join(t.TempDir(), "bench"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(files[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 {
		t.Fatalf("bench.csv has %d records, want a header and 2 rows", len(recs))
	}
	col := map[string]int{}
	for i, h := range recs[0] {
		col[h] = i
	}
	for i, rec := range recs[1:] {
		if rec[col["server"]] != "elasticserve" || rec[col["concurrency"]] != []string{"1", "3"}[i] || rec[col["failed"]] != "0" {
			t.Errorf("row %d: %q", i, rec)
		}
		// (Not itl: the random model's byte tokens can leave a request with one
		// content chunk; tpot counts tokens from usage.)
		for _, name := range []string{"ttft_p50_ms", "tpot_p50_ms", "e2e_p99_ms", "output_tok_per_s", "kv_peak_cells", "kv_bytes_saved"} {
			if v, err := strconv.ParseFloat(rec[col[name]], 64); err != nil || v < 0 {
				t.Errorf("row %d: %s = %q", i, name, rec[col[name]])
			}
		}
	}
	if md := res.Markdown(); strings.Count(md, "| elasticserve |") != 2 {
		t.Errorf("markdown:\n%s", md)
	}
}
