// Command elastic-eval measures what Elastic Cache costs and saves on a GGUF
// model, in process (no server): perplexity of reference answers, ROUGE of
// greedy output against the uncompressed cache, and latency of a batch of long
// prompts, for each cache policy and KV budget. It also writes the synthetic
// dataset (drawn shapes with questions and exact answers) used by CI.
//
//	elastic-eval gen-data --out data/shapes --n 200
//	elastic-eval sweep --model m.gguf --mmproj mmproj.gguf --data data/shapes/data.json --out results
//
// Run "elastic-eval help" for every flag.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/internal/eval"
	"github.com/elasticserve/elasticserve/internal/eval/dataset"
	"github.com/elasticserve/elasticserve/internal/eval/report"
	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

const usage = `usage: elastic-eval <command> [flags]

Commands:
  ppl       perplexity of each sample's reference answer (teacher forcing) per policy and budget
  rouge     ROUGE-1/2/L F1 of greedy output against the full cache's output, and
            accuracy on short exact answers, per policy and budget
  latency   B sequences of a P-token prompt generating G tokens: prefill time, decode
            tokens/s, total time, peak KV cells and speedup over full, per policy and budget
  sweep     the metrics chosen with --metrics (default all) in one run
  explain   per layer and prompt region (system, image, question, template, answer):
            entries kept, merged and evicted by the prompt plan and evicted while
            generating, for --policy at --budget (greedy, like rouge)
  multiturn three-turn picture conversations (describe, count, one color or position
            question) per policy and budget, each turn encoded again (re-encode) or
            continued from the conversation's held, compressed cells (memory):
            accuracy of the scored turns, turns continued, tokens encoded, cells held
  gen-data  write the synthetic dataset: drawn shapes, questions, exact answers
  bench     serving benchmark of any OpenAI-compatible server (--url BASE/v1): streamed
            requests at each --concurrency level; TTFT, inter-token and end-to-end
            latency (p50/p90/p99), requests/s, output tokens/s, and elasticserve's
            kv_cache report when the server sends one
  capacity  conversations of a given length per GiB of decode KV, per policy, budget and
            KV row layout, by the server's admission rule (its decode streams)
  help      this text; "elastic-eval <command> -h" lists the command's flags

ppl, rouge and latency print a markdown table on stdout and, with --out, write
results.csv, results.md and PNG plots (metric vs budget) there; sweep always writes
them (default folder elastic-eval-out). Progress and skipped samples go to stderr.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	case "gen-data":
		err = genData(rest, stdout, stderr)
	case report.PPL, report.ROUGE, report.Latency, "sweep":
		err = measure(ctx, cmd, rest, stdout, stderr)
	case cmdExplain:
		err = explain(ctx, rest, stdout, stderr)
	case cmdMultiTurn:
		err = multiTurn(ctx, rest, stdout, stderr)
	case cmdBench:
		err = benchCmd(ctx, rest, stdout, stderr)
	case cmdCapacity:
		err = capacity(ctx, rest, stdout, stderr)
	default:
		fmt.Fprintf(stderr, "elastic-eval: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "elastic-eval %s: %v\n", cmd, err)
		return 2
	default:
		fmt.Fprintf(stderr, "elastic-eval %s: %v\n", cmd, err)
		return 1
	}
}

type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// parse runs fs on args; flag errors are already printed by the flag package.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func measure(ctx context.Context, cmd string, args []string, stdout, stderr io.Writer) error {
	r, ro, err := openRunner(cmd, args, stderr)
	if err != nil {
		return err
	}
	defer r.Close()
	res, err := r.Run(ctx, ro)
	if err != nil {
		return err
	}
	fmt.Fprint(stdout, res.Results.Markdown())
	for _, f := range res.Files {
		fmt.Fprintf(stderr, "wrote %s\n", f)
	}
	return nil
}

// openRunner reads a measuring command's flags and loads the model; the caller
// closes the runner.
func openRunner(cmd string, args []string, stderr io.Writer) (*eval.Runner, eval.RunOptions, error) {
	o, ro, err := measureFlags(cmd, args, stderr)
	if err != nil {
		return nil, ro, err
	}
	if o.Log == nil {
		// The ggml backend loader logs its CPU feature line through slog.
		slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	}
	r, err := eval.Open(o)
	return r, ro, err
}

// cmdExplain is the explain command's name.
const cmdExplain = "explain"

// explain runs the explain command: the flags of rouge, with --policy and
// --budget for --policies and --budgets.
func explain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	r, ro, err := openRunner(cmdExplain, args, stderr)
	if err != nil {
		return err
	}
	defer r.Close()
	res, err := r.RunExplain(ctx, ro)
	if res != nil {
		fmt.Fprint(stdout, res.Markdown)
		for _, f := range res.Files {
			fmt.Fprintf(stderr, "wrote %s\n", f)
		}
	}
	return err
}

// The prompt protocols of --protocol.
const (
	protocolDefault = "default"
	protocolPaper   = "paper"
)

// paperSink is the start_size every published evaluation script passes.
const paperSink = 1

// measureFlags reads the flags of a measuring command into the runner's and
// the run's options (progress and log writers included).
func measureFlags(cmd string, args []string, stderr io.Writer) (eval.Options, eval.RunOptions, error) {
	fs := flag.NewFlagSet("elastic-eval "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := eval.Options{}
	ro := eval.RunOptions{}
	fs.StringVar(&o.Model, "model", "", "GGUF model file (required)")
	fs.StringVar(&o.MMProj, "mmproj", "", "GGUF multimodal projector (needed for datasets with images)")
	var policies, budgets *string
	if cmd == cmdExplain {
		policies = fs.String("policy", "elastic", "policy explained (elastic, h2o, local; a comma-separated list explains each)")
		budgets = fs.String("budget", "0.5", "KV budget: fraction of the prompt's entries kept, in (0, 1] (a comma-separated list explains each)")
	} else {
		policies = fs.String("policies", "elastic,h2o,local", "comma-separated policies compared with full (elastic, h2o, local)")
		budgets = fs.String("budgets", "0.2,0.5,0.8", "comma-separated KV budgets: fractions of the prompt's entries kept, each in (0, 1]")
	}
	fs.IntVar(&o.Sink, "sink", elasticcache.DefaultSink, "leading KV entries never evicted or merged")
	fs.IntVar(&o.Distance, "distance", elasticcache.DefaultDistance, "elastic decode truncation offset")
	fs.BoolVar(&o.EvictMerged, "evict-merged", false, "ablation: elastic evicts the entries it would merge, at the same anchors")
	fs.Func("selection", "selection rule of the compressed settings: paper (default), reference, normalized or text-tail", func(v string) error {
		sel, err := elasticcache.ParseSelection(v)
		o.Selection = sel
		return err
	})
	fs.Int64Var(&o.Seed, "seed", 1, "seed: which samples --max-samples keeps, the latency prompts, the sampler")
	fs.IntVar(&o.Parallel, "parallel", 1, "ppl/rouge: samples decoded together (1 keeps results bit-reproducible)")
	fs.IntVar(&o.CtxSize, "ctx-size", 0, fmt.Sprintf("ppl/rouge: KV cells in total, shared by --parallel sequences (default parallel*max(%d, 1024+max-tokens))", eval.SeqCells))
	fs.IntVar(&o.BatchSize, "batch-size", 512, "prompt tokens per decode call")
	fs.IntVar(&o.Threads, "threads", 0, "CPU threads (default: all CPUs)")
	fs.BoolVar(&o.Unified, "unified", false, "one KV cell pool shared by all sequences instead of one stream each")
	fs.StringVar(&o.KVType, "kv-type", "f16", "KV row type: f16, bf16, f32, q8_0 or q4_0 (K; V stays f16 without flash attention)")
	fs.IntVar(&o.PrefillCtx, "prefill-ctx-size", 0, "encode compressed prompts in a prefill context of this many cells and move them into their stream, as the server does (0: compress in place)")
	fs.IntVar(&o.GPULayers, "gpu-layers", -1, "layers offloaded to a GPU when one is present (-1 all, 0 none)")
	fs.StringVar(&o.System, "system", "", "system message put before every prompt")
	fs.StringVar(&o.Layout, "layout", eval.LayoutAsIs, "prompt layout: as-is (the dataset's order), question-first (text before the image) or image-first")
	protocol := fs.String("protocol", protocolDefault, "prompt protocol preset: default (the flags as given) or paper (the published scripts': --layout question-first, --system LLaVA-1.5's, --sink 1; flags given explicitly win)")
	quiet := fs.Bool("quiet", false, "no progress bar (skip messages are still printed)")
	verbose := fs.Bool("verbose", false, "print the engine's log on stderr")
	outHelp := "folder for results.csv, results.md and the plots (sweep default: elastic-eval-out)"
	if cmd == cmdExplain {
		outHelp = "folder for explain.md and explain.csv (default: none, stdout only)"
	}
	out := fs.String("out", "", outHelp)
	if cmd == cmdMultiTurn {
		fs.StringVar(&ro.Data, "data", "models/demo/heldout.json", "the demo model's held-out question file (models/demo/heldout.json layout)")
		fs.IntVar(&ro.MaxSamples, "max-samples", 0, "at most this many pictures (conversations), in file order (0: all)")
	}
	if cmd == report.PPL || cmd == report.ROUGE || cmd == "sweep" || cmd == cmdExplain {
		fs.StringVar(&ro.Data, "data", "", "dataset JSON: LLaVA conversations or [{question, answer, image}] (required)")
		fs.StringVar(&ro.Images, "images", "", "image folder (default: the dataset file's folder)")
		fs.IntVar(&ro.MaxSamples, "max-samples", 0, "evaluate at most this many samples, drawn with --seed (0: all)")
	}
	if cmd == report.ROUGE || cmd == "sweep" || cmd == cmdExplain {
		fs.IntVar(&o.MaxTokens, "max-tokens", 64, "rouge: tokens generated per sample (greedy)")
	}
	if cmd == report.Latency || cmd == "sweep" {
		fs.IntVar(&ro.Latency.PromptTokens, "prompt-tokens", 900, "latency: P, tokens of each prompt (one image plus repeated text)")
		fs.IntVar(&ro.Latency.GenTokens, "gen-tokens", 512, "latency: G, tokens generated per sequence (greedy)")
		fs.IntVar(&ro.Latency.Batch, "batch", 8, "latency: B, sequences run together")
		fs.IntVar(&ro.Latency.Repeat, "repeat", 1, "latency: runs per setting; the median total time is kept")
	}
	metrics := report.Latency
	switch cmd {
	case "sweep":
		fs.StringVar(&metrics, "metrics", "all", "comma-separated metrics: ppl, rouge, latency, or all")
	case cmdExplain, cmdMultiTurn:
		metrics = report.ROUGE // they generate greedily, as rouge does
	default:
		metrics = cmd
	}
	if err := parse(fs, args); err != nil {
		return o, ro, err
	}
	if o.Model == "" {
		return o, ro, usagef("--model is required")
	}
	var err error
	if o.Policies, err = eval.ParsePolicies(*policies); err != nil {
		return o, ro, usageError{err}
	}
	if o.Budgets, err = parseBudgets(*budgets); err != nil {
		return o, ro, usageError{err}
	}
	if ro.Metrics, err = eval.ParseMetrics(metrics); err != nil {
		return o, ro, usageError{err}
	}
	for _, m := range ro.Metrics {
		if (m == report.PPL || m == report.ROUGE) && ro.Data == "" {
			if cmd == cmdExplain {
				m = cmd
			}
			return o, ro, usagef("--data is required for %s", m)
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if err := applyProtocol(*protocol, set, &o); err != nil {
		return o, ro, err
	}
	if !slices.Contains(eval.Layouts, o.Layout) {
		return o, ro, usagef("unknown --layout %q (want %s)", o.Layout, strings.Join(eval.Layouts, ", "))
	}
	ro.Out = *out
	if cmd == "sweep" && ro.Out == "" {
		ro.Out = "elastic-eval-out"
	}
	if !*quiet {
		o.Progress = stderr
	} else {
		o.Progress = skipOnly{stderr}
	}
	if *verbose {
		o.Log = stderr
	}
	return o, ro, nil
}

// applyProtocol sets the options of a --protocol preset that the user did not
// set with their own flag (set holds the names of the flags given) and names
// the protocol for the results' notes, with the preset's flags overridden.
func applyProtocol(name string, set map[string]bool, o *eval.Options) error {
	switch name {
	case protocolDefault:
		o.Protocol = protocolDefault
		return nil
	case protocolPaper:
	default:
		return usagef("unknown --protocol %q (want %s or %s)", name, protocolDefault, protocolPaper)
	}
	var given []string
	preset := func(flag string, apply func()) {
		if set[flag] {
			given = append(given, "--"+flag)
		} else {
			apply()
		}
	}
	preset("layout", func() { o.Layout = eval.LayoutQuestionFirst })
	preset("system", func() { o.System = eval.LLaVASystem })
	preset("sink", func() { o.Sink = paperSink })
	o.Protocol = protocolPaper
	if len(given) > 0 {
		o.Protocol += " (" + strings.Join(given, ", ") + " given explicitly)"
	}
	return nil
}

// skipOnly passes on the messages that are not progress lines.
type skipOnly struct{ w io.Writer }

func (s skipOnly) Write(p []byte) (int, error) {
	if strings.HasPrefix(string(p), "elastic-eval:") {
		return s.w.Write(p)
	}
	return len(p), nil
}

func parseBudgets(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		b, err := strconv.ParseFloat(f, 64)
		if err != nil || !(b > 0 && b <= 1) {
			return nil, fmt.Errorf("budget %q is not a number in (0, 1]", f)
		}
		out = append(out, b)
	}
	if len(out) == 0 {
		return nil, errors.New("no budget given")
	}
	return out, nil
}

func genData(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("elastic-eval gen-data", flag.ContinueOnError)
	fs.SetOutput(stderr)
	so := dataset.SynthOptions{Shapes: shapes.DefaultOptions()}
	fs.StringVar(&so.Dir, "out", "", "output folder: data.json (or train.json and heldout.json) and images/ (required)")
	fs.IntVar(&so.N, "n", 100, "pictures; each gives one entry per question kind")
	fs.Int64Var(&so.Seed, "seed", 1, "seed (the output is a pure function of seed and picture index)")
	fs.Float64Var(&so.HeldOut, "held-out", 0, "fraction of pictures (the last ones) written to heldout.json, the rest to train.json; 0 writes data.json")
	kinds := fs.String("kinds", "all", "comma-separated question kinds: describe, color, count, position, exists, or all")
	fs.IntVar(&so.Shapes.Size, "size", so.Shapes.Size, "picture side in pixels (at least 96)")
	fs.IntVar(&so.Shapes.MinShapes, "min-shapes", so.Shapes.MinShapes, "fewest shapes per picture (1 to 4)")
	fs.IntVar(&so.Shapes.MaxShapes, "max-shapes", so.Shapes.MaxShapes, "most shapes per picture (1 to 4)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if so.Dir == "" {
		return usagef("--out is required")
	}
	if *kinds != "all" {
		for _, k := range strings.Split(*kinds, ",") {
			if k = strings.TrimSpace(k); k != "" {
				so.Kinds = append(so.Kinds, shapes.QAKind(k))
			}
		}
	}
	res, err := dataset.WriteSynthetic(so)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %d pictures to %s\n", res.Images, so.Dir+"/images")
	for _, f := range res.Files {
		fmt.Fprintf(stdout, "wrote %s (%d entries)\n", f, res.Entries[f])
	}
	return nil
}
