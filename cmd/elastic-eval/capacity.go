package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/internal/eval"
	"github.com/elasticserve/elasticserve/llama"
)

const cmdCapacity = "capacity"

// capacity prints how many conversations fit a GiB of decode-context KV per
// policy, budget and row layout, by the server's admission rule, for a model
// file's shape or one given by flags.
func capacity(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(cmdCapacity, flag.ContinueOnError)
	fs.SetOutput(stderr)
	model := fs.String("model", "", "GGUF model whose layers and KV width to use (or --layers and --kv-width)")
	name := fs.String("name", "", "the shape's name in the heading (default: the model's description)")
	layers := fs.Int("layers", 0, "layers (without --model)")
	width := fs.Int("kv-width", 0, "K (= V) elements per cell per layer: KV heads x head size (without --model)")
	prompt := fs.Int("prompt", 650, "prompt tokens of a conversation (image included)")
	gen := fs.Int("gen", 256, "generated tokens of a conversation")
	gib := fs.Float64("gib", 1, "decode-context KV memory, GiB")
	budgets := fs.String("budgets", "0.8,0.7,0.5,0.3,0.2", "budgets of the compressing policies (elastic, h2o and local reserve alike; 0.8 is the server default)")
	if err := parse(fs, args); err != nil {
		return err
	}
	shape := eval.Shape{Name: *name, Layers: *layers, KVWidth: *width}
	if *model != "" {
		m, err := llama.LoadModel(*model, llama.ModelParams{UseMmap: true})
		if err != nil {
			return err
		}
		info := m.Info()
		m.Close()
		shape.Layers, shape.KVWidth = info.Layers, info.KVRowElems
		if shape.Name == "" {
			shape.Name = info.Desc
		}
	}
	if shape.Layers <= 0 || shape.KVWidth <= 0 || *prompt <= 0 || *gen < 0 || *gib <= 0 {
		return usagef("need --model or --layers and --kv-width > 0, --prompt > 0, --gen >= 0, --gib > 0")
	}
	specs := []elasticcache.Spec{{}}
	for _, f := range strings.Split(*budgets, ",") {
		b, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil {
			return usagef("--budgets: %v", err)
		}
		c := elasticcache.DefaultConfig()
		c.Policy, c.Budget = elasticcache.Elastic, b
		spec, err := c.Spec()
		if err != nil {
			return usagef("--budgets: %v", err)
		}
		specs = append(specs, spec)
	}
	rows, err := eval.Capacity(shape, *prompt, *gen, int64(*gib*(1<<30)), specs, eval.DefaultKVSettings)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s (%d layers, %d KV elements per layer): conversations of %d prompt + %d generated tokens in %g GiB of decode KV\n\n",
		shape.Name, shape.Layers, shape.KVWidth, *prompt, *gen, *gib)
	fmt.Fprint(stdout, eval.CapacityMarkdown(rows, eval.DefaultKVSettings))
	return nil
}
