package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/elasticserve/elasticserve/internal/eval/bench"
)

// cmdBench is the bench command's name.
const cmdBench = "bench"

// benchCmd runs the serving benchmark against an OpenAI-compatible endpoint.
func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("elastic-eval "+cmdBench, flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := bench.Options{}
	fs.StringVar(&o.URL, "url", "", "API base of an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1 (required)")
	fs.StringVar(&o.Model, "model", "", "the requests' model field (Ollama and vLLM need it)")
	fs.StringVar(&o.APIKey, "api-key", "", "API key, sent as Authorization: Bearer (default $OPENAI_API_KEY)")
	fs.StringVar(&o.Label, "label", "", "name of the server in the table's first column (default: the URL's host)")
	conc := fs.String("concurrency", "1,4,16", "comma-separated concurrency levels: requests in flight")
	fs.IntVar(&o.Requests, "requests", bench.DefaultRequests, "requests per concurrency level")
	fs.IntVar(&o.MaxTokens, "max-tokens", bench.DefaultMaxTokens, "max_tokens of each request (greedy)")
	fs.IntVar(&o.PromptWords, "prompt-words", bench.DefaultPromptWords, "words of filler text per prompt (the prompts are a function of --seed)")
	fs.Int64Var(&o.Seed, "seed", 1, "seed of the prompt set (also sent as the requests' seed)")
	image := fs.String("image", "", "image file sent with every prompt as a data URL (default: text only)")
	body := fs.String("body", "", `JSON object merged into every request body, e.g. '{"elastic_cache":{"policy":"elastic","budget":0.5}}'`)
	fs.IntVar(&o.Warmup, "warmup", 1, "unmeasured requests sent first (a server may load its model on the first)")
	fs.DurationVar(&o.Timeout, "timeout", 10*time.Minute, "limit of each request")
	out := fs.String("out", "", "folder for bench.csv and bench.md (default: none, stdout only)")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	if err := parse(fs, args); err != nil {
		return err
	}
	if o.URL == "" {
		return usagef("--url is required")
	}
	if o.APIKey == "" {
		o.APIKey = os.Getenv("OPENAI_API_KEY")
	}
	for _, f := range strings.Split(*conc, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		c, err := strconv.Atoi(f)
		if err != nil || c <= 0 {
			return usagef("concurrency %q is not a positive integer", f)
		}
		o.Concurrency = append(o.Concurrency, c)
	}
	if len(o.Concurrency) == 0 {
		return usagef("no concurrency level given")
	}
	if o.Requests <= 0 || o.MaxTokens <= 0 || o.PromptWords <= 0 {
		return usagef("--requests, --max-tokens and --prompt-words must be positive")
	}
	if *body != "" {
		if err := json.Unmarshal([]byte(*body), &o.Extra); err != nil || o.Extra == nil {
			return usagef("--body is not a JSON object: %s", *body)
		}
	}
	if *image != "" {
		b, err := os.ReadFile(*image)
		if err != nil {
			return err
		}
		o.Image = b
	}
	if !*quiet {
		o.Progress = stderr
	}
	res, err := bench.Run(ctx, o)
	if res != nil && len(res.Levels) > 0 {
		fmt.Fprint(stdout, res.Markdown())
		if *out != "" {
			files, werr := res.WriteFiles(*out)
			for _, f := range files {
				fmt.Fprintf(stderr, "wrote %s\n", f)
			}
			if err == nil {
				err = werr
			}
		}
	}
	return err
}
