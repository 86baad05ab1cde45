package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// explain takes --policy and --budget (not the plural flags), needs --data,
// prints the per-layer table and writes explain.md and explain.csv.
func TestExplainCommand(t *testing.T) {
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"explain", "--model", "m.gguf"}, "--data is required for explain"},
		{[]string{"explain", "--model", "m.gguf", "--data", "d.json", "--budgets", "0.5"}, "flag provided but not defined: -budgets"},
		{[]string{"explain", "--model", "m.gguf", "--data", "d.json", "--policy", "lru"}, `unknown policy "lru"`},
	} {
		if code, _, stderr := runCLI(c.args...); code != 2 || !strings.Contains(stderr, c.msg) {
			t.Errorf("%v: exit %d, %q; want 2 and %q", c.args, code, stderr, c.msg)
		}
	}
	dir := t.TempDir()
	if code, out, stderr := runCLI("gen-data", "--out", dir, "--n", "1", "--kinds", "describe,color"); code != 0 {
		t.Fatalf("gen-data: %d\n%s%s", code, out, stderr)
	}
	mp, vp, err := testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	res := filepath.Join(dir, "res")
	code, out, stderr := runCLI("explain", "--model", mp, "--mmproj", vp, "--data", filepath.Join(dir, "data.json"),
		"--policy", "elastic", "--budget", "0.5", "--layout", "question-first", "--sink", "1", "--max-tokens", "8",
		"--threads", "1", "--quiet", "--out", res)
	if code != 0 {
		t.Fatalf("explain: exit %d\n%s", code, stderr)
	}
	for _, want := range []string{"## elastic@0.5: 2 samples", "| all | image |", "| all | question |", "| 0 | template |", "layout question-first, no system prompt, sink 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	for _, f := range []string{"explain.md", "explain.csv"} {
		if st, err := os.Stat(filepath.Join(res, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}
