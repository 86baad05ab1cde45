package engine

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// BenchmarkHostTierTTFT prints the time to first token of each turn of a 4-turn
// picture conversation (16 greedy tokens per answer, the whole history sent each
// turn) on one slot where, between its turns, another picture conversation takes
// the slot: without reuse (every turn encodes the picture and the history
// again), with the host tier (the conversation leaves for host memory and is
// restored) and with the disk tier alone (--cache-ram-mb 0: it leaves for a file
// in a temporary directory and is read back), under full and elastic 0.5
// (compressed memory); and the bytes the tier holds for the conversation after
// its last turn. The model is the
// 12-layer, width-768 f16 random llama with 576 image tokens (about 125M
// parameters; conv_bench_test.go's "random 12x768 f16"). Ratios come from one run
// on one machine.
//
//	go test -run '^$' -bench HostTierTTFT -benchtime 1x -timeout 30m ./engine/
func BenchmarkHostTierTTFT(b *testing.B) {
	mp, vp, err := testmodel.Ensure(convBenchModel())
	if err != nil {
		b.Fatal(err)
	}
	m, v, closeModel := openBenchModel(b, mp, vp)
	defer closeModel()
	img, err := os.ReadFile(filepath.Join("..", "models", "demo", "example.png"))
	if err != nil {
		b.Fatal(err)
	}
	other := onePixelOff(b, img)
	questions := []string{"What color is the circle?", "How many shapes are there?", "Where is the square?", "What color is the square?"}
	for range b.N {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "policy\tturn\tprompt tokens\tcached\tTTFT encoded ms\tTTFT host ms\tTTFT disk ms\thost speedup\tdisk speedup\thost bytes\t")
		for _, spec := range []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5)} {
			plain, _ := hostTierTurns(b, m, v, spec, "", img, other, questions)
			host, bytes := hostTierTurns(b, m, v, spec, "host", img, other, questions)
			disk, _ := hostTierTurns(b, m, v, spec, "disk", img, other, questions)
			for t := range questions {
				fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.2fx\t%.2fx\t%d\t\n", spec.Policy(), t+1, host[t].prompt, host[t].cached,
					ms(plain[t].ttft), ms(host[t].ttft), ms(disk[t].ttft), plain[t].ttft.Seconds()/host[t].ttft.Seconds(),
					plain[t].ttft.Seconds()/disk[t].ttft.Seconds(), bytes)
			}
		}
		tw.Flush()
	}
}

type hostTurn struct {
	turnTiming
	from, text string
}

// hostTierTurns runs the conversation on a fresh one-slot engine, with another
// picture conversation's turn between its turns (none when other is nil); tier
// "host" or "disk" says where the conversation goes when it leaves its slot, ""
// turns reuse off.
// It returns each turn's timing and the bytes of the conversation the host tier
// stored last: this one's after its last turn, when the other took the slot once
// more.
func hostTierTurns(b testing.TB, m *llama.Model, v *llama.Vision, spec elasticcache.Spec, tier string, img, other []byte, questions []string) ([]hostTurn, int64) {
	opts := Options{Parallel: 1, CtxSize: 4096, BatchSize: 512, Threads: 2, Log: zerolog.Nop(), ImageCacheBytes: 256 << 20}
	if _, ok := b.(*testing.T); ok {
		opts.Threads = 1 // a test: the benchmark's conversation on the test model
	}
	switch tier {
	case "host":
		opts.Reuse, opts.ReuseCompressed, opts.HostCacheBytes = true, true, 1<<30
	case "disk":
		opts.Reuse, opts.ReuseCompressed, opts.CacheDir = true, true, b.TempDir()
	}
	e, err := Start(m, v, opts)
	if err != nil {
		b.Fatal(err)
	}
	stop := func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		e.Stop(ctx)
	}
	ask := func(id string, msgs []completion.Message, reuse bool) (hostTurn, string) {
		req := &completion.Request{ID: id, Messages: msgs, MaxTokens: 16, Cache: spec, Sampling: completion.Sampling{Temperature: 0, RepeatPenalty: 1}, AnswerPrefix: " "}
		if !reuse {
			req.Reuse = &reuse
		}
		start := time.Now()
		ch, err := e.Submit(context.Background(), req)
		if err != nil {
			stop()
			b.Fatal(err)
		}
		var out hostTurn
		var text string
		for ev := range ch {
			if out.ttft == 0 && (ev.Text != "" || ev.Done) {
				out.ttft = time.Since(start)
			}
			text += ev.Text
			if ev.Done {
				if ev.Err != nil {
					stop()
					b.Fatal(ev.Err)
				}
				out.prompt, out.cached, out.text = ev.Usage.PromptTokens, ev.Usage.CachedTokens, text
				if ev.KV != nil {
					out.from = ev.KV.ReusedFrom
				}
				break
			}
		}
		return out, text
	}
	var history []completion.Message
	var out []hostTurn
	for t, q := range questions {
		parts := []completion.Part{completion.Text(q)}
		if t == 0 {
			parts = append(parts, completion.Image(img))
		}
		history = append(history, completion.Message{Role: "user", Parts: parts})
		turn, text := ask(fmt.Sprint("turn", t), history, true)
		out = append(out, turn)
		history = append(history, completion.Message{Role: "assistant", Parts: []completion.Part{completion.Text(text)}})
		if other == nil {
			continue
		}
		// Another conversation takes the slot (it is not held itself, so the host
		// tier holds this conversation alone).
		ask(fmt.Sprint("other", t), []completion.Message{{Role: "user", Parts: []completion.Part{completion.Text("Describe this one."), completion.Image(other)}}}, false)
	}
	stop() // the loop is done: its host tier may be read here
	var held int64
	var newest uint64
	for _, h := range e.host.entries {
		if h.used >= newest {
			newest, held = h.used, h.bytes
		}
	}
	if tier == "disk" {
		held = e.Stats().DiskCache.Bytes
	}
	return out, held
}
