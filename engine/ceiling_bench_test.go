package engine

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/elasticserve/elasticserve/llama"
)

// BenchmarkConcurrencyCeiling measures what bounds the tokens/s that concurrent
// requests can gain over one on this machine, with llama.cpp calls alone (no
// engine): the time of a decode step of 1 to 4 sequences (one stream each, the
// server's layout, each holding a 1,000-token prompt), the time per prompt token
// by chunk size, and a step whose sequences are not consecutive streams
// (llama.cpp splits such a batch into one call per run of streams). From these it
// prints the best ratio of 4 requests' tokens/s to 1 request's that any schedule
// could reach for a 1,000-token prompt and G generated tokens: one request costs
// P + G*d1; four cost at least 4*P + G*d4 (every prompt at its best chunk, every
// step with all four sequences), so the ratio is at most 4*(P + G*d1) / (4*P + G*d4).
// The model is the 125M-parameter random llama of BenchmarkConcurrency; threads:
// every CPU.
//
//	go test -run '^$' -bench ConcurrencyCeiling -benchtime 1x ./engine/
func BenchmarkConcurrencyCeiling(b *testing.B) {
	const prompt, streams = 1000, 4
	m := loadBenchModel(b)
	defer m.Close()
	toks, err := m.Tokenize(benchPrompts(b, m, 1, prompt)[0], true, false)
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		ctx, err := llama.NewContext(m, llama.ContextParams{NCtx: streams * 2048, NBatch: 512, NSeqMax: streams, Threads: runtime.NumCPU()})
		if err != nil {
			b.Fatal(err)
		}
		batch := llama.NewBatch(512, 0, streams)
		decode := func(add func()) time.Duration {
			batch.Clear()
			add()
			t0 := time.Now()
			if err := ctx.Decode(batch); err != nil {
				b.Fatal(err)
			}
			return time.Since(t0)
		}
		// encodes toks into seq from position 0 in chunks of c; returns the time
		encode := func(seq, c int) time.Duration {
			ctx.SeqRemove(seq, 0, -1)
			var d time.Duration
			for at := 0; at < len(toks); at += c {
				n := min(c, len(toks)-at)
				d += decode(func() {
					for i := range n {
						batch.Add(toks[at+i], at+i, seq, at+i == len(toks)-1)
					}
				})
			}
			return d
		}
		median := func(f func() time.Duration, n int) float64 {
			ds := make([]float64, n)
			for i := range ds {
				ds[i] = float64(f().Microseconds()) / 1000
			}
			slices.Sort(ds)
			return ds[n/2]
		}
		chunks := []int{16, 32, 64, 512}
		perTok := map[int]float64{}
		for _, c := range chunks {
			perTok[c] = median(func() time.Duration { return encode(0, c) }, 3) / float64(len(toks))
		}
		for s := 1; s < streams; s++ {
			encode(s, 512)
		}
		// one step of seqs, its cells removed again so every step sees the prompt alone
		step := func(seqs ...int) float64 {
			return median(func() time.Duration {
				d := decode(func() {
					for _, s := range seqs {
						batch.Add(toks[0], len(toks), s, true)
					}
				})
				for _, s := range seqs {
					ctx.SeqRemove(s, len(toks), -1)
				}
				return d
			}, 15)
		}
		d := []float64{0, step(0), step(0, 1), step(0, 1, 2), step(0, 1, 2, 3)}
		gap := step(0, 1, 3)
		ctx.Close()

		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "decode step, sequences\t1\t2\t3\t4\t3 with a gap (0,1,3)\t\n")
		fmt.Fprintf(tw, "ms\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t\n", d[1], d[2], d[3], d[4], gap)
		fmt.Fprintf(tw, "prompt chunk, tokens\t16\t32\t64\t512\t\t\n")
		fmt.Fprintf(tw, "ms per token\t%.2f\t%.2f\t%.2f\t%.2f\t\t\n", perTok[16], perTok[32], perTok[64], perTok[512])
		tw.Flush()
		best := min(perTok[16], perTok[32], perTok[64], perTok[512]) * prompt
		for _, g := range []float64{64, 256} {
			one := best + g*d[1]
			four := streams*best + g*d[4]
			fmt.Printf("prompt %d + %.0f tokens: one request %.0f ms, four at least %.0f ms: 4/1 tokens/s at most %.2fx (prompts %.0f%% of one request)\n",
				prompt, g, one, four, streams*one/four, 100*best/one)
		}
	}
}
