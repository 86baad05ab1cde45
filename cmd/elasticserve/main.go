// Command elasticserve is an OpenAI-compatible chat server for GGUF vision-language
// models that compresses each request's KV cache with Elastic Cache.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/api"
	"github.com/elasticserve/elasticserve/config"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

func main() {
	cfg, err := config.Load(os.Args[1:], os.LookupEnv)
	if errors.Is(err, config.ErrHelp) {
		fmt.Fprint(os.Stdout, config.Usage())
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "elasticserve: %v\n", err)
		os.Exit(2)
	}
	log := newLogger(cfg)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error().Err(err).Msg("elasticserve stopped")
		os.Exit(1)
	}
}

func newLogger(cfg *config.Config) zerolog.Logger {
	level, err := cfg.ZerologLevel()
	if err != nil {
		level = zerolog.InfoLevel
	}
	var l zerolog.Logger
	if cfg.LogFormat == "json" {
		l = zerolog.New(os.Stderr)
	} else {
		l = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly})
	}
	return l.Level(level).With().Timestamp().Logger()
}

func llamaLogLevel(l zerolog.Level) llama.LogLevel {
	switch {
	case l <= zerolog.DebugLevel:
		return llama.LogInfo
	case l <= zerolog.WarnLevel:
		return llama.LogWarn
	default:
		return llama.LogError
	}
}

// backend adapts the engine to the HTTP layer.
type backend struct {
	eng   *engine.Engine
	model *llama.Model // for Tokenize and Detokenize
	info  api.BackendInfo
}

// Tokenize, Detokenize and CountPrompt run on the handler's goroutine while
// the engine's loop decodes, as Submit's own tokenization does: llama.cpp's
// tokenizer only reads the model's vocabulary, and llama.Vision serialises
// its mtmd calls (image preprocessing) with the loop's image encoding.

func (b *backend) Tokenize(_ context.Context, text string, addSpecial, parseSpecial bool) ([]int32, []string, error) {
	toks, err := b.model.Tokenize(text, addSpecial, parseSpecial)
	if err != nil {
		return nil, nil, err
	}
	pieces := make([]string, len(toks))
	for i, t := range toks {
		pieces[i] = string(b.model.TokenPiece(t, true))
	}
	return toks, pieces, nil
}

func (b *backend) Detokenize(_ context.Context, ids []int32) (string, error) {
	for _, id := range ids {
		// llama.cpp throws (and the process aborts) on an id outside the
		// vocabulary; the API checks too, this keeps the adapter safe alone.
		if id < 0 || int(id) >= b.info.VocabSize {
			return "", fmt.Errorf("token id %d is outside the vocabulary (0 to %d)", id, b.info.VocabSize-1)
		}
	}
	return b.model.Detokenize(ids, false, true), nil
}

func (b *backend) CountPrompt(_ context.Context, req *completion.Request) (int, error) {
	return b.eng.CountPrompt(req)
}

func (b *backend) Submit(ctx context.Context, req *completion.Request) (<-chan completion.Event, error) {
	return b.eng.Submit(ctx, req)
}

func (b *backend) Info() api.BackendInfo { return b.info }

func (b *backend) Ready() bool { return b.eng.Ready() }

func (b *backend) Stats() completion.Stats { return b.eng.Stats() }

// sizeContext sets cfg.CtxSize when it was left automatic: each slot gets the
// model's training context unless half the free memory (kvMemory) cannot hold
// the slots and a prefill context of that size; the log says which bound chose it.
func sizeContext(cfg *config.Config, model *llama.Model, log zerolog.Logger) error {
	perCell, err := kvBytesPerCell(cfg, model)
	if err != nil {
		return err
	}
	per, why := config.AutoSeqCells(model.Info().CtxTrain, cfg.Parallel, perCell, kvMemory(cfg))
	cfg.CtxSize = per * cfg.Parallel
	log.Info().Int("ctx_size", cfg.CtxSize).Int("per_slot", per).Int("parallel", cfg.Parallel).Str("why", why).
		Msg("context sized automatically (--ctx-size 0)")
	return nil
}

// sizePrefillStreams sets cfg.PrefillStreams when it was left automatic
// (config.AutoPrefillStreams, after the decode context is sized) and logs why.
func sizePrefillStreams(cfg *config.Config, model *llama.Model, log zerolog.Logger) error {
	perCell, err := kvBytesPerCell(cfg, model)
	if err != nil {
		return err
	}
	n, why := config.AutoPrefillStreams(cfg.Parallel, cfg.DecodeCells(), cfg.PrefillCells(model.Info().CtxTrain), perCell, kvMemory(cfg))
	cfg.PrefillStreams = n
	log.Info().Int("prefill_streams", n).Str("why", why).Msg("prefill streams chosen automatically (--prefill-streams 0)")
	return nil
}

// kvBytesPerCell is what a cell of either context costs, V taken as f16 (unless
// flash attention, the larger case).
func kvBytesPerCell(cfg *config.Config, model *llama.Model) (int64, error) {
	perCell, err := model.KVBytesPerCell(cfg.KVType, "f16")
	if err != nil {
		return 0, fmt.Errorf("--kv-type: %w", err)
	}
	return perCell, nil
}

// kvMemory is the free memory the KV caches are sized from: the GPU's when layers
// are offloaded, else the host's, within the process's cgroup limit.
func kvMemory(cfg *config.Config) config.Memory {
	if llama.HasGPU() && cfg.GPULayers != 0 {
		for _, d := range llama.Devices() {
			if d.Type == "gpu" && d.FreeBytes > 0 {
				return config.Memory{Free: d.FreeBytes, Source: "device " + d.Name}
			}
		}
	}
	return config.DetectHostMemory()
}
