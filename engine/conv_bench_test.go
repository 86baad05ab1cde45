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

// BenchmarkConversationTTFT prints the time to first token of each turn of a
// 4-turn image conversation (a picture and a question, then three text
// questions, 16 greedy tokens per answer), each turn sent as the whole history
// the way chat clients send it: without reuse (every turn encodes the picture and
// the history again), and with reuse (image cache and held cells: full continues
// the shared prefix, elastic 0.5 its compressed conversation). Ratios come from
// one run on one machine.
//
//	go test -run '^$' -bench ConversationTTFT -benchtime 1x -timeout 30m ./engine/
//
// Models: the demo model (models/demo) and a larger random model
// (12 layers, width 768, f16, 576 image tokens, like LLaVA-1.5's count). A random
// model's answer starts anywhere; the chat template renders a past answer after
// "ASSISTANT: ", so its requests start the answer with that space (AnswerPrefix),
// as a trained model's answer does, and the history matches what was generated.
// convBenchModel is the conversation benchmarks' larger model: a 12-layer,
// width-768 f16 random llama (about 125M parameters) whose projector gives 576
// image tokens.
func convBenchModel() testmodel.Options {
	o := testmodel.DefaultOptions()
	o.Layers, o.Embd, o.Heads, o.KVHeads, o.FF, o.F16 = 12, 768, 12, 4, 2048, true
	o.ImageSize, o.PatchSize, o.VisionEmbd, o.VisionLayers, o.VisionHeads, o.VisionFF = 336, 14, 256, 6, 4, 1024
	return o
}

// openBenchModel loads a model and its projector; the returned func closes both.
func openBenchModel(b testing.TB, mp, vp string) (*llama.Model, *llama.Vision, func()) {
	m, err := llama.LoadModel(mp, llama.ModelParams{UseMmap: true})
	if err != nil {
		b.Fatal(err)
	}
	v, err := llama.LoadVision(m, vp, llama.VisionParams{Threads: 2})
	if err != nil {
		m.Close()
		b.Fatal(err)
	}
	return m, v, func() { v.Close(); m.Close() }
}

func BenchmarkConversationTTFT(b *testing.B) {
	larger := convBenchModel()
	type model struct {
		name       string
		load       func() (*llama.Model, *llama.Vision, func())
		answerFrom string
	}
	open := func(mp, vp string) (*llama.Model, *llama.Vision, func()) { return openBenchModel(b, mp, vp) }
	models := []model{
		{"demo", func() (*llama.Model, *llama.Vision, func()) {
			dir := filepath.Join("..", "models", "demo")
			return open(filepath.Join(dir, "model.gguf"), filepath.Join(dir, "mmproj.gguf"))
		}, ""},
		{"random 12x768 f16", func() (*llama.Model, *llama.Vision, func()) {
			mp, vp, err := testmodel.Ensure(larger)
			if err != nil {
				b.Fatal(err)
			}
			return open(mp, vp)
		}, " "},
	}
	questions := []string{"What color is the circle?", "How many shapes are there?", "Where is the square?", "What color is the square?"}
	img, err := os.ReadFile(filepath.Join("..", "models", "demo", "example.png"))
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "model\tpolicy\tturn\tprompt tokens\tcached\tTTFT no reuse ms\tTTFT reuse ms\tspeedup\t")
		for _, md := range models {
			m, v, closeModel := md.load()
			for _, spec := range []elasticcache.Spec{{}, cfg(elasticcache.Elastic, 0.5)} {
				plain := conversationTTFT(b, m, v, spec, false, img, questions, md.answerFrom)
				reused := conversationTTFT(b, m, v, spec, true, img, questions, md.answerFrom)
				for t := range questions {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%.1f\t%.1f\t%.2fx\t\n", md.name, spec.Policy(), t+1, reused[t].prompt, reused[t].cached,
						ms(plain[t].ttft), ms(reused[t].ttft), plain[t].ttft.Seconds()/reused[t].ttft.Seconds())
				}
			}
			closeModel()
		}
		tw.Flush()
	}
}

type turnTiming struct {
	ttft           time.Duration
	prompt, cached int
}

// conversationTTFT runs the conversation on a fresh engine and returns each
// turn's time from Submit to its first token.
func conversationTTFT(b *testing.B, m *llama.Model, v *llama.Vision, spec elasticcache.Spec, reuse bool, img []byte, questions []string, prefix string) []turnTiming {
	opts := Options{Parallel: 2, CtxSize: 2 * 4096, BatchSize: 512, Threads: 2, Log: zerolog.Nop()}
	if reuse {
		opts.Reuse, opts.ReuseCompressed, opts.ImageCacheBytes = true, true, 256<<20
	}
	e, err := Start(m, v, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		e.Stop(ctx)
	}()
	var history []completion.Message
	var out []turnTiming
	for t, q := range questions {
		parts := []completion.Part{completion.Text(q)}
		if t == 0 {
			parts = append(parts, completion.Image(img))
		}
		history = append(history, completion.Message{Role: "user", Parts: parts})
		req := &completion.Request{ID: fmt.Sprint("turn", t), Messages: history, MaxTokens: 16, Cache: spec,
			Sampling: completion.Sampling{Temperature: 0, RepeatPenalty: 1}, AnswerPrefix: prefix}
		start := time.Now()
		ch, err := e.Submit(context.Background(), req)
		if err != nil {
			b.Fatal(err)
		}
		var first time.Duration
		var text string
		for ev := range ch {
			if first == 0 && (ev.Text != "" || ev.Done) {
				first = time.Since(start)
			}
			text += ev.Text
			if ev.Done {
				if ev.Err != nil {
					b.Fatal(ev.Err)
				}
				out = append(out, turnTiming{ttft: first, prompt: ev.Usage.PromptTokens, cached: ev.Usage.CachedTokens})
				break
			}
		}
		history = append(history, completion.Message{Role: "assistant", Parts: []completion.Part{completion.Text(text)}})
	}
	return out
}
