package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

func runCLI(args ...string) (int, string, string) {
	var out, errb strings.Builder
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{nil, 2, "usage: elastic-eval"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"ppl"}, 2, "--model is required"},
		{[]string{"ppl", "--model", "m.gguf"}, 2, "--data is required for ppl"},
		{[]string{"latency", "--model", "m.gguf", "--budgets", "0.5,1.5"}, 2, `budget "1.5"`},
		{[]string{"latency", "--model", "m.gguf", "--policies", "elastic,lru"}, 2, `unknown policy "lru"`},
		{[]string{"sweep", "--model", "m.gguf", "--metrics", "speed"}, 2, `unknown metric "speed"`},
		{[]string{"latency", "--model", "m.gguf", "--data", "x.json"}, 2, "flag provided but not defined: -data"},
		{[]string{"latency", "--model", filepath.Join(t.TempDir(), "none.gguf")}, 1, "none.gguf"},
		{[]string{"gen-data"}, 2, "--out is required"},
		{[]string{"gen-data", "--out", t.TempDir(), "--kinds", "size"}, 1, `unknown question kind "size"`},
	} {
		code, _, stderr := runCLI(c.args...)
		if code != c.code || !strings.Contains(stderr, c.msg) {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", c.args, code, stderr, c.code, c.msg)
		}
	}
	if code, out, _ := runCLI("help"); code != 0 || !strings.Contains(out, "gen-data") {
		t.Errorf("help: %d %q", code, out)
	}
}

// gen-data, then a small sweep through the command line on the test model.
func TestGenDataThenSweep(t *testing.T) {
	dir := t.TempDir()
	code, out, stderr := runCLI("gen-data", "--out", filepath.Join(dir, "data"), "--n", "3", "--held-out", "0.34", "--kinds", "describe,count")
	if code != 0 || !strings.Contains(out, "train.json (4 entries)") || !strings.Contains(out, "heldout.json (2 entries)") {
		t.Fatalf("gen-data: %d\n%s%s", code, out, stderr)
	}
	mp, vp, err := testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	res := filepath.Join(dir, "res")
	code, out, stderr = runCLI("sweep", "--model", mp, "--mmproj", vp, "--data", filepath.Join(dir, "data", "heldout.json"),
		"--metrics", "ppl,rouge", "--policies", "elastic,local", "--budgets", "0.4", "--max-tokens", "4", "--threads", "1", "--quiet", "--out", res)
	if code != 0 {
		t.Fatalf("sweep: exit %d\n%s", code, stderr)
	}
	for _, want := range []string{"| elastic | 0.4 | 2 |", "| local | 0.4 | 2 |", "ROUGE-L"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(stderr, "ppl: 0/") {
		t.Errorf("--quiet printed progress:\n%s", stderr)
	}
	for _, f := range []string{"results.csv", "results.md", "ppl.png", "rougeL.png"} {
		if st, err := os.Stat(filepath.Join(res, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}
