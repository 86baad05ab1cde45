package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/api"
	"github.com/elasticserve/elasticserve/config"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/llama"
)

// run loads the model (and projector), starts the engine, serves the API until
// ctx ends (SIGINT, SIGTERM) and then drains. Everything it opens is closed
// when it returns.
func run(ctx context.Context, cfg *config.Config, log zerolog.Logger) error {
	opts, err := apiOptions(cfg)
	if err != nil {
		return err
	}
	initLlama(cfg, log)
	model, err := loadModel(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer model.Close()
	vision, err := loadVision(cfg, model, log)
	if err != nil {
		return err
	}
	if vision != nil {
		defer vision.Close()
	}
	if cfg.CtxSize == 0 {
		if err := sizeContext(cfg, model, log); err != nil {
			return err
		}
	}
	if cfg.PrefillStreams == 0 {
		if err := sizePrefillStreams(cfg, model, log); err != nil {
			return err
		}
	}
	eng, err := startEngine(cfg, model, vision, log)
	if err != nil {
		return err
	}
	stopNow, cancelStop := context.WithCancel(context.Background())
	cancelStop()
	defer eng.Stop(stopNow) // on an early return: fail what runs and free the context
	handler := api.New(opts, newBackend(cfg, eng, model, vision, log), log)
	return serve(ctx, cfg, eng, handler, log)
}

// initLlama starts llama.cpp at the log level and logs the machine it runs on.
func initLlama(cfg *config.Config, log zerolog.Logger) {
	// The dependency reports CPU features through slog at start-up; we log them ourselves.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	llama.Init(llamaLogLevel(log.GetLevel()))
	log.Info().Str("system", llama.SystemInfo()).Msg("llama.cpp")
	log.Info().Int("threads", cfg.Threads).Str("source", cfg.ThreadsSource).Msg("CPU threads")
	for _, d := range llama.Devices() {
		log.Info().Str("device", d.Name).Str("description", d.Description).Str("type", d.Type).
			Uint64("free_mib", d.FreeBytes>>20).Uint64("total_mib", d.TotalBytes>>20).Msg("backend device")
	}
}

// loadModel loads the language model (logging progress by quarters; ctx ending
// stops it) and checks that llama.cpp can apply its chat template.
func loadModel(ctx context.Context, cfg *config.Config, log zerolog.Logger) (*llama.Model, error) {
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
		return nil, err
	}
	if err := chatTemplate(cfg, model); err != nil {
		model.Close()
		return nil, err
	}
	info := model.Info()
	log.Info().Str("model", cfg.Model).Str("arch", info.Arch).Str("desc", info.Desc).Int("layers", info.Layers).
		Int("heads", info.Heads).Int("kv_heads", info.KVHeads).Int("embd", info.Embd).Int("ctx_train", info.CtxTrain).
		Dur("took", time.Since(start)).Msg("model loaded")
	return model, nil
}

// chatTemplate sets --chat-template and checks that the template in use can be
// applied, so that a model llama.cpp cannot prompt fails at start, not per request.
func chatTemplate(cfg *config.Config, model *llama.Model) error {
	if err := model.SetChatTemplate(cfg.ChatTemplate); err != nil {
		return fmt.Errorf("--chat-template: %w", err)
	}
	if err := model.CheckChatTemplate(); err != nil {
		return fmt.Errorf("the model's chat template cannot be applied by llama.cpp (%v): choose a built-in one with --chat-template NAME (e.g. chatml, gemma, llama2, vicuna)", err)
	}
	return nil
}

// loadVision loads the multimodal projector; nil without --mmproj.
func loadVision(cfg *config.Config, model *llama.Model, log zerolog.Logger) (*llama.Vision, error) {
	if cfg.MMProj == "" {
		return nil, nil
	}
	vision, err := llama.LoadVision(model, cfg.MMProj, llama.VisionParams{Threads: cfg.Threads, UseGPU: llama.HasGPU() && cfg.GPULayers != 0, FlashAttn: cfg.FlashAttn})
	if err != nil {
		return nil, err
	}
	log.Info().Str("mmproj", cfg.MMProj).Msg("vision encoder loaded")
	return vision, nil
}

// startEngine starts the engine with the configuration's sizes and tiers and
// logs the contexts it made.
func startEngine(cfg *config.Config, model *llama.Model, vision *llama.Vision, log zerolog.Logger) (*engine.Engine, error) {
	hostCache := cfg.CacheRAMBytes(config.DetectHostMemory()) // after the model is loaded: a share of what is left
	var modelIdentity [32]byte
	if cfg.CacheDir != "" {
		var err error
		if modelIdentity, err = engine.ModelIdentity(cfg.Model, cfg.MMProj); err != nil {
			return nil, err
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
		PrefillCtx:      cfg.PrefillCells(model.Info().CtxTrain),
		PrefillStreams:  cfg.PrefillStreams,
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
		return nil, err
	}
	log.Info().Float64("cache_ram_mib", float64(hostCache)/(1<<20)).Msg("host tier for held conversations")
	for _, c := range eng.Contexts() {
		log.Info().Str("context", c.Role).Int("cells", c.Cells).Int("streams", c.Streams).Int("cells_per_stream", c.Cells/c.Streams).
			Str("kv", c.Layout).Bool("flash_attn", c.FlashAttn).Float64("kv_mib", float64(c.Bytes())/(1<<20)).Msg("llama context")
	}
	return eng, nil
}

// newBackend describes the loaded model and the engine to the API, logging
// which cache policies this model supports.
func newBackend(cfg *config.Config, eng *engine.Engine, model *llama.Model, vision *llama.Vision, log zerolog.Logger) *backend {
	created := time.Now()
	if st, err := os.Stat(cfg.Model); err == nil {
		created = st.ModTime()
	}
	b := &backend{eng: eng, model: model, info: api.BackendInfo{
		ModelID: filepath.Base(cfg.Model), Created: created, CtxPerSeq: eng.SeqCells(), Vision: vision != nil, Slots: cfg.Parallel,
		MediaMarker: llama.MediaMarker(), VocabSize: model.Info().VocabSize,
	}}
	for _, c := range eng.Contexts() {
		b.info.KVContexts = append(b.info.KVContexts, api.KVContext{Role: c.Role, Cells: c.Cells, Bytes: c.Bytes()})
	}
	for _, p := range eng.Policies() {
		b.info.CachePolicies = append(b.info.CachePolicies, api.ModelPolicy{Policy: string(p.Policy), Supported: p.Supported, Reason: p.Reason})
		if p.Supported {
			log.Info().Str("policy", string(p.Policy)).Msg("cache policy supported by this model")
		} else {
			log.Warn().Str("policy", string(p.Policy)).Str("reason", p.Reason).Msg("cache policy not supported by this model (requests for it get 400)")
		}
	}
	return b
}

// serve listens on --addr and serves handler until ctx ends, then drains: the
// engine stops admitting and the running requests get --shutdown-grace to
// finish before they are failed.
func serve(ctx context.Context, cfg *config.Config, eng *engine.Engine, handler http.Handler, log zerolog.Logger) error {
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
	if err := drain(srv, eng, cfg.ShutdownGrace, log); err != nil {
		return err
	}
	log.Info().Msg("bye")
	return nil
}

// drain shuts srv and eng down within grace. The engine stops admitting at once
// (new requests get 503) and fails what is still running when the grace ends;
// the HTTP server waits for the handlers.
func drain(srv *http.Server, eng *engine.Engine, grace time.Duration, log zerolog.Logger) error {
	log.Info().Dur("grace", grace).Msg("shutting down: finishing in-flight requests")
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	stopped := make(chan struct{})
	go func() { eng.Stop(ctx); close(stopped) }()
	err := srv.Shutdown(ctx)
	<-stopped
	if errors.Is(err, context.DeadlineExceeded) {
		// The engine has failed the requests still running; let their handlers send
		// that error (an SSE error event, or a 503) before the process exits, so a
		// stream is never just cut off.
		final, cancelFinal := context.WithTimeout(context.Background(), 5*time.Second)
		_ = srv.Shutdown(final)
		cancelFinal()
		_ = srv.Close()
		return nil
	}
	return err
}
