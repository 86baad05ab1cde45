// Package config loads the elasticserve server configuration from environment
// variables (prefix ELASTICSERVE_) and command-line flags. Flags win over the
// environment, which wins over the built-in defaults.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// EnvPrefix is prepended to every environment variable name.
const EnvPrefix = "ELASTICSERVE_"

// ErrHelp is returned by Load when the arguments ask for help (-h, --help).
// Print Usage() and exit 0.
var ErrHelp = flag.ErrHelp

// Config is the whole server configuration. The env tag of every field is the
// flag name upper-cased with '-' turned into '_' (plus EnvPrefix).
type Config struct {
	// Model is the path of the GGUF language model (required).
	Model string `env:"MODEL"`
	// MMProj is the path of the GGUF multimodal projector; empty: text only.
	MMProj string `env:"MMPROJ"`
	// ChatTemplate names a llama.cpp built-in chat template used instead of the
	// model's own (tokenizer.chat_template); empty: the model's.
	ChatTemplate string `env:"CHAT_TEMPLATE"`
	// Addr is the listen address, host:port.
	Addr string `env:"ADDR" envDefault:"127.0.0.1:8080"`

	// CtxSize is the number of KV cells of the decode context in total: one stream
	// of CtxSize/Parallel cells per slot (or one shared pool with KVUnified). 0
	// (the default): sized when the model is loaded (AutoSeqCells: the training
	// context per slot, unless half the free memory holds less).
	CtxSize int `env:"CTX_SIZE" envDefault:"0"`
	// Parallel is the number of sequences decoded at the same time (slots).
	Parallel int `env:"PARALLEL" envDefault:"4"`
	// Threads is the number of CPU threads for generation; 0 (the default): the
	// CPUs the process may keep busy (DetectCPUs: its cgroup's quota, else its
	// affinity), with ThreadsSource saying which.
	Threads int `env:"THREADS"`
	// ThreadsSource says where Threads came from (set by Load, not by the user).
	ThreadsSource string
	BatchSize     int  `env:"BATCH_SIZE" envDefault:"512"`
	UBatchSize    int  `env:"UBATCH_SIZE" envDefault:"512"`
	FlashAttn     bool `env:"FLASH_ATTN" envDefault:"false"`
	// KVUnified shares one pool of CtxSize cells between all slots and admits a request
	// when the cells its cache policy lets it hold fit (one context; every sequence
	// in a decode batch attends the whole pool's used range); false (the default)
	// gives each slot its own stream of CtxSize/Parallel cells and encodes the
	// prompts of compressing policies in a separate prefill context.
	KVUnified bool `env:"KV_UNIFIED" envDefault:"false"`
	// PrefillCtxSize is the prefill context's cells (the longest prompt a
	// compressing policy may send): 0 picks ceil(stream/budget) (see PrefillCells),
	// -1 turns the prefill context off (prompts are encoded in their stream).
	PrefillCtxSize int `env:"PREFILL_CTX_SIZE" envDefault:"0"`
	// DecodeFlashAttn is flash attention in the decode context only: auto (on
	// where the model runs on a GPU), on or off.
	DecodeFlashAttn string `env:"DECODE_FLASH_ATTN" envDefault:"auto"`
	// KVType is the KV cache row type: f16, bf16, f32, q8_0 or q4_0 (K always; V
	// only where flash attention is on, f16 otherwise).
	KVType string `env:"KV_TYPE" envDefault:"f16"`
	// GPULayers is how many layers go to a GPU when one is present (-1: all).
	GPULayers int `env:"GPU_LAYERS" envDefault:"-1"`

	// ModelAlias is the model id served by the API; default: Model's file
	// name without its extension.
	ModelAlias string `env:"MODEL_ALIAS"`
	// APIKey, when set, is required as "Authorization: Bearer <key>".
	APIKey string `env:"API_KEY"`
	// CORSOrigins is the comma-separated list of browser origins allowed to
	// call the API cross-origin ("*": any); empty: CORS off.
	CORSOrigins string `env:"CORS_ORIGINS"`
	// UI serves the playground page at GET / (chat with pictures, and what the
	// cache did to them); false: GET / is a 404.
	UI bool `env:"UI" envDefault:"true"`

	// Elastic Cache defaults (per request overridable).
	Policy   string  `env:"POLICY" envDefault:"elastic"`
	Budget   float64 `env:"BUDGET" envDefault:"0.8"`
	Sink     int     `env:"SINK" envDefault:"4"`
	Distance int     `env:"DISTANCE" envDefault:"-25"`
	// Selection is the default rule set of elastic and h2o: paper (the method
	// as published; the default, see elasticcache.DefaultConfig), reference
	// (parity with the authors' published code), normalized or text-tail.
	Selection string `env:"SELECTION" envDefault:"paper"`

	// Image limits.
	MaxImageBytes         ByteSize      `env:"MAX_IMAGE_BYTES" envDefault:"10MiB"`
	MaxImages             int           `env:"MAX_IMAGES" envDefault:"4"`
	MaxImagePixels        int64         `env:"MAX_IMAGE_PIXELS" envDefault:"16777216"`
	AllowImageURLs        bool          `env:"ALLOW_IMAGE_URLS" envDefault:"false"`
	AllowPrivateImageURLs bool          `env:"ALLOW_PRIVATE_IMAGE_URLS" envDefault:"false"`
	ImageURLTimeout       time.Duration `env:"IMAGE_URL_TIMEOUT" envDefault:"10s"`

	// HTTP limits.
	MaxBodyBytes ByteSize `env:"MAX_BODY_BYTES" envDefault:"64MiB"`
	QueueSize    int      `env:"QUEUE_SIZE" envDefault:"64"`

	// CacheReuse keeps a finished conversation's KV cells so that its next turn
	// continues from them; ImageCacheMB bounds the encoded images kept by content.
	CacheReuse   bool `env:"CACHE_REUSE" envDefault:"true"`
	ImageCacheMB int  `env:"IMAGE_CACHE_MB" envDefault:"256"`
	// CacheReuseCompressed also continues conversations that a compressing policy
	// left compressed. Off by default: by the rule in docs/quality ("Multi-turn")
	// it is on only if it costs at most 2 points of accuracy against encoding the
	// history again at the default setting, and on the word-level demo model it
	// costs 7.7 (it was on for the character-level model at text-tail 0.7).
	CacheReuseCompressed bool `env:"CACHE_REUSE_COMPRESSED" envDefault:"false"`
	// CacheRAMMB bounds the host tier: held conversations that lose their slot are
	// kept in host memory (compressed ones compressed) and restored when their next
	// turn comes. -1 (the default): CacheRAMShare of the memory the process may use
	// at start (HostMemoryFrom); 0: off. See CacheRAMBytes.
	CacheRAMMB int `env:"CACHE_RAM_MB" envDefault:"-1"`
	// CacheDir, when set, keeps conversations in files there so that they survive a
	// restart (the disk tier); CacheDirMB bounds the directory (0: unbounded).
	CacheDir       string        `env:"CACHE_DIR"`
	CacheDirMB     int           `env:"CACHE_DIR_MB" envDefault:"10240"`
	RequestTimeout time.Duration `env:"REQUEST_TIMEOUT" envDefault:"0s"`
	ShutdownGrace  time.Duration `env:"SHUTDOWN_GRACE" envDefault:"30s"`

	LogLevel  string `env:"LOG_LEVEL" envDefault:"info"`
	LogFormat string `env:"LOG_FORMAT" envDefault:"console"`

	// MaxTokensDefault is the completion-token limit of a request that sets
	// neither max_tokens nor max_completion_tokens; -1: no limit (until EOS or
	// the sequence's context is full).
	MaxTokensDefault int `env:"N_PREDICT" envDefault:"-1"`
}

// Load reads the configuration: built-in defaults, then the environment
// (looked up with lookupEnv; pass os.LookupEnv in main), then args (without
// the program name). It returns ErrHelp for -h/--help and otherwise a
// one-line error for anything invalid.
func Load(args []string, lookupEnv func(string) (string, bool)) (*Config, error) {
	if lookupEnv == nil {
		lookupEnv = func(string) (string, bool) { return "", false }
	}
	cfg := &Config{}
	if err := loadEnv(cfg, lookupEnv); err != nil {
		return nil, err
	}
	fs := newFlagSet(cfg)
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, ErrHelp
		}
		return nil, fmt.Errorf("config: %v (see --help)", err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("config: unexpected argument %q (all settings are --flags; see --help)", fs.Arg(0))
	}
	cfg.applyDerivedDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// Usage returns the --help text: every flag with its default and its
// environment variable.
func Usage() string {
	var b strings.Builder
	cfg := &Config{}
	// Built-in defaults only (no environment) so the text is reproducible.
	_ = loadEnv(cfg, func(string) (string, bool) { return "", false })
	fs := newFlagSet(cfg)
	fs.SetOutput(&b)
	fmt.Fprintf(&b, "Usage: elasticserve --model PATH [flags]\n\n")
	fmt.Fprintf(&b, "An OpenAI-compatible vision-language-model server. Every flag can also be set\n")
	fmt.Fprintf(&b, "through the environment variable named after it; flags win.\n\n")
	fs.PrintDefaults()
	return b.String()
}

// loadEnv fills cfg from the environment. caarlos0/env wants a map, so the
// variables it knows about are looked up one by one (no other variable is read).
func loadEnv(cfg *Config, lookupEnv func(string) (string, bool)) error {
	opts := env.Options{Prefix: EnvPrefix}
	params, err := env.GetFieldParamsWithOptions(cfg, opts)
	if err != nil {
		return fmt.Errorf("config: %v", err)
	}
	environ := make(map[string]string, len(params)) // non-nil: env must not fall back to os.Environ
	for _, p := range params {
		if v, ok := lookupEnv(p.Key); ok {
			environ[p.Key] = v
		}
	}
	opts.Environment = environ
	if err := env.ParseWithOptions(cfg, opts); err != nil {
		return fmt.Errorf("config: %s", oneLine(envErrorText(err)))
	}
	return nil
}

// envErrorText flattens env's aggregate error.
func envErrorText(err error) string {
	var agg env.AggregateError
	if errors.As(err, &agg) && len(agg.Errors) > 0 {
		parts := make([]string, len(agg.Errors))
		for i, e := range agg.Errors {
			parts[i] = e.Error()
			var pe env.ParseError
			if errors.As(e, &pe) {
				if f, ok := reflect.TypeFor[Config]().FieldByName(pe.Name); ok {
					parts[i] = fmt.Sprintf("%s: invalid %s value: %v", EnvPrefix+f.Tag.Get("env"), pe.Type, pe.Err)
				}
			}
		}
		return "environment: " + strings.Join(parts, "; ")
	}
	return "environment: " + err.Error()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// EnvName is the environment variable that mirrors a flag.
func EnvName(flagName string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// newFlagSet declares every flag with cfg's current value as its default, so
// parsing only overrides what the command line sets.
func newFlagSet(cfg *Config) *flag.FlagSet {
	fs := flag.NewFlagSet("elasticserve", flag.ContinueOnError)
	u := func(name, text string) (string, string) { return name, text + " (env " + EnvName(name) + ")" }
	str := func(p *string, name, text string) { n, t := u(name, text); fs.StringVar(p, n, *p, t) }
	num := func(p *int, name, text string) { n, t := u(name, text); fs.IntVar(p, n, *p, t) }
	boolean := func(p *bool, name, text string) { n, t := u(name, text); fs.BoolVar(p, n, *p, t) }
	dur := func(p *time.Duration, name, text string) { n, t := u(name, text); fs.DurationVar(p, n, *p, t) }
	size := func(p *ByteSize, name, text string) { n, t := u(name, text); fs.Var(p, n, t) }

	str(&cfg.Model, "model", "path of the GGUF model file (required)")
	str(&cfg.MMProj, "mmproj", "path of the GGUF multimodal projector; without it, requests with images are rejected")
	str(&cfg.ChatTemplate, "chat-template", "a llama.cpp built-in chat template (chatml, gemma, llama2, vicuna, smolvlm, ...) used instead of the model's own")
	str(&cfg.Addr, "addr", "listen address host:port")
	num(&cfg.CtxSize, "ctx-size", "decode KV cache cells in total: each of the --parallel slots owns ctx-size/parallel of them (0: the model's training context per slot, or less when half the free memory cannot hold that; the start-up log says which)")
	boolean(&cfg.KVUnified, "kv-unified", "one KV pool shared by all slots, one context, budget-aware admission (default false: a stream per slot and a prefill context)")
	num(&cfg.PrefillCtxSize, "prefill-ctx-size", "cells of the context that encodes prompts of compressing policies (0: ceil(stream/budget), at most the training context; -1: none)")
	str(&cfg.DecodeFlashAttn, "decode-flash-attn", "flash attention in the decode context: auto (on with a GPU), on or off")
	str(&cfg.KVType, "kv-type", "KV cache row type: f16, bf16, f32, q8_0 or q4_0 (V is quantized only where flash attention is on)")
	num(&cfg.GPULayers, "gpu-layers", "model layers offloaded to the GPU when one is present (-1: all, 0: none)")
	num(&cfg.Parallel, "parallel", "number of requests decoded at the same time (slots)")
	num(&cfg.Threads, "threads", "CPU threads used for generation (0: the CPUs the process may keep busy: its cgroup's CPU quota, rounded up, else the CPUs it may run on; on a machine shared with other work, fewer than the free cores)")
	num(&cfg.BatchSize, "batch-size", "logical batch size for prompt processing")
	num(&cfg.UBatchSize, "ubatch-size", "physical batch size (capped at --batch-size)")
	boolean(&cfg.FlashAttn, "flash-attn", "use flash attention")
	str(&cfg.ModelAlias, "model-alias", "model id reported by the API (default: the model file name without extension)")
	str(&cfg.APIKey, "api-key", "require 'Authorization: Bearer <key>' on the API and /metrics (/health and /ready stay open)")
	boolean(&cfg.UI, "ui", "serve the playground page at GET / (chat with pictures; shows what the cache kept, merged and dropped); false: GET / is a 404")
	str(&cfg.CORSOrigins, "cors-origins", "comma-separated browser origins (scheme://host[:port], one '*' wildcard allowed, or * for any) allowed to call the API cross-origin; empty: CORS off")
	str(&cfg.Policy, "policy", "default Elastic Cache policy: full, elastic, h2o or local")
	fs.Float64Var(&cfg.Budget, "budget", cfg.Budget, "default Elastic Cache budget: fraction of the prompt's KV entries to keep, in (0, 1] (env "+EnvName("budget")+")")
	num(&cfg.Sink, "sink", "default Elastic Cache sink: leading KV entries always kept")
	num(&cfg.Distance, "distance", "default Elastic Cache distance: elastic decode truncation offset")
	str(&cfg.Selection, "selection", "default Elastic Cache selection rules: paper (the default: the paper's rule as written), reference (parity with the authors' published code), normalized (elastic scores divided by the queries that see each entry) or text-tail (elastic keeps the text after the last image whole)")
	size(&cfg.MaxImageBytes, "max-image-bytes", "largest accepted image, in decoded bytes; a `size` like 10485760 or 10MiB")
	num(&cfg.MaxImages, "max-images", "most images in one request (0: images disabled)")
	fs.Int64Var(&cfg.MaxImagePixels, "max-image-pixels", cfg.MaxImagePixels, "largest accepted image, width*height pixels (guards against decompression bombs) (env "+EnvName("max-image-pixels")+")")
	boolean(&cfg.AllowImageURLs, "allow-image-urls", "allow http(s) image URLs; the server fetches them (otherwise only data: URLs)")
	boolean(&cfg.AllowPrivateImageURLs, "allow-private-image-urls", "allow image URLs whose host resolves to a private, loopback or link-local address")
	dur(&cfg.ImageURLTimeout, "image-url-timeout", "time limit for fetching one image URL")
	size(&cfg.MaxBodyBytes, "max-body-bytes", "largest accepted request body; a `size` like 67108864 or 64MiB")
	num(&cfg.QueueSize, "queue-size", "requests that may wait for a free slot; beyond that the server answers 429")
	boolean(&cfg.CacheReuse, "cache-reuse", "keep a finished conversation's KV cells in its slot so that a request continuing it skips the shared prefix (full and local requests; a request may opt out with elastic_cache.reuse=false)")
	boolean(&cfg.CacheReuseCompressed, "cache-reuse-compressed", "with --cache-reuse, also continue a conversation from the cells its compressing policy (elastic, h2o, local) left, encoding only the new turn; requests may ask for it with elastic_cache.reuse=true")
	num(&cfg.ImageCacheMB, "image-cache-mb", "MiB of encoded images kept by content, so a picture sent again is not encoded again (0: off)")
	num(&cfg.CacheRAMMB, "cache-ram-mb", "MiB of host memory for held conversations that lost their slot, restored instead of encoded again when they continue (-1: 10% of the memory the process may use; 0: off)")
	str(&cfg.CacheDir, "cache-dir", "directory for conversations that leave host memory and for every held conversation at a clean shutdown, so that they survive a restart (one server per directory; off when empty)")
	num(&cfg.CacheDirMB, "cache-dir-mb", "MiB the cache directory may hold; least recently used conversations out first (0: unbounded)")
	dur(&cfg.RequestTimeout, "request-timeout", "time limit for one completion request (0: none)")
	dur(&cfg.ShutdownGrace, "shutdown-grace", "on SIGTERM/SIGINT, how long running requests may finish before they are cancelled")
	str(&cfg.LogLevel, "log-level", "log level: trace, debug, info, warn, error")
	str(&cfg.LogFormat, "log-format", "log format: json or console")
	num(&cfg.MaxTokensDefault, "n-predict", "completion-token limit when a request sets none (-1: until EOS or the context is full)")
	return fs
}

func (c *Config) applyDerivedDefaults() {
	c.Model = strings.TrimSpace(c.Model)
	c.MMProj = strings.TrimSpace(c.MMProj)
	c.Policy = strings.ToLower(strings.TrimSpace(c.Policy))
	c.Selection = strings.ToLower(strings.TrimSpace(c.Selection))
	c.LogLevel = strings.ToLower(strings.TrimSpace(c.LogLevel))
	c.LogFormat = strings.ToLower(strings.TrimSpace(c.LogFormat))
	c.KVType = strings.ToLower(strings.TrimSpace(c.KVType))
	c.DecodeFlashAttn = strings.ToLower(strings.TrimSpace(c.DecodeFlashAttn))
	c.ModelAlias = strings.TrimSpace(c.ModelAlias)
	if c.ModelAlias == "" && c.Model != "" {
		base := filepath.Base(c.Model)
		c.ModelAlias = strings.TrimSuffix(base, filepath.Ext(base))
		if c.ModelAlias == "" {
			c.ModelAlias = base
		}
	}
	if c.Threads <= 0 { // 0 or -1: automatic
		cpus := detectCPUs()
		c.Threads, c.ThreadsSource = cpus.N, cpus.Source
	} else if c.ThreadsSource == "" {
		c.ThreadsSource = "set"
	}
	// llama.cpp uses min(n_batch, n_ubatch); make that visible in the config.
	if c.UBatchSize > c.BatchSize && c.BatchSize > 0 {
		c.UBatchSize = c.BatchSize
	}
}

// Validate checks every field and returns the first problem as one line
// naming the flag (and its environment variable).
func (c *Config) Validate() error {
	bad := func(flagName, format string, a ...any) error {
		return fmt.Errorf("config: --%s (%s): %s", flagName, EnvName(flagName), fmt.Sprintf(format, a...))
	}
	if c.Model == "" {
		return bad("model", "required: path of the GGUF model file")
	}
	switch c.KVType {
	case "f16", "bf16", "f32", "q8_0", "q4_0":
	default:
		return bad("kv-type", "must be f16, bf16, f32, q8_0 or q4_0, got %q", c.KVType)
	}
	switch c.DecodeFlashAttn {
	case "auto", "on", "off":
	default:
		return bad("decode-flash-attn", "must be auto, on or off, got %q", c.DecodeFlashAttn)
	}
	if c.PrefillCtxSize < -1 {
		return bad("prefill-ctx-size", "must be -1 (none), 0 (automatic) or a cell count, got %d", c.PrefillCtxSize)
	}
	if c.KVUnified && c.PrefillCtxSize > 0 {
		return bad("prefill-ctx-size", "a prefill context needs a stream per slot: drop it or --kv-unified")
	}
	if c.DecodeFlashAttn == "on" && (c.KVUnified || c.PrefillCtxSize < 0) {
		return bad("decode-flash-attn", "decode-only flash attention needs the prefill context (--kv-unified=false, --prefill-ctx-size >= 0); use --flash-attn")
	}
	if c.GPULayers < -1 {
		return bad("gpu-layers", "must be -1 (all) or a layer count >= 0, got %d", c.GPULayers)
	}
	if err := regularFile(c.Model); err != nil {
		return bad("model", "%v", err)
	}
	if c.MMProj != "" {
		if err := regularFile(c.MMProj); err != nil {
			return bad("mmproj", "%v", err)
		}
	}
	if err := validAddr(c.Addr); err != nil {
		return bad("addr", "%v", err)
	}
	if c.Parallel < 1 || c.Parallel > 256 {
		return bad("parallel", "must be between 1 and 256, got %d", c.Parallel)
	}
	if c.CtxSize != 0 && c.CtxSize < 64 {
		return bad("ctx-size", "must be 0 (automatic) or at least 64, got %d", c.CtxSize)
	}
	if per := c.CtxSize / c.Parallel; c.CtxSize != 0 && per < 64 {
		return bad("ctx-size", "%d cells shared by --parallel %d leaves %d per sequence; need at least 64 (raise --ctx-size or lower --parallel)", c.CtxSize, c.Parallel, per)
	}
	if c.Threads < 1 || c.Threads > 1024 {
		return bad("threads", "must be between 1 and 1024, got %d", c.Threads)
	}
	if c.BatchSize < 1 {
		return bad("batch-size", "must be at least 1, got %d", c.BatchSize)
	}
	if c.UBatchSize < 1 {
		return bad("ubatch-size", "must be at least 1, got %d", c.UBatchSize)
	}
	if c.ModelAlias == "" || strings.ContainsFunc(c.ModelAlias, isSpaceOrControl) {
		return bad("model-alias", "must be non-empty without spaces or control characters, got %q", c.ModelAlias)
	}
	if c.APIKey != "" && (strings.TrimSpace(c.APIKey) != c.APIKey || strings.ContainsFunc(c.APIKey, isSpaceOrControl)) {
		return bad("api-key", "must not contain spaces or control characters")
	}
	if _, err := parseOrigins(c.CORSOrigins); err != nil {
		return bad("cors-origins", "%v", err)
	}
	if _, err := c.Cache(); err != nil {
		var ce *elasticcache.ConfigError
		if errors.As(err, &ce) && flagFor(ce.Field) != "" {
			return bad(flagFor(ce.Field), "%s", ce.Msg)
		}
		return fmt.Errorf("config: elastic cache: %v", err)
	}
	if c.MaxImageBytes < 1 {
		return bad("max-image-bytes", "must be at least 1 byte, got %d", c.MaxImageBytes)
	}
	if c.MaxImages < 0 || c.MaxImages > 64 {
		return bad("max-images", "must be between 0 and 64, got %d", c.MaxImages)
	}
	if c.MaxImagePixels < 1 {
		return bad("max-image-pixels", "must be at least 1, got %d", c.MaxImagePixels)
	}
	if c.ImageURLTimeout <= 0 {
		return bad("image-url-timeout", "must be positive, got %s", c.ImageURLTimeout)
	}
	if c.MaxBodyBytes < 1024 {
		return bad("max-body-bytes", "must be at least 1024, got %d", c.MaxBodyBytes)
	}
	if c.ImageCacheMB < 0 {
		return bad("image-cache-mb", "must be >= 0, got %d", c.ImageCacheMB)
	}
	if c.CacheDirMB < 0 {
		return bad("cache-dir-mb", "must be >= 0, got %d", c.CacheDirMB)
	}
	if c.CacheRAMMB < -1 {
		return bad("cache-ram-mb", "must be >= 0, or -1 for the default share of memory, got %d", c.CacheRAMMB)
	}
	if c.QueueSize < 0 {
		return bad("queue-size", "must be >= 0, got %d", c.QueueSize)
	}
	if c.RequestTimeout < 0 {
		return bad("request-timeout", "must be >= 0 (0: none), got %s", c.RequestTimeout)
	}
	if c.ShutdownGrace < 0 {
		return bad("shutdown-grace", "must be >= 0, got %s", c.ShutdownGrace)
	}
	if _, err := c.ZerologLevel(); err != nil {
		return bad("log-level", "unknown level %q (want trace, debug, info, warn or error)", c.LogLevel)
	}
	if c.LogFormat != "json" && c.LogFormat != "console" {
		return bad("log-format", "must be json or console, got %q", c.LogFormat)
	}
	if c.MaxTokensDefault < -1 || c.MaxTokensDefault == 0 {
		return bad("n-predict", "must be -1 (no limit) or a positive token count, got %d", c.MaxTokensDefault)
	}
	return nil
}

// Cache is the server-wide default Elastic Cache setting. It is where the
// --policy, --budget, --sink, --distance and --selection values are validated
// (Validate reports its *elasticcache.ConfigError under the flag's name). An
// empty Selection is the paper's.
func (c *Config) Cache() (elasticcache.Spec, error) {
	p, err := elasticcache.ParsePolicy(c.Policy)
	if err != nil {
		return elasticcache.Spec{}, err
	}
	sel, err := elasticcache.ParseSelection(c.Selection)
	if err != nil {
		return elasticcache.Spec{}, err
	}
	return elasticcache.Config{Policy: p, Budget: c.Budget, Sink: c.Sink, Distance: c.Distance, Selection: sel}.Spec()
}

// CORSOriginList is CORSOrigins as a list (nil: CORS off). Call it on a
// Config that passed Validate; an invalid list reads as nil.
func (c *Config) CORSOriginList() []string {
	list, err := parseOrigins(c.CORSOrigins)
	if err != nil {
		return nil
	}
	return list
}

// parseOrigins splits a comma-separated origin list and checks each entry:
// "*", or scheme://host[:port] as a browser sends it in the Origin header
// (no path, not even "/", or it would never match), where the host may hold
// one "*" (https://*.example.com).
func parseOrigins(s string) ([]string, error) {
	var out []string
	for _, o := range strings.Split(s, ",") {
		o = strings.TrimSpace(o)
		if o == "" {
			continue
		}
		if o == "*" {
			out = append(out, o)
			continue
		}
		scheme, hostPort, ok := strings.Cut(o, "://")
		if !ok || scheme == "" || hostPort == "" {
			return nil, fmt.Errorf("origin %q must be scheme://host[:port] (e.g. https://app.example.com) or *", o)
		}
		if strings.ContainsAny(hostPort, "/?#") {
			return nil, fmt.Errorf("origin %q must not have a path, query or fragment (browsers send %s://%s)", o, scheme, hostPort[:strings.IndexAny(hostPort, "/?#")])
		}
		if strings.Count(o, "*") > 1 || strings.ContainsFunc(o, isSpaceOrControl) {
			return nil, fmt.Errorf("origin %q may hold at most one '*' and no spaces", o)
		}
		out = append(out, o)
	}
	return out, nil
}

// SeqCtx is the number of KV cells each of the Parallel sequences gets.
func (c *Config) SeqCtx() int { return c.CtxSize / c.Parallel }

// ZerologLevel parses LogLevel.
func (c *Config) ZerologLevel() (zerolog.Level, error) {
	switch c.LogLevel {
	case "trace", "debug", "info", "warn", "error":
		return zerolog.ParseLevel(c.LogLevel)
	case "warning":
		return zerolog.WarnLevel, nil
	}
	return zerolog.NoLevel, fmt.Errorf("unknown log level %q", c.LogLevel)
}

// String renders the configuration for a startup log line, API key redacted.
func (c *Config) String() string {
	key := ""
	if c.APIKey != "" {
		key = "(set)"
	}
	return fmt.Sprintf("model=%s mmproj=%s alias=%s addr=%s ctx-size=%d parallel=%d kv-unified=%t prefill-ctx-size=%d decode-flash-attn=%s kv-type=%s threads=%d batch=%d ubatch=%d flash-attn=%t "+
		"policy=%s budget=%s sink=%d distance=%d selection=%s api-key=%s queue=%d ui=%t",
		c.Model, c.MMProj, c.ModelAlias, c.Addr, c.CtxSize, c.Parallel, c.KVUnified, c.PrefillCtxSize, c.DecodeFlashAttn, c.KVType, c.Threads, c.BatchSize, c.UBatchSize, c.FlashAttn,
		c.Policy, strconv.FormatFloat(c.Budget, 'g', -1, 64), c.Sink, c.Distance, c.Selection, key, c.QueueSize, c.UI)
}

// DecodeCells is the decode context's size: CtxSize, or with a stream per slot
// the most whole streams of a multiple of 256 cells that fit it (llama.cpp pads
// a stream up to 256-cell multiples, which would exceed --ctx-size).
func (c *Config) DecodeCells() int {
	p := max(c.Parallel, 1)
	per := c.CtxSize / p
	if c.KVUnified || per < 256 {
		return c.CtxSize
	}
	return per / 256 * 256 * p
}

// PrefillCells is the prefill context's size (0: none): PrefillCtxSize when set,
// else ceil(stream/budget) rounded up to 256 cells, between one stream and
// ctxTrain (the model's training context; <= 0: unknown), so that a prompt which
// the server's default policy compresses into one stream can be encoded.
func (c *Config) PrefillCells(ctxTrain int) int {
	switch {
	case c.KVUnified || c.PrefillCtxSize < 0:
		return 0
	case c.PrefillCtxSize > 0:
		return c.PrefillCtxSize
	}
	stream := c.DecodeCells() / max(c.Parallel, 1)
	budget := c.Budget
	if c.Policy == "full" || budget <= 0 || budget > 1 {
		budget = 1
	}
	n := int(math.Ceil(float64(stream) / budget))
	n = (n + 255) / 256 * 256
	if ctxTrain > 0 {
		n = min(n, ctxTrain)
	}
	return max(n, stream)
}

// DecodeFlash reports whether the decode context runs flash attention, given
// whether the model runs on a GPU.
func (c *Config) DecodeFlash(gpu bool) bool {
	switch c.DecodeFlashAttn {
	case "on":
		return true
	case "auto":
		return gpu && !c.KVUnified && c.PrefillCtxSize >= 0 && !c.FlashAttn // a prefill context exists
	}
	return false
}

// flagFor maps an elasticcache.ConfigError field to its flag.
func flagFor(field string) string {
	switch strings.ToLower(field) {
	case "policy":
		return "policy"
	case "budget":
		return "budget"
	case "sink":
		return "sink"
	case "distance":
		return "distance"
	case "selection":
		return "selection"
	}
	return ""
}

func regularFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("file %s does not exist", path)
		}
		return fmt.Errorf("cannot read %s: %v", path, unwrapPathError(err))
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	return nil
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func validAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("want host:port, got %q", addr)
	}
	_ = host // empty host: all interfaces
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("invalid port %q", port)
	}
	return nil
}

func isSpaceOrControl(r rune) bool {
	return r == ' ' || r == '\t' || r == '\n' || r == '\r' || r < 0x20 || r == 0x7f
}
