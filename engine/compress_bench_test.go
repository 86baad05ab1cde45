package engine

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// BenchmarkCompress measures the prompt plan's cost in the KV hook on a 7B-width
// slice (2 layers of LLaMA-7B's shape: width 4096, 32 heads, feed-forward 11008,
// 32,000-token vocabulary, f16), one text prompt of about 2,500 and 5,000 entries,
// budget 0.5, two threads, compressed in place (one context) and moved (the
// server's default: encoded in the prefill context, written into the decode
// context's stream). For each policy it prints the median of three runs of
// prefill ms and compress ms
// (kv_cache.compress_ms: plan, merge and write, between the prompt's last batch
// and the first decode step), the MB of prompt K+V the plan reads, that over the
// compress time (MB/s), and a memcpy of the same bytes measured in the same run,
// and two ratios: compress MB/s over memcpy MB/s, compress ms over prefill ms.
// One process, one machine: compare the ratios, not the absolute numbers.
//
//	go test -run '^$' -bench Compress -benchtime 1x -timeout 30m ./engine/
func BenchmarkCompress(b *testing.B) {
	opt := testmodel.DefaultOptions()
	opt.Layers, opt.Embd, opt.Heads, opt.KVHeads, opt.FF, opt.F16 = 2, 4096, 32, 32, 11008, true
	opt.VocabSize, opt.CtxTrain = 32000, 8192
	m := loadModel(b, opt)
	defer m.Close()
	const threads, reps = 2, 3
	unit := "Notes on the picture: a red circle at the top left, a blue square below it, a green triangle to the right. "
	settings := []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5), cfg(elasticcache.H2O, 0.5), cfg(elasticcache.Local, 0.5)}
	for range b.N {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "prompt\twhere\tpolicy\tprefill ms\tprefill/full\tcompress ms\tK+V MB\tMB/s\tmemcpy MB/s\tof memcpy\tof prefill\t")
		for _, run := range []struct {
			p     int
			where string
		}{{2500, "in place"}, {2500, "moved"}, {5000, "in place"}, {5000, "moved"}} {
			p := run.p
			opts := Options{Parallel: 1, CtxSize: p + 512, BatchSize: 512, Threads: threads, Log: zerolog.Nop()}
			if run.where == "moved" {
				// The server's default: encoded in the prefill context, compressed
				// straight into the slot's stream of the decode context.
				opts.PrefillCtx = p + 512
			}
			e, err := Start(m, nil, opts)
			if err != nil {
				b.Fatal(err)
			}
			prompt := trimTokens(b, m, strings.Repeat(unit, p/20), p-16)
			var fullPrefill float64
			for _, spec := range settings {
				// Each setting runs reps times; the medians are printed (a shared
				// machine's noise moves single runs of tens of milliseconds).
				var prefill, compress []float64
				var k *completion.KVReport
				for range reps {
					ch, err := e.Submit(context.Background(), greedyReq("compress", prompt, 2, spec))
					if err != nil {
						b.Fatal(err)
					}
					r := collect(b, ch)
					if r.err != nil {
						b.Fatal(r.err)
					}
					k = r.kv
					prefill, compress = append(prefill, k.PrefillMs), append(compress, k.CompressMs)
				}
				k.PrefillMs, k.CompressMs = median(prefill), median(compress)
				if spec.Policy() == elasticcache.Full {
					fullPrefill = k.PrefillMs
					continue
				}
				bytes := int(int64(k.PromptEntries) * e.bytesPerCell)
				mb := float64(bytes) / 1e6
				copyMBs := memcpyMBs(bytes)
				rate := mb / (k.CompressMs / 1000)
				fmt.Fprintf(tw, "%d\t%s\t%s\t%.0f\t%.3f\t%.1f\t%.0f\t%.0f\t%.0f\t%.0f%%\t%.2f%%\t\n", k.PromptEntries, run.where, spec.Policy(),
					k.PrefillMs, k.PrefillMs/fullPrefill, k.CompressMs, mb, rate, copyMBs, 100*rate/copyMBs, 100*k.CompressMs/k.PrefillMs)
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			e.Stop(ctx)
		}
		tw.Flush()
	}
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

// memcpyMBs is the best of five copies of n bytes between two buffers touched
// beforehand, in MB/s.
func memcpyMBs(n int) float64 {
	src, dst := make([]byte, n), make([]byte, n)
	for i := range src {
		src[i] = byte(i)
	}
	copy(dst, src)
	best := time.Duration(1 << 62)
	for range 5 {
		t0 := time.Now()
		copy(dst, src)
		best = min(best, time.Since(t0))
	}
	return float64(n) / 1e6 / best.Seconds()
}
