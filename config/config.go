// Package config loads the elasticserve server configuration from environment
// variables (prefix ELASTICSERVE_) and command-line flags. Flags win over the
// environment, which wins over the built-in defaults.
//
// To add an option, add a field to Config with its tags (options.go says which);
// the flag, the environment variable, the default, --help and String follow
// from them. A rule it must obey goes into Validate (validate.go).
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"reflect"
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

// Config is the whole server configuration. Each option is declared once, as
// a field with its tags (see options.go: env names the option and its flag,
// envDefault is its default, help its --help text, log its key in String); the
// field order is String's order. The doc comments say what the code may rely on.
type Config struct {
	Model  string `env:"MODEL" log:"model" help:"path of the GGUF model file (required)"`
	MMProj string `env:"MMPROJ" log:"mmproj" help:"path of the GGUF multimodal projector; without it, requests with images are rejected"`
	// ChatTemplate names a llama.cpp built-in chat template used instead of the
	// model's own (tokenizer.chat_template); empty: the model's.
	ChatTemplate string `env:"CHAT_TEMPLATE" help:"a llama.cpp built-in chat template (chatml, gemma, llama2, vicuna, smolvlm, ...) used instead of the model's own"`
	// ModelAlias is the model id served by the API; Load defaults it to Model's
	// file name without its extension.
	ModelAlias string `env:"MODEL_ALIAS" log:"alias" help:"model id reported by the API (default: the model file name without extension)"`
	Addr       string `env:"ADDR" envDefault:"127.0.0.1:8080" log:"addr" help:"listen address host:port"`

	// CtxSize is the number of KV cells of the decode context in total: one stream
	// of CtxSize/Parallel cells per slot (or one shared pool with KVUnified). 0
	// (the default): sized when the model is loaded (AutoSeqCells: the training
	// context per slot, unless half the free memory holds less).
	CtxSize int `env:"CTX_SIZE" envDefault:"0" log:"ctx-size" help:"decode KV cache cells in total: each of the --parallel slots owns ctx-size/parallel of them (0: the model's training context per slot, or less when half the free memory cannot hold that; the start-up log says which)"`
	// Parallel is the number of sequences decoded at the same time (slots).
	Parallel int `env:"PARALLEL" envDefault:"4" log:"parallel" help:"number of requests decoded at the same time (slots)"`
	// KVUnified shares one pool of CtxSize cells between all slots and admits a request
	// when the cells its cache policy lets it hold fit (one context; every sequence
	// in a decode batch attends the whole pool's used range); false (the default)
	// gives each slot its own stream of CtxSize/Parallel cells and encodes the
	// prompts of compressing policies in a separate prefill context.
	KVUnified bool `env:"KV_UNIFIED" envDefault:"false" log:"kv-unified" help:"one KV pool shared by all slots, one context, budget-aware admission (default false: a stream per slot and a prefill context)"`
	// PrefillCtxSize is the prefill context's cells (the longest prompt a
	// compressing policy may send): 0 picks ceil(stream/budget) (see PrefillCells),
	// -1 turns the prefill context off (prompts are encoded in their stream).
	PrefillCtxSize int `env:"PREFILL_CTX_SIZE" envDefault:"0" log:"prefill-ctx-size" help:"cells of the context that encodes prompts of compressing policies (0: ceil(stream/budget), at most the training context; -1: none)"`
	// PrefillStreams is how many prompts the prefill context encodes side by
	// side, each in a stream of PrefillCells: 0 (the default) picks it when the
	// model is loaded (AutoPrefillStreams), at least 1.
	PrefillStreams int `env:"PREFILL_STREAMS" envDefault:"0" log:"prefill-streams" help:"prompts of compressing policies the prefill context encodes side by side, each in a stream of prefill-ctx-size cells (0: as many as --parallel, up to 4, that half the free memory holds beside the decode context; at least 1)"`
	// DecodeFlashAttn is flash attention in the decode context only: auto (on
	// where the model runs on a GPU, see DecodeFlash), on or off.
	DecodeFlashAttn string `env:"DECODE_FLASH_ATTN" envDefault:"auto" log:"decode-flash-attn" help:"flash attention in the decode context: auto (on with a GPU), on or off"`
	// KVType is the KV cache row type (K always; V only where flash attention is
	// on, f16 otherwise).
	KVType    string `env:"KV_TYPE" envDefault:"f16" log:"kv-type" help:"KV cache row type: f16, bf16, f32, q8_0 or q4_0 (V is quantized only where flash attention is on)"`
	GPULayers int    `env:"GPU_LAYERS" envDefault:"-1" help:"model layers offloaded to the GPU when one is present (-1: all, 0: none)"`
	// Threads is the number of CPU threads for generation; 0 (the default): the
	// CPUs the process may keep busy (DetectCPUs: its cgroup's quota, else its
	// affinity), with ThreadsSource saying which.
	Threads int `env:"THREADS" log:"threads" help:"CPU threads used for generation (0: the CPUs the process may keep busy: its cgroup's CPU quota, rounded up, else the CPUs it may run on; on a machine shared with other work, fewer than the free cores)"`
	// ThreadsSource says where Threads came from (set by Load, not an option).
	ThreadsSource string
	BatchSize     int `env:"BATCH_SIZE" envDefault:"512" log:"batch" help:"logical batch size for prompt processing"`
	// UBatchSize is capped at BatchSize by Load (llama.cpp uses the smaller).
	UBatchSize int  `env:"UBATCH_SIZE" envDefault:"512" log:"ubatch" help:"physical batch size (capped at --batch-size)"`
	FlashAttn  bool `env:"FLASH_ATTN" envDefault:"false" log:"flash-attn" help:"use flash attention"`

	// The default Elastic Cache setting (a request's elastic_cache overrides it),
	// validated as one by Cache.
	Policy   string  `env:"POLICY" envDefault:"elastic" log:"policy" help:"default Elastic Cache policy: {policies}"`
	Budget   float64 `env:"BUDGET" envDefault:"0.8" log:"budget" help:"default Elastic Cache budget: fraction of the prompt's KV entries to keep, in (0, 1]"`
	Sink     int     `env:"SINK" envDefault:"4" log:"sink" help:"default Elastic Cache sink: leading KV entries always kept"`
	Distance int     `env:"DISTANCE" envDefault:"-25" log:"distance" help:"default Elastic Cache distance: elastic decode truncation offset"`
	// Selection's default is the paper's rule set (see elasticcache.DefaultConfig).
	Selection string `env:"SELECTION" envDefault:"paper" log:"selection" help:"default Elastic Cache selection rules: paper (the default: the paper's rule as written), reference (parity with the authors' published code), normalized (elastic scores divided by the queries that see each entry) or text-tail (elastic keeps the text after the last image whole)"`

	// HTTP. APIKey, when set, is required as "Authorization: Bearer <key>";
	// CORSOrigins is a comma-separated list (see CORSOriginList).
	APIKey       string   `env:"API_KEY" log:"api-key,redact" help:"require 'Authorization: Bearer <key>' on the API and /metrics (/health and /ready stay open)"`
	CORSOrigins  string   `env:"CORS_ORIGINS" help:"comma-separated browser origins (scheme://host[:port], one '*' wildcard allowed, or * for any) allowed to call the API cross-origin; empty: CORS off"`
	MaxBodyBytes ByteSize `env:"MAX_BODY_BYTES" envDefault:"64MiB" arg:"size" help:"largest accepted request body; a size like 67108864 or 64MiB"`
	QueueSize    int      `env:"QUEUE_SIZE" envDefault:"64" log:"queue" help:"requests that may wait for a free slot; beyond that the server answers 429"`
	UI           bool     `env:"UI" envDefault:"true" log:"ui" help:"serve the playground page at GET / (chat with pictures; shows what the cache kept, merged and dropped); false: GET / is a 404"`
	// RequestTimeout bounds one completion request; 0: none.
	RequestTimeout time.Duration `env:"REQUEST_TIMEOUT" envDefault:"0s" help:"time limit for one completion request (0: none)"`
	// MaxTokensDefault is the completion-token limit of a request that sets
	// neither max_tokens nor max_completion_tokens; -1: no limit (until EOS or
	// the sequence's context is full).
	MaxTokensDefault int `env:"N_PREDICT" envDefault:"-1" help:"completion-token limit when a request sets none (-1: until EOS or the context is full)"`

	// Image limits.
	MaxImageBytes         ByteSize      `env:"MAX_IMAGE_BYTES" envDefault:"10MiB" arg:"size" help:"largest accepted image, in decoded bytes; a size like 10485760 or 10MiB"`
	MaxImages             int           `env:"MAX_IMAGES" envDefault:"4" help:"most images in one request (0: images disabled)"`
	MaxImagePixels        int64         `env:"MAX_IMAGE_PIXELS" envDefault:"16777216" help:"largest accepted image, width*height pixels (guards against decompression bombs)"`
	AllowImageURLs        bool          `env:"ALLOW_IMAGE_URLS" envDefault:"false" help:"allow http(s) image URLs; the server fetches them (otherwise only data: URLs)"`
	AllowPrivateImageURLs bool          `env:"ALLOW_PRIVATE_IMAGE_URLS" envDefault:"false" help:"allow image URLs whose host resolves to a private, loopback or link-local address"`
	ImageURLTimeout       time.Duration `env:"IMAGE_URL_TIMEOUT" envDefault:"10s" help:"time limit for fetching one image URL"`

	// Conversation memory. CacheReuse keeps a finished conversation's KV cells
	// so that its next turn continues from them; ImageCacheMB bounds the encoded
	// images kept by content.
	CacheReuse bool `env:"CACHE_REUSE" envDefault:"true" help:"keep a finished conversation's KV cells in its slot so that a request continuing it skips the shared prefix (full and local requests; a request may opt out with elastic_cache.reuse=false)"`
	// CacheReuseCompressed also continues conversations that a compressing policy
	// left compressed. Off by default: by the rule in docs/quality ("Multi-turn")
	// it is on only if it costs at most 2 points of accuracy against encoding the
	// history again at the default setting, and on the word-level demo model it
	// costs 7.7 (it was on for the character-level model at text-tail 0.7).
	CacheReuseCompressed bool `env:"CACHE_REUSE_COMPRESSED" envDefault:"false" help:"with --cache-reuse, also continue a conversation from the cells its compressing policy (elastic, h2o, local) left, encoding only the new turn; requests may ask for it with elastic_cache.reuse=true"`
	ImageCacheMB         int  `env:"IMAGE_CACHE_MB" envDefault:"256" help:"MiB of encoded images kept by content, so a picture sent again is not encoded again (0: off)"`
	// CacheRAMMB bounds the host tier: held conversations that lose their slot are
	// kept in host memory (compressed ones compressed) and restored when their next
	// turn comes. -1 (the default): CacheRAMShare of the memory the process may use
	// at start (HostMemoryFrom); 0: off. See CacheRAMBytes.
	CacheRAMMB int `env:"CACHE_RAM_MB" envDefault:"-1" help:"MiB of host memory for held conversations that lost their slot, restored instead of encoded again when they continue (-1: 10% of the memory the process may use; 0: off)"`
	// CacheDir, when set, keeps conversations in files there so that they survive a
	// restart (the disk tier); CacheDirMB bounds the directory (0: unbounded).
	CacheDir   string `env:"CACHE_DIR" help:"directory for conversations that leave host memory and for every held conversation at a clean shutdown, so that they survive a restart (one server per directory; off when empty)"`
	CacheDirMB int    `env:"CACHE_DIR_MB" envDefault:"10240" help:"MiB the cache directory may hold; least recently used conversations out first (0: unbounded)"`

	// Process.
	ShutdownGrace time.Duration `env:"SHUTDOWN_GRACE" envDefault:"30s" help:"on SIGTERM/SIGINT, how long running requests may finish before they are cancelled"`
	LogLevel      string        `env:"LOG_LEVEL" envDefault:"info" help:"log level: trace, debug, info, warn, error"`
	LogFormat     string        `env:"LOG_FORMAT" envDefault:"console" help:"log format: json or console"`
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

// Cache is the server-wide default Elastic Cache setting: the one place the
// --policy, --budget, --sink, --distance and --selection values become an
// elasticcache.Spec. Load has validated it (Validate reports its
// *elasticcache.ConfigError under the flag the error's Field names), so on a
// loaded Config it does not fail. An empty Selection is the paper's.
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
