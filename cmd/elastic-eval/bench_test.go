package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

func TestBenchUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"bench"}, "--url is required"},
		{[]string{"bench", "--url", "http://x/v1", "--concurrency", "1,0"}, `concurrency "0"`},
		{[]string{"bench", "--url", "http://x/v1", "--body", "[1]"}, "--body is not a JSON object"},
		{[]string{"bench", "--url", "http://x/v1", "--requests", "0"}, "must be positive"},
	} {
		code, _, stderr := runCLI(c.args...)
		if code != 2 || !strings.Contains(stderr, c.msg) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", c.args, code, stderr, c.msg)
		}
	}
}

// The command against a streaming fake: the table on stdout, the files in --out,
// the flags in the requests.
func TestBenchCommand(t *testing.T) {
	var requests atomic.Int64
	var sawBudget, sawKey, sawImage atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		var body struct {
			MaxTokens    int            `json:"max_tokens"`
			ElasticCache map[string]any `json:"elastic_cache"`
			Messages     []struct {
				Content json.RawMessage `json:"content"`
			} `json:"messages"`
		}
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		sawBudget.Store(body.ElasticCache["budget"] == 0.2)
		sawKey.Store(r.Header.Get("Authorization") == "Bearer k")
		sawImage.Store(strings.Contains(string(body.Messages[0].Content), "data:image/png;base64,"))
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range body.MaxTokens {
			fmt.Fprintf(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"w%d \"}}]}\n\n", i)
		}
		fmt.Fprintf(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":%d},"+
			"\"kv_cache\":{\"policy\":\"elastic\",\"budget\":0.2,\"peak_cells\":30,\"final_cells\":20,\"bytes_saved\":999}}\n\ndata: [DONE]\n\n", body.MaxTokens)
	}))
	defer srv.Close()
	dir := t.TempDir()
	img := filepath.Join(dir, "x.png")
	if err := os.WriteFile(img, []byte("\x89PNG\r\n\x1a\nrest"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	code, stdout, stderr := runCLI("bench", "--url", srv.URL+"/v1", "--api-key", "k", "--concurrency", "1,2", "--requests", "3",
		"--max-tokens", "4", "--image", img, "--body", `{"elastic_cache":{"policy":"elastic","budget":0.2}}`, "--label", "fake", "--out", out)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if got := requests.Load(); got != 1+2*3 {
		t.Errorf("%d requests, want 7 (warmup + 3 per level)", got)
	}
	if !sawBudget.Load() || !sawKey.Load() || !sawImage.Load() {
		t.Errorf("request lacked a flag's effect: budget %v key %v image %v", sawBudget.Load(), sawKey.Load(), sawImage.Load())
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[2], "| fake | 1 | 3 | 0 |") || !strings.HasPrefix(lines[3], "| fake | 2 | 3 | 0 |") ||
		!strings.Contains(lines[2], "| elastic 0.2 | 30.0 | 20.0 | 999 |") {
		t.Errorf("table:\n%s", stdout)
	}
	b, err := os.ReadFile(filepath.Join(out, "bench.csv"))
	if err != nil {
		t.Fatal(err)
	}
	if rows := strings.Split(strings.TrimSpace(string(b)), "\n"); len(rows) != 3 || !strings.HasPrefix(rows[0], "server,concurrency,") {
		t.Errorf("bench.csv:\n%s", b)
	}
	if _, err := os.Stat(filepath.Join(out, "bench.md")); err != nil {
		t.Error(err)
	}
}
