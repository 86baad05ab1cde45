package engine

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"text/tabwriter"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// BenchmarkPolicies prints decode speed and prefill overhead (attention capture during
// the prompt plus the plan and merge, over full's prefill) of every policy against full, for a prompt of over 1024 tokens with an image, alone and 4 in parallel. All
// numbers in the table come from one run on one machine; read them as ratios.
//
//	go test -run '^$' -bench Policies -benchtime 1x ./engine/
func BenchmarkPolicies(b *testing.B) {
	const gen = 128
	prompt := strings.Repeat("Describe every shape in the picture, its color, size and place. ", 14)
	img := testPNG(b, 3)
	type row struct {
		parallel int
		policy   elasticcache.Policy
		budget   float64
	}
	var rows []row
	for _, par := range []int{1, 4} {
		rows = append(rows, row{par, elasticcache.Full, 1})
		for _, p := range allPolicies {
			for _, bud := range []float64{0.2, 0.5, 0.8} {
				rows = append(rows, row{par, p, bud})
			}
		}
	}
	for range b.N {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "parallel\tpolicy\tbudget\tprompt\tkept\tdecode tok/s\tspeedup\tprefill ms\tplan+merge ms\toverhead %\tfinal cells\t")
		baseline := map[int]float64{}
		basePrefill := map[int]float64{}
		for _, r := range rows {
			e := startEngine(b, Options{Parallel: r.parallel, CtxSize: r.parallel * 2048, BatchSize: 512, Unified: false})
			chans := make([]<-chan completion.Event, r.parallel)
			for i := range chans {
				ch, err := e.Submit(context.Background(), greedyReq(fmt.Sprint(i), prompt, gen, cfg(r.policy, r.budget), img))
				if err != nil {
					b.Fatal(err)
				}
				chans[i] = ch
			}
			var res []result
			for _, ch := range chans {
				res = append(res, collect(b, ch))
			}
			var prefill, compress, decodeMs float64
			tokens := 0
			for _, x := range res {
				if x.err != nil {
					b.Fatal(x.err)
				}
				prefill += x.kv.PrefillMs
				compress += x.kv.CompressMs
				decodeMs = max(decodeMs, x.kv.DecodeMs)
				tokens += x.usage.CompletionTokens
			}
			tps := float64(tokens) / (decodeMs / 1000)
			prefill /= float64(len(res))
			compress /= float64(len(res))
			if r.policy == elasticcache.Full {
				baseline[r.parallel] = tps
				basePrefill[r.parallel] = prefill
			}
			k := res[0].kv
			fmt.Fprintf(tw, "%d\t%s\t%.1f\t%d\t%d\t%.0f\t%.2fx\t%.0f\t%.1f\t%.1f\t%d\t\n", r.parallel, r.policy, r.budget,
				k.PromptEntries, k.Kept, tps, tps/baseline[r.parallel], prefill, compress,
				100*(prefill+compress-basePrefill[r.parallel])/basePrefill[r.parallel], k.FinalCells)
		}
		tw.Flush()
	}
}
