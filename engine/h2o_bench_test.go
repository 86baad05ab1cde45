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
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// BenchmarkH2OBatchedDecode prints the decode rate of B h2o sequences (and of
// elastic, which always shares its batches) on a unified cache, where h2o reads
// every sequence's attention from one shared batch, and on per-sequence streams,
// where each h2o sequence decodes alone. 12-layer, width-768 random model; ratios
// from one run.
//
//	go test -run '^$' -bench H2OBatchedDecode -benchtime 1x -timeout 30m ./engine/
func BenchmarkH2OBatchedDecode(b *testing.B) {
	o := testmodel.DefaultOptions()
	o.Layers, o.Embd, o.Heads, o.KVHeads, o.FF, o.F16 = 12, 768, 12, 4, 2048, true
	m := loadModel(b, o)
	defer m.Close()
	prompt := strings.Repeat("Describe every shape in the picture, its color, size and place. ", 5)
	const gen = 64
	for range b.N {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "B\tpolicy\tcache\tdecode tok/s\tvs per-sequence\t")
		for _, batch := range []int{1, 4, 8} {
			for _, p := range []elasticcache.Policy{elasticcache.H2O, elasticcache.Elastic} {
				rate := map[bool]float64{}
				for _, unified := range []bool{false, true} {
					e, err := Start(m, nil, Options{Parallel: batch, CtxSize: batch * 1024, Unified: unified, Threads: 2, Log: zerolog.Nop()})
					if err != nil {
						b.Fatal(err)
					}
					chans := make([]<-chan completion.Event, batch)
					for i := range chans {
						r := greedyReq(fmt.Sprint(i), fmt.Sprint(i)+" "+prompt, gen, cfg(p, 0.5))
						if chans[i], err = e.Submit(context.Background(), r); err != nil {
							b.Fatal(err)
						}
					}
					tokens, decodeMs := 0, 0.0
					for _, ch := range chans {
						r := collect(b, ch)
						if r.err != nil {
							b.Fatal(r.err)
						}
						tokens += r.usage.CompletionTokens
						decodeMs = max(decodeMs, r.kv.DecodeMs)
					}
					rate[unified] = float64(tokens) / (decodeMs / 1000)
					ctx, cancel := context.WithCancel(context.Background())
					cancel()
					e.Stop(ctx)
				}
				fmt.Fprintf(tw, "%d\t%s\tper-sequence\t%.0f\t1.00x\t\n", batch, p, rate[false])
				fmt.Fprintf(tw, "%d\t%s\tunified (shared batch)\t%.0f\t%.2fx\t\n", batch, p, rate[true], rate[true]/rate[false])
			}
		}
		tw.Flush()
	}
}
