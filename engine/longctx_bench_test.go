package engine

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"text/tabwriter"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// BenchmarkLongContext prints decode tokens/s and the KV bytes one conversation
// holds against prompt length (about 1k, 2k, 4k and 8k tokens of text), for
// full and elastic at budgets 0.2 and 0.5, on a model where attention is a
// real part of a decode step: a 125M-parameter random llama (12 layers, width
// 768, GQA 12/4, feed-forward 2048, 32,000-token vocabulary, f16), one
// sequence, greedy, 64 generated tokens, one thread (ggml's threads spin at
// their barriers, so on a machine shared with other work one thread measures
// steadier than several).
//
// Beside each measured speedup over full it prints the bound a decode step
// that only streams memory would give: (W + KV) / (W + b*KV), with W the
// weight bytes read per token (every matrix but the token embedding, of which
// one row is read) and KV the full cache's bytes at that prompt length. The
// ratios come from one run on one machine.
//
//	go test -run '^$' -bench LongContext -benchtime 1x -timeout 60m ./engine/
func BenchmarkLongContext(b *testing.B) {
	const gen = 64
	lengths := []int{1024, 2048, 4096, 8192}
	m := loadBenchModel(b)
	defer m.Close()
	info := m.Info()
	const elem = 2 // f16 weights and cache
	bytesPerCell := float64(info.Layers * 2 * info.KVRowElems * elem)
	weights := float64(info.SizeBytes) - float64((info.VocabSize-1)*info.Embd*elem)
	settings := []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.2), cfg(elasticcache.Elastic, 0.5)}
	unit := "Notes on the picture: a red circle at the top left, a blue square below it, a green triangle to the right. "
	unitTokens, err := m.Tokenize(unit, false, false)
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		fmt.Printf("model: %d layers, width %d, heads %d/%d, %.1fM parameters; W = %.1f MiB read per token, %.0f KV bytes per cell\n",
			info.Layers, info.Embd, info.Heads, info.KVHeads, float64(info.Params)/1e6, weights/(1<<20), bytesPerCell)
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "prompt\tpolicy\tbudget\tprefill ms\tdecode tok/s\tspeedup\tbound\tKV cells\tKV MiB\tfull KV MiB\t")
		for _, p := range lengths {
			// The chat template adds a few tokens; the prompt is cut to about p.
			prompt := strings.Repeat(unit, (p-16)/len(unitTokens)+1)
			e, err := Start(m, nil, Options{Parallel: 1, CtxSize: p + gen + 256, BatchSize: 512, Threads: 1, Log: zerolog.Nop()})
			if err != nil {
				b.Fatal(err)
			}
			var fullTPS float64
			for _, spec := range settings {
				// Trim to the length: tokenize the whole prompt once per setting is
				// cheap next to encoding it.
				req := greedyReq("long", trimTokens(b, m, prompt, p-16), gen, spec)
				ch, err := e.Submit(context.Background(), req)
				if err != nil {
					b.Fatal(err)
				}
				r := collect(b, ch)
				if r.err != nil {
					b.Fatal(r.err)
				}
				k := r.kv
				tps := float64(r.usage.CompletionTokens-1) / (k.DecodeMs / 1000)
				budget := 1.0
				if spec.Policy() == elasticcache.Full {
					fullTPS = tps
				} else {
					budget = spec.Config().Budget
				}
				fullKV := float64(k.PromptEntries) * bytesPerCell
				bound := (weights + fullKV) / (weights + budget*fullKV)
				fmt.Fprintf(tw, "%d\t%s\t%.1f\t%.0f\t%.1f\t%.2fx\t%.2fx\t%d\t%.1f\t%.1f\t\n", k.PromptEntries, spec.Policy(), budget,
					k.PrefillMs+k.CompressMs, tps, tps/fullTPS, bound, k.FinalCells,
					float64(k.FinalCells)*bytesPerCell/(1<<20), float64(k.PromptEntries+r.usage.CompletionTokens)*bytesPerCell/(1<<20))
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			e.Stop(ctx)
		}
		tw.Flush()
	}
}

// trimTokens cuts text to its first n tokens (as text, at a token boundary).
func trimTokens(b *testing.B, m *llama.Model, text string, n int) string {
	toks, err := m.Tokenize(text, false, false)
	if err != nil {
		b.Fatal(err)
	}
	if len(toks) <= n {
		return text
	}
	return m.Detokenize(toks[:n], false, false)
}
