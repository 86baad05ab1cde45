package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/internal/eval"
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

// --protocol paper sets the published scripts' layout, system prompt and sink;
// a flag given explicitly wins over the preset; default changes nothing.
func TestProtocolPreset(t *testing.T) {
	base := []string{"--model", "m.gguf", "--data", "d.json"}
	for _, c := range []struct {
		args     []string
		layout   string
		system   string
		sink     int
		protocol string
	}{
		{nil, eval.LayoutAsIs, "", elasticcache.DefaultSink, "default"},
		{[]string{"--protocol", "default"}, eval.LayoutAsIs, "", elasticcache.DefaultSink, "default"},
		{[]string{"--layout", "question-first", "--sink", "2"}, eval.LayoutQuestionFirst, "", 2, "default"},
		{[]string{"--protocol", "paper"}, eval.LayoutQuestionFirst, eval.LLaVASystem, 1, "paper"},
		{[]string{"--protocol", "paper", "--system", ""}, eval.LayoutQuestionFirst, "", 1, "paper (--system given explicitly)"},
		{[]string{"--sink", "4", "--protocol", "paper", "--layout", "as-is", "--system", "Hi."}, eval.LayoutAsIs, "Hi.", 4,
			"paper (--layout, --system, --sink given explicitly)"},
		// Given with its default value, a flag still wins.
		{[]string{"--protocol=paper", "--sink=4"}, eval.LayoutQuestionFirst, eval.LLaVASystem, 4, "paper (--sink given explicitly)"},
	} {
		o, _, err := measureFlags("rouge", append(slices.Clone(base), c.args...), io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		if o.Layout != c.layout || o.System != c.system || o.Sink != c.sink || o.Protocol != c.protocol {
			t.Errorf("%v: layout %q, system %q, sink %d, protocol %q; want %q, %q, %d, %q",
				c.args, o.Layout, o.System, o.Sink, o.Protocol, c.layout, c.system, c.sink, c.protocol)
		}
	}
	for _, c := range []struct{ args []string }{
		{[]string{"--protocol", "eccv"}},
		{[]string{"--layout", "sideways"}},
	} {
		code, _, stderr := runCLI(append(append([]string{"ppl"}, base...), c.args...)...)
		if code != 2 || !strings.Contains(stderr, c.args[1]) {
			t.Errorf("%v: exit %d, %q", c.args, code, stderr)
		}
	}
}

// A sweep under the paper protocol, with and without the system prompt, runs on
// the test model and says so in the notes; long and short answers get their
// own rows.
func TestPaperProtocolSweep(t *testing.T) {
	dir := t.TempDir()
	if code, out, stderr := runCLI("gen-data", "--out", dir, "--n", "1", "--kinds", "describe,color"); code != 0 {
		t.Fatalf("gen-data: %d\n%s%s", code, out, stderr)
	}
	mp, vp, err := testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		extra []string
		note  string
	}{
		{nil, "- protocol paper: layout question-first, LLaVA-1.5's system prompt, sink 1\n"},
		{[]string{"--system="}, "- protocol paper (--system given explicitly): layout question-first, no system prompt, sink 1\n"},
	} {
		args := append([]string{"rouge", "--model", mp, "--mmproj", vp, "--data", filepath.Join(dir, "data.json"),
			"--policies", "elastic", "--budgets", "0.5", "--max-tokens", "3", "--threads", "1", "--quiet", "--protocol", "paper"}, c.extra...)
		code, out, stderr := runCLI(args...)
		if code != 0 {
			t.Fatalf("%v: exit %d\n%s", c.extra, code, stderr)
		}
		for _, want := range []string{c.note, "### Long answers (descriptions)", "### Short exact answers", "| elastic | 0.5 | 1 |", "| elastic | 0.5 | 2 |"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v: stdout lacks %q:\n%s", c.extra, want, out)
			}
		}
	}
}
