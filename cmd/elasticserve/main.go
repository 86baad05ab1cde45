// Command elasticserve is an OpenAI-compatible chat server for GGUF vision-language
// models that compresses each request's KV cache with Elastic Cache.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
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

func run(ctx context.Context, cfg *config.Config, log zerolog.Logger) error {
	// The dependency reports CPU features through slog at start-up; we log them ourselves.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	llama.Init(llamaLogLevel(log.GetLevel()))
	log.Info().Str("system", llama.SystemInfo()).Msg("llama.cpp")
	log.Info().Int("threads", cfg.Threads).Str("source", cfg.ThreadsSource).Msg("CPU threads")
	for _, d := range llama.Devices() {
		log.Info().Str("device", d.Name).Str("description", d.Description).Str("type", d.Type).
			Uint64("free_mib", d.FreeBytes>>20).Uint64("total_mib", d.TotalBytes>>20).Msg("backend device")
	}

	start := time.Now()
	lastPct := -1
	model, err := llama.LoadModel(cfg.Model, llama.ModelParams{
		GPULayers: cfg.GPULayers,
		UseMmap:   true,
		Progress: func(f float32) bool {
			if pct := int(f*4) * 25; pct != lastPct {
				lastPct = pct
				log.Info().Int("percent", pct).Msg("loading model")
			}
			return ctx.Err() == nil
		},
	})
	if err != nil {
		return err
	}
	defer model.Close()
	if err := model.SetChatTemplate(cfg.ChatTemplate); err != nil {
		return fmt.Errorf("--chat-template: %w", err)
	}
	if err := model.CheckChatTemplate(); err != nil {
		return fmt.Errorf("the model's chat template cannot be applied by llama.cpp (%v): choose a built-in one with --chat-template NAME (e.g. chatml, gemma, llama2, vicuna)", err)
	}
	info := model.Info()
	log.Info().Str("model", cfg.Model).Str("arch", info.Arch).Str("desc", info.Desc).Int("layers", info.Layers).
		Int("heads", info.Heads).Int("kv_heads", info.KVHeads).Int("embd", info.Embd).Int("ctx_train", info.CtxTrain).
		Dur("took", time.Since(start)).Msg("model loaded")

	var vision *llama.Vision
	if cfg.MMProj != "" {
		vision, err = llama.LoadVision(model, cfg.MMProj, llama.VisionParams{Threads: cfg.Threads, UseGPU: llama.HasGPU() && cfg.GPULayers != 0, FlashAttn: cfg.FlashAttn})
		if err != nil {
			return err
		}
		defer vision.Close()
		log.Info().Str("mmproj", cfg.MMProj).Msg("vision encoder loaded")
	}

	if cfg.CtxSize == 0 {
		if err := sizeContext(cfg, model, log); err != nil {
			return err
		}
	}
	hostCache := cfg.CacheRAMBytes(config.DetectHostMemory()) // after the model is loaded: a share of what is left
	var modelIdentity [32]byte
	if cfg.CacheDir != "" {
		if modelIdentity, err = engine.ModelIdentity(cfg.Model, cfg.MMProj); err != nil {
			return err
		}
	}
	eng, err := engine.Start(model, vision, engine.Options{
		Parallel:        cfg.Parallel,
		CtxSize:         cfg.DecodeCells(),
		BatchSize:       cfg.BatchSize,
		UBatchSize:      cfg.UBatchSize,
		Threads:         cfg.Threads,
		FlashAttn:       cfg.FlashAttn,
		Unified:         cfg.KVUnified,
		KVType:          cfg.KVType,
		PrefillCtx:      cfg.PrefillCells(info.CtxTrain),
		DecodeFlashAttn: cfg.DecodeFlash(llama.HasGPU() && cfg.GPULayers != 0) && !cfg.FlashAttn,
		QueueSize:       cfg.QueueSize,
		Reuse:           cfg.CacheReuse,
		ReuseCompressed: cfg.CacheReuseCompressed,
		// MiB as bytes
		ImageCacheBytes: int64(cfg.ImageCacheMB) << 20,
		HostCacheBytes:  hostCache,
		CacheDir:        cfg.CacheDir,
		CacheDirBytes:   int64(cfg.CacheDirMB) << 20,
		ModelID:         modelIdentity,
		Log:             log,
	})
	if err != nil {
		return err
	}
	log.Info().Float64("cache_ram_mib", float64(hostCache)/(1<<20)).Msg("host tier for held conversations")
	for _, c := range eng.Contexts() {
		log.Info().Str("context", c.Role).Int("cells", c.Cells).Int("streams", c.Streams).Int("cells_per_stream", c.Cells/c.Streams).
			Str("kv", c.Layout).Bool("flash_attn", c.FlashAttn).Float64("kv_mib", float64(c.Bytes())/(1<<20)).Msg("llama context")
	}
	stopNow, cancelStop := context.WithCancel(context.Background())
	cancelStop()
	defer eng.Stop(stopNow) // on an early return: fail what runs and free the context

	modelID := filepath.Base(cfg.Model)
	created := time.Now()
	if st, err := os.Stat(cfg.Model); err == nil {
		created = st.ModTime()
	}
	backend := &backend{eng: eng, model: model, info: api.BackendInfo{
		ModelID: modelID, Created: created, CtxPerSeq: eng.SeqCells(), Vision: vision != nil, Slots: cfg.Parallel,
		MediaMarker: llama.MediaMarker(), VocabSize: info.VocabSize,
	}}
	for _, c := range eng.Contexts() {
		backend.info.KVContexts = append(backend.info.KVContexts, api.KVContext{Role: c.Role, Cells: c.Cells, Bytes: c.Bytes()})
	}
	for _, p := range eng.Policies() {
		backend.info.CachePolicies = append(backend.info.CachePolicies, api.ModelPolicy{Policy: string(p.Policy), Supported: p.Supported, Reason: p.Reason})
		if p.Supported {
			log.Info().Str("policy", string(p.Policy)).Msg("cache policy supported by this model")
		} else {
			log.Warn().Str("policy", string(p.Policy)).Str("reason", p.Reason).Msg("cache policy not supported by this model (requests for it get 400)")
		}
	}
	handler := api.New(api.OptionsFromConfig(cfg), backend, log)

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Addr, err)
	}
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       2 * time.Minute, // bodies with images; streams write, so no WriteTimeout
		IdleTimeout:       2 * time.Minute,
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info().Str("url", "http://"+ln.Addr().String()).Int("parallel", cfg.Parallel).Int("ctx_size", cfg.CtxSize).
		Int("cells_per_seq", eng.SeqCells()).Str("policy", cfg.Policy).Float64("budget", cfg.Budget).Msg("elasticserve listening")

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	log.Info().Dur("grace", cfg.ShutdownGrace).Msg("shutting down: finishing in-flight requests")
	grace, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancel()
	// The engine stops admitting at once (new requests get 503) and fails what is
	// still running when the grace ends; the HTTP server waits for the handlers.
	stopped := make(chan struct{})
	go func() { eng.Stop(grace); close(stopped) }()
	err = srv.Shutdown(grace)
	<-stopped
	if errors.Is(err, context.DeadlineExceeded) {
		// The engine has failed the requests still running; let their handlers send
		// that error (an SSE error event, or a 503) before the process exits, so a
		// stream is never just cut off.
		final, cancelFinal := context.WithTimeout(context.Background(), 5*time.Second)
		_ = srv.Shutdown(final)
		cancelFinal()
		_ = srv.Close()
	}
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	log.Info().Msg("bye")
	return nil
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
// model's training context unless half the free memory (the GPU's when layers are
// offloaded, else the host's, within the process's cgroup limit) cannot hold the
// slots and a prefill context of that size; the log says which bound chose it.
func sizeContext(cfg *config.Config, model *llama.Model, log zerolog.Logger) error {
	perCell, err := model.KVBytesPerCell(cfg.KVType, "f16") // V: f16 unless flash attention, the larger case
	if err != nil {
		return fmt.Errorf("--kv-type: %w", err)
	}
	mem := config.DetectHostMemory()
	if llama.HasGPU() && cfg.GPULayers != 0 {
		for _, d := range llama.Devices() {
			if d.Type == "gpu" && d.FreeBytes > 0 {
				mem = config.Memory{Free: d.FreeBytes, Source: "device " + d.Name}
				break
			}
		}
	}
	per, why := config.AutoSeqCells(model.Info().CtxTrain, cfg.Parallel, perCell, mem)
	cfg.CtxSize = per * cfg.Parallel
	log.Info().Int("ctx_size", cfg.CtxSize).Int("per_slot", per).Int("parallel", cfg.Parallel).Str("why", why).
		Msg("context sized automatically (--ctx-size 0)")
	return nil
}
