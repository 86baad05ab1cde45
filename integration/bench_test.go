package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// BenchmarkServerVsDirect compares greedy decode speed through the whole
// server (HTTP, JSON, SSE, the engine's loop and its cache bookkeeping) with
// decoding the same prompt straight through the llama package in this
// process: same model, one thread, one sequence, the full policy (nothing
// evicted), same number of tokens.
//
// Decode rate = (tokens - 1) / (time of the last token - time of the first),
// so prompt encoding is left out on both sides; through the server the
// times are when the first content delta and the finish_reason chunk reach
// the client. Each iteration runs several alternating rounds and keeps the
// best rate of each side, which damps noise from other work on the machine.
// Reported: server_tok/s, direct_tok/s and ratio = server / direct; also
// engine_tok/s, the engine package driven in this process without HTTP,
// which splits the gap between the decode loop and the HTTP/SSE path.
//
// Two models: "tiny" is the test model (about 0.1 ms of compute per token,
// so fixed per-token costs dominate its ratio); "medium" is a generated
// model of about 20M parameters (milliseconds per token on one core), closer
// to what the server's overhead means next to a real model.
func BenchmarkServerVsDirect(b *testing.B) {
	b.Run("tiny", func(b *testing.B) { benchServerVsDirect(b, modelPath, 5) })
	b.Run("medium", func(b *testing.B) {
		opt := testmodel.DefaultOptions()
		opt.Layers, opt.Embd, opt.Heads, opt.KVHeads, opt.FF = 6, 512, 8, 4, 1536
		opt.VocabSize, opt.F16 = 8000, true
		mp, _, err := testmodel.Ensure(opt)
		if err != nil {
			b.Fatal(err)
		}
		benchServerVsDirect(b, mp, 3)
	})
}

func benchServerVsDirect(b *testing.B, modelFile string, rounds int) {
	const (
		genTokens = 256
		ctxSize   = 1024
	)
	prompt := "Describe, in as much detail as you can, a red circle drawn on a white square."

	s, err := startServer(b.Name(), serverSpec{model: modelFile, flags: []string{
		"--parallel", "1", "--ctx-size", fmt.Sprint(ctxSize), "--policy", "full",
	}})
	if err != nil {
		b.Fatal(err)
	}
	defer s.stop(30 * time.Second)
	s.watch(b)

	llama.Init(llama.LogError)
	model, err := llama.LoadModel(modelFile, llama.ModelParams{GPULayers: -1, UseMmap: true})
	if err != nil {
		b.Fatal(err)
	}
	defer model.Close()
	// The engine's context for --parallel 1 with flash attention off.
	lctx, err := llama.NewContext(model, llama.ContextParams{
		NCtx: ctxSize, NBatch: 512, NUBatch: 512, NSeqMax: 1, Threads: 1, Capture: true, Unified: true,
	})
	if err != nil {
		b.Fatal(err)
	}
	defer lctx.Close()
	rendered, err := model.ApplyChatTemplate("", []llama.ChatMessage{{Role: "user", Content: prompt}}, true)
	if err != nil {
		b.Fatal(err)
	}
	toks, err := model.Tokenize(rendered, true, true)
	if err != nil {
		b.Fatal(err)
	}
	batch := llama.NewBatch(512, 0, 1)
	defer batch.Close()

	direct := func() (rate float64, text string) {
		lctx.SeqClear(0)
		smp := llama.NewSampler(llama.SamplerParams{Temperature: 0})
		defer smp.Close()
		batch.Clear()
		for i, t := range toks {
			batch.Add(t, i, 0, i == len(toks)-1)
		}
		if err := lctx.Decode(batch); err != nil {
			b.Fatal(err)
		}
		var out bytes.Buffer
		var u llama.UTF8Buffer
		tok := smp.Sample(lctx, batch.Len()-1)
		out.WriteString(u.Write(model.TokenPiece(tok, false)))
		first := time.Now()
		for n := 1; n < genTokens; n++ {
			batch.Clear()
			batch.Add(tok, len(toks)+n-1, 0, true)
			if err := lctx.Decode(batch); err != nil {
				b.Fatal(err)
			}
			tok = smp.Sample(lctx, 0)
			out.WriteString(u.Write(model.TokenPiece(tok, false)))
		}
		rate = float64(genTokens-1) / time.Since(first).Seconds()
		out.WriteString(u.Flush())
		return rate, out.String()
	}

	body := mustJSON(b, map[string]any{
		"messages":       []any{map[string]any{"role": "user", "content": prompt}},
		"max_tokens":     genTokens,
		"temperature":    0,
		"stream":         true,
		"stream_options": map[string]any{"include_usage": true},
		"elastic_cache":  map[string]any{"policy": "full"},
	})
	client := &http.Client{Timeout: 5 * time.Minute}
	viaServer := func() (rate float64, text string) {
		req, err := http.NewRequest(http.MethodPost, s.URL+"/v1/chat/completions", bytes.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("status %d", resp.StatusCode)
		}
		var first, last time.Time
		var res streamResult
		readSSE(resp.Body, &res, func(c *chunk) bool {
			if len(c.Choices) == 0 {
				return true
			}
			if d := c.Choices[0].Delta.Content; d != nil && *d != "" && first.IsZero() {
				first = time.Now()
			}
			if c.Choices[0].FinishReason != nil {
				last = time.Now()
			}
			return true
		})
		if res.ReadErr != nil || res.Err != nil || !res.Done || res.Usage == nil || res.Usage.Completion != genTokens {
			b.Fatalf("stream: read error %v, error event %+v, done %v, usage %+v", res.ReadErr, res.Err, res.Done, res.Usage)
		}
		return float64(genTokens-1) / last.Sub(first).Seconds(), res.Text
	}

	// The engine alone, as the server drives it (--parallel 1, unified pool).
	eng, err := engine.Start(model, nil, engine.Options{
		Parallel: 1, CtxSize: ctxSize, BatchSize: 512, UBatchSize: 512, Threads: 1, Unified: true,
		QueueSize: 4, Log: zerolog.Nop(),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer eng.Stop(context.Background())
	cache := elasticcache.DefaultConfig()
	cache.Policy = elasticcache.Full
	fullSpec := elasticcache.MustSpec(cache)
	viaEngine := func() (rate float64, text string) {
		ch, err := eng.Submit(context.Background(), &completion.Request{
			ID:        "bench",
			Messages:  []completion.Message{{Role: "user", Parts: []completion.Part{completion.Text(prompt)}}},
			MaxTokens: genTokens,
			Sampling:  completion.Sampling{Temperature: 0},
			Cache:     fullSpec,
		})
		if err != nil {
			b.Fatal(err)
		}
		var first, last time.Time
		var out bytes.Buffer
		for ev := range ch {
			if ev.Text != "" && first.IsZero() {
				first = time.Now()
			}
			out.WriteString(ev.Text)
			if ev.Done {
				last = time.Now()
				if ev.Err != nil || ev.Usage.CompletionTokens != genTokens {
					b.Fatalf("engine: err %v, %d tokens", ev.Err, ev.Usage.CompletionTokens)
				}
			}
		}
		return float64(genTokens-1) / last.Sub(first).Seconds(), out.String()
	}

	// Warm every path once (first graph allocations, page cache) and check
	// they generate the same greedy text.
	_, directText := direct()
	_, serverText := viaServer()
	_, engineText := viaEngine()
	if jsonText(directText) != serverText || engineText != directText {
		b.Errorf("greedy outputs differ:\n server: %q\n engine: %q\n direct: %q", serverText, engineText, directText)
	}

	var bestServer, bestEngine, bestDirect float64
	b.ResetTimer()
	for range b.N {
		for r := range rounds {
			// Alternate the order so slow phases of the machine hit all sides.
			runs := []func(){
				func() { bestServer = max(bestServer, first(viaServer())) },
				func() { bestEngine = max(bestEngine, first(viaEngine())) },
				func() { bestDirect = max(bestDirect, first(direct())) },
			}
			for i := range runs {
				runs[(i+r)%len(runs)]()
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(bestServer, "server_tok/s")
	b.ReportMetric(bestEngine, "engine_tok/s")
	b.ReportMetric(bestDirect, "direct_tok/s")
	b.ReportMetric(bestServer/bestDirect, "ratio")
}

func first(rate float64, _ string) float64 { return rate }

// jsonText is s as it looks after a trip through JSON (invalid UTF-8
// becomes U+FFFD), which is how the server's text reaches the client.
func jsonText(s string) string {
	raw, _ := json.Marshal(s)
	var out string
	_ = json.Unmarshal(raw, &out)
	return out
}
