package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// BenchmarkConcurrency prints aggregate generated tokens/s for 1, 2, 4 and 8
// requests submitted together (each a different prompt of about 1,000 tokens,
// 256 greedy tokens, end to end: queueing, prompt and generation), for full and
// elastic 0.5, on the one-context engine with a unified cache (the default
// before the prefill context) and on the engine with a stream per slot and a
// prefill context (the default now). Both have 8 slots and the same decode
// cells (8 full conversations); the model is the 125M-parameter random llama
// of BenchmarkLongContext; threads: every CPU. Ratios come from one run.
//
//	go test -run '^$' -bench Concurrency -benchtime 1x -timeout 60m ./engine/
func BenchmarkConcurrency(b *testing.B) {
	const prompt, gen, slots = 1000, 256, 8
	m := loadBenchModel(b)
	defer m.Close()
	conv := prompt + gen + 64
	engines := []struct {
		name string
		opts Options
	}{
		{"unified, one context", Options{Unified: true}},
		{"streams + prefill context", Options{PrefillCtx: prompt + 64}},
	}
	settings := []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5)}
	levels := []int{1, 2, 4, 8}
	prompts := benchPrompts(b, m, slots, prompt-16)
	for range b.N {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "engine\tpolicy\trequests\ttokens\twall s\ttok/s\tvs 1 request\tvs unified\t")
		base := map[string]float64{} // unified engine's tok/s by policy and level
		for _, en := range engines {
			opts := en.opts
			opts.Parallel, opts.CtxSize, opts.BatchSize, opts.Threads, opts.Log = slots, slots*conv, 512, runtime.NumCPU(), zerolog.Nop()
			e, err := Start(m, nil, opts)
			if err != nil {
				b.Fatal(err)
			}
			for _, spec := range settings {
				var one float64
				for _, n := range levels {
					reqs := make([]*completion.Request, n)
					for i := range reqs {
						reqs[i] = greedyReq(fmt.Sprint("c", i), prompts[i], gen, spec)
					}
					t0 := time.Now()
					tokens := submitAll(b, e, reqs)
					wall := time.Since(t0).Seconds()
					tps := float64(tokens) / wall
					if n == 1 {
						one = tps
					}
					key := fmt.Sprint(spec.Policy(), n)
					vs := "-"
					if en.opts.Unified {
						base[key] = tps
					} else {
						vs = fmt.Sprintf("%.2fx", tps/base[key])
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.1f\t%.1f\t%.2fx\t%s\t\n", en.name, policyName(spec), n, tokens, wall, tps, tps/one, vs)
					fmt.Fprintf(os.Stderr, "%s, %s, %d requests: %.1f tok/s\n", en.name, policyName(spec), n, tps)
				}
			}
			stopNow(e)
		}
		tw.Flush()
	}
}

// BenchmarkAdmission measures how many conversations run at once in a fixed
// decode context under full and elastic 0.5 (streams + prefill context): for
// each slot count it starts the engine as the server does (--ctx-size cut to
// whole 256-cell streams, config.DecodeCells), submits that many requests
// together and counts the requests that were running at the same time and
// generated all their tokens (forced tokens, so no end-of-text cuts one short).
// A stream too small for a conversation cuts its generation (finish "length"),
// so the largest slot count at which every request completes is what fits.
// Conversations per GiB count both contexts' KV bytes. Two conversation shapes:
// LLaVA-1.5's (650 prompt tokens, 576 of them the image, 256 generated) in 4 full
// conversations' memory, and 1,000 + 256. The small random test model keeps it
// quick; cells and the ratio do not depend on the model.
//
//	go test -run '^$' -bench Admission -benchtime 1x ./engine/
func BenchmarkAdmission(b *testing.B) {
	m := loadModel(b, testmodel.DefaultOptions())
	defer m.Close()
	shapes := []struct{ prompt, gen, ctx int }{{650, 256, 4 * 1024}, {1000, 256, 4 * 1280}}
	const most = 16
	for range b.N {
		for _, sh := range shapes {
			prompts := benchPrompts(b, m, most, sh.prompt-20) // the chat template adds a few
			force := make([]int32, sh.gen)
			for i := range force {
				force[i] = int32(100 + i%50)
			}
			fmt.Printf("\nconversations of %d prompt + %d generated tokens, --ctx-size %d\n", sh.prompt, sh.gen, sh.ctx)
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, "policy\tslots\tcells a stream\tran at once\tcompleted\tKV MiB (decode+prefill)\tconversations/GiB\t")
			perGiB := map[string]float64{}
			for _, spec := range []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5)} {
				for slots := 2; slots <= most; slots++ {
					stream := sh.ctx / slots / 256 * 256
					if stream == 0 {
						break
					}
					e, err := Start(m, nil, Options{Parallel: slots, CtxSize: stream * slots, BatchSize: 512, PrefillCtx: sh.prompt + 16, Log: zerolog.Nop()})
					if err != nil {
						b.Fatal(err)
					}
					reqs := make([]*completion.Request, slots)
					for i := range reqs {
						reqs[i] = greedyReq(fmt.Sprint("a", i), prompts[i], sh.gen, spec)
						reqs[i].Force = force
					}
					peak, complete := runCounting(b, e, reqs, sh.gen)
					var bytes int64
					for _, c := range e.Contexts() {
						bytes += c.Bytes()
					}
					stopNow(e)
					mib := float64(bytes) / (1 << 20)
					if complete < slots {
						fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%.2f\t(does not fit)\t\n", policyName(spec), slots, stream, peak, complete, mib)
						break
					}
					g := float64(peak) / (float64(bytes) / (1 << 30))
					perGiB[policyName(spec)] = g
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%.2f\t%.0f\t\n", policyName(spec), slots, stream, peak, complete, mib, g)
				}
			}
			tw.Flush()
			fmt.Printf("conversations per GiB, elastic 0.5 / full: %.2fx\n", perGiB["elastic 0.5"]/perGiB["full"])
		}
	}
}

func policyName(spec elasticcache.Spec) string {
	if spec.Policy() == elasticcache.Full {
		return "full"
	}
	return fmt.Sprintf("%s %.1f", spec.Policy(), spec.Budget())
}

// loadBenchModel loads the 125M-parameter random llama of BenchmarkLongContext.
func loadBenchModel(b *testing.B) *llama.Model {
	opt := testmodel.DefaultOptions()
	opt.Layers, opt.Embd, opt.Heads, opt.KVHeads, opt.FF, opt.F16 = 12, 768, 12, 4, 2048, true
	opt.VocabSize, opt.CtxTrain = 32000, 9216
	return loadModel(b, opt)
}

// loadModel writes (or finds) the test model of opt and loads it.
func loadModel(b *testing.B, opt testmodel.Options) *llama.Model {
	mp, _, err := testmodel.Ensure(opt)
	if err != nil {
		b.Fatal(err)
	}
	m, err := llama.LoadModel(mp, llama.ModelParams{UseMmap: true})
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// benchPrompts makes n prompts of about tokens tokens that differ from their
// first words on (so that no request continues another's cells).
func benchPrompts(b *testing.B, m *llama.Model, n, tokens int) []string {
	unit := "Notes on the picture: a red circle at the top left, a blue square below it, a green triangle to the right. "
	out := make([]string, n)
	for i := range out {
		out[i] = trimTokens(b, m, fmt.Sprintf("Request %d. ", i)+strings.Repeat(unit, tokens/20+1), tokens)
	}
	return out
}

// submitAll submits reqs together and returns the tokens they generated.
func submitAll(b *testing.B, e *Engine, reqs []*completion.Request) int {
	chans := make([]<-chan completion.Event, len(reqs))
	for i, r := range reqs {
		ch, err := e.Submit(context.Background(), r)
		if err != nil {
			b.Fatal(err)
		}
		chans[i] = ch
	}
	n := 0
	for _, ch := range chans {
		r := collect(b, ch)
		if r.err != nil {
			b.Fatal(r.err)
		}
		n += r.usage.CompletionTokens
	}
	return n
}

// runCounting submits reqs together and returns the most that were running at
// once and how many generated gen tokens.
func runCounting(b *testing.B, e *Engine, reqs []*completion.Request, gen int) (peak, complete int) {
	var mu sync.Mutex
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				mu.Lock()
				peak = max(peak, e.Stats().SlotsBusy)
				mu.Unlock()
			}
		}
	}()
	var chans []<-chan completion.Event
	for _, r := range reqs {
		// A prompt-too-long refusal: the conversation does not fit a stream.
		if ch, err := e.Submit(context.Background(), r); err == nil {
			chans = append(chans, ch)
		} else if !errors.As(err, new(*completion.PromptTooLongError)) {
			b.Fatal(err)
		}
	}
	for _, ch := range chans {
		r := collect(b, ch)
		if r.err == nil && r.usage.CompletionTokens == gen {
			complete++
		}
	}
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	return peak, complete
}

func stopNow(e *Engine) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	e.Stop(ctx)
}
