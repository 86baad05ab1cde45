package engine

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// BenchmarkPrefillStreams prints what a burst of four compressed requests gains
// when the prefill context holds their prompts side by side (Options.PrefillStreams
// 4, sharing calls) instead of one at a time (1): aggregate generated tokens/s
// end to end, the first and the last first token, and the ratio to one request
// alone; full (prompts in their own streams, which always shared calls) for
// reference. Each request a different ~1,000-token prompt and 256 greedy tokens,
// 4 slots of 1,344 cells, the 125M-parameter random llama, every CPU. Three
// rounds, the settings interleaved in each; the table gives each setting's median
// round.
//
//	go test -run '^$' -bench PrefillStreams -benchtime 1x -timeout 30m ./engine/
func BenchmarkPrefillStreams(b *testing.B) {
	const prompt, gen, slots, rounds = 1000, 256, 4, 3
	m := loadBenchModel(b)
	defer m.Close()
	prompts := benchPrompts(b, m, slots, prompt-16)
	type setting struct {
		spec    elasticcache.Spec
		streams int
		n       int
	}
	var settings []setting
	for _, spec := range []elasticcache.Spec{cfg(elasticcache.Elastic, 0.5), cfg(elasticcache.H2O, 0.5), {}} {
		for _, streams := range []int{1, 4} {
			for _, n := range []int{1, slots} {
				if spec.Compresses() || streams == 1 { // full never enters the prefill context
					settings = append(settings, setting{spec, streams, n})
				}
			}
		}
	}
	for range b.N {
		got := make([][]timedRun, len(settings))
		for range rounds {
			for i, st := range settings {
				e, err := Start(m, nil, Options{Parallel: slots, CtxSize: slots * (prompt + gen + 88), BatchSize: 512,
					PrefillCtx: prompt + 64, PrefillStreams: st.streams, Threads: runtime.NumCPU(), Log: zerolog.Nop()})
				if err != nil {
					b.Fatal(err)
				}
				reqs := make([]*completion.Request, st.n)
				for k := range reqs {
					reqs[k] = greedyReq(fmt.Sprint("p", k), prompts[k], gen, st.spec)
				}
				got[i] = append(got[i], runTimed(b, e, reqs))
				stopNow(e)
			}
		}
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "policy\tprefill streams\trequests\ttok/s\tfirst token ms\tlast first token ms\tvs 1 request\tvs 1 prefill stream\t")
		median := map[setting]timedRun{}
		for i, st := range settings {
			o := slices.SortedFunc(slices.Values(got[i]), func(a, b timedRun) int { return int(a.tps*1000 - b.tps*1000) })[rounds/2]
			median[st] = o
			one := median[setting{st.spec, st.streams, 1}]
			vsStreams := "-"
			if st.streams > 1 {
				vsStreams = fmt.Sprintf("%.2fx", o.tps/median[setting{st.spec, 1, st.n}].tps)
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%.0f\t%.0f\t%.2fx\t%s\t\n", policyName(st.spec), st.streams, st.n, o.tps, o.firstMs, o.lastMs, o.tps/one.tps, vsStreams)
		}
		tw.Flush()
	}
}

// timedRun is a burst's aggregate generated tokens/s and when the first and the
// last of its first tokens came (ms after submission).
type timedRun struct{ tps, firstMs, lastMs float64 }

// runTimed submits reqs together and times them.
func runTimed(b *testing.B, e *Engine, reqs []*completion.Request) (o timedRun) {
	t0 := time.Now()
	chans := make([]<-chan completion.Event, len(reqs))
	for i, r := range reqs {
		ch, err := e.Submit(context.Background(), r)
		if err != nil {
			b.Fatal(err)
		}
		chans[i] = ch
	}
	type done struct {
		first  time.Duration
		tokens int
		err    error
	}
	res := make(chan done, len(chans))
	for _, ch := range chans {
		go func() {
			var d done
			for ev := range ch {
				if d.first == 0 && ev.Text != "" {
					d.first = time.Since(t0)
				}
				if ev.Done {
					d.tokens, d.err = ev.Usage.CompletionTokens, ev.Err
				}
			}
			res <- d
		}()
	}
	tokens := 0
	for range chans {
		d := <-res
		if d.err != nil {
			b.Fatal(d.err)
		}
		tokens += d.tokens
		ms := float64(d.first.Microseconds()) / 1000
		if o.firstMs == 0 || ms < o.firstMs {
			o.firstMs = ms
		}
		o.lastMs = max(o.lastMs, ms)
	}
	o.tps = float64(tokens) / time.Since(t0).Seconds()
	return o
}
