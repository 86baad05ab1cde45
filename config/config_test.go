package config

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/elasticserve/elasticserve/elasticcache"
)

func tempFile(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte("GGUF"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func envFunc(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestDefaults(t *testing.T) {
	model := tempFile(t, "qwen2-vl-2b.Q4_K_M.gguf")
	cfg, err := Load([]string{"--model", model}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Model: model, Addr: "127.0.0.1:8080", CtxSize: 0, Parallel: 4, Threads: DetectCPUs().N, ThreadsSource: DetectCPUs().Source,
		BatchSize: 512, UBatchSize: 512, DecodeFlashAttn: "auto", KVType: "f16", GPULayers: -1, ModelAlias: "qwen2-vl-2b.Q4_K_M",
		Policy: "elastic", Budget: 0.8, Sink: 4, Distance: -25, Selection: "paper",
		MaxImageBytes: 10 << 20, MaxImages: 4, MaxImagePixels: 16777216, ImageURLTimeout: 10 * time.Second,
		MaxBodyBytes: 64 << 20, QueueSize: 64, CacheReuse: true, ImageCacheMB: 256, CacheReuseCompressed: false, CacheRAMMB: -1, CacheDirMB: 10240, ShutdownGrace: 30 * time.Second, UI: true,
		LogLevel: "info", LogFormat: "console", MaxTokensDefault: -1,
	}
	if !reflect.DeepEqual(*cfg, want) {
		t.Fatalf("defaults:\n got %+v\nwant %+v", *cfg, want)
	}
	if cfg.SeqCtx() != 0 { // sized when the model is loaded
		t.Fatalf("SeqCtx = %d", cfg.SeqCtx())
	}
	cc, err := cfg.Cache()
	if err != nil || cc.Policy() != elasticcache.Elastic || cc.Budget() != 0.8 || cc.Sink() != 4 || cc.Distance() != -25 {
		t.Fatalf("Cache() = %+v, %v", cc, err)
	}
	// The default selection is the paper's, picked by the rule in docs/quality,
	// and the server default is the same Spec as the package default.
	if cc.Selection() != elasticcache.PaperSelection || cc != elasticcache.DefaultSpec() {
		t.Fatalf("Cache() = %+v, want DefaultSpec()", cc.Config())
	}
}

func TestPrecedence(t *testing.T) {
	model := tempFile(t, "m.gguf")
	other := tempFile(t, "other.gguf")
	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		check func(*Config) bool
	}{
		{"env only", nil, map[string]string{"ELASTICSERVE_MODEL": model, "ELASTICSERVE_PARALLEL": "2"},
			func(c *Config) bool { return c.Model == model && c.Parallel == 2 }},
		{"flag beats env", []string{"--model", other, "--parallel", "8"}, map[string]string{"ELASTICSERVE_MODEL": model, "ELASTICSERVE_PARALLEL": "2"},
			func(c *Config) bool { return c.Model == other && c.Parallel == 8 && c.ModelAlias == "other" }},
		{"api key from env", []string{"--model", model}, map[string]string{"ELASTICSERVE_API_KEY": "sk-test"},
			func(c *Config) bool { return c.APIKey == "sk-test" }},
		{"api key flag wins", []string{"--model", model, "--api-key=flag"}, map[string]string{"ELASTICSERVE_API_KEY": "sk-test"},
			func(c *Config) bool { return c.APIKey == "flag" }},
		{"single dash flags", []string{"-model", model, "-ctx-size", "8192"}, nil,
			func(c *Config) bool { return c.CtxSize == 8192 }},
		{"bools", []string{"--model", model, "--flash-attn", "--allow-image-urls=true"}, map[string]string{"ELASTICSERVE_ALLOW_PRIVATE_IMAGE_URLS": "1"},
			func(c *Config) bool { return c.FlashAttn && c.AllowImageURLs && c.AllowPrivateImageURLs }},
		{"env bool false overrides nothing", []string{"--model", model}, map[string]string{"ELASTICSERVE_FLASH_ATTN": "false"},
			func(c *Config) bool { return !c.FlashAttn }},
		{"sizes with units", []string{"--model", model, "--max-image-bytes", "2MiB"}, map[string]string{"ELASTICSERVE_MAX_BODY_BYTES": "1MB"},
			func(c *Config) bool { return c.MaxImageBytes == 2<<20 && c.MaxBodyBytes == 1000000 }},
		{"durations", []string{"--model", model, "--request-timeout", "2m"}, map[string]string{"ELASTICSERVE_IMAGE_URL_TIMEOUT": "3s"},
			func(c *Config) bool { return c.RequestTimeout == 2*time.Minute && c.ImageURLTimeout == 3*time.Second }},
		{"cache flags", []string{"--model", model, "--policy", "H2O", "--budget", "0.5", "--sink", "0", "--distance", "10"}, nil,
			func(c *Config) bool { return c.Policy == "h2o" && c.Budget == 0.5 && c.Sink == 0 && c.Distance == 10 }},
		{"selection flag", []string{"--model", model, "--selection", " Reference "}, nil,
			func(c *Config) bool {
				s, err := c.Cache()
				return c.Selection == "reference" && err == nil && s.Selection() == elasticcache.ReferenceSelection
			}},
		{"selection from env", []string{"--model", model}, map[string]string{"ELASTICSERVE_SELECTION": "reference"},
			func(c *Config) bool { return c.Selection == "reference" }},
		{"selection flag beats env", []string{"--model", model, "--selection", "paper"}, map[string]string{"ELASTICSERVE_SELECTION": "reference"},
			func(c *Config) bool {
				s, err := c.Cache()
				return c.Selection == "paper" && err == nil && s.Selection() == elasticcache.PaperSelection
			}},
		{"alias flag", []string{"--model", model, "--model-alias", "my-vlm"}, nil,
			func(c *Config) bool { return c.ModelAlias == "my-vlm" }},
		{"ubatch capped at batch", []string{"--model", model, "--batch-size", "128"}, nil,
			func(c *Config) bool { return c.UBatchSize == 128 }},
		{"threads from env", []string{"--model", model}, map[string]string{"ELASTICSERVE_THREADS": "3"},
			func(c *Config) bool { return c.Threads == 3 }},
		{"threads auto", []string{"--model", model, "--threads", "0"}, map[string]string{"ELASTICSERVE_THREADS": "3"},
			func(c *Config) bool { return c.Threads == runtime.NumCPU() }},
		{"n-predict", []string{"--model", model, "--n-predict", "256"}, nil,
			func(c *Config) bool { return c.MaxTokensDefault == 256 }},
		{"cors origins flag", []string{"--model", model, "--cors-origins", " https://a.example , http://localhost:5173,"}, nil,
			func(c *Config) bool {
				return reflect.DeepEqual(c.CORSOriginList(), []string{"https://a.example", "http://localhost:5173"})
			}},
		{"cors origins from env", []string{"--model", model}, map[string]string{"ELASTICSERVE_CORS_ORIGINS": "*"},
			func(c *Config) bool { return reflect.DeepEqual(c.CORSOriginList(), []string{"*"}) }},
		{"cors off by default", []string{"--model", model}, nil,
			func(c *Config) bool { return c.CORSOrigins == "" && c.CORSOriginList() == nil }},
		{"ui off by flag", []string{"--model", model, "--ui=false"}, nil,
			func(c *Config) bool { return !c.UI && strings.Contains(c.String(), "ui=false") }},
		{"ui off from env", []string{"--model", model}, map[string]string{"ELASTICSERVE_UI": "false"},
			func(c *Config) bool { return !c.UI }},
		{"ui flag beats env", []string{"--model", model, "--ui"}, map[string]string{"ELASTICSERVE_UI": "false"},
			func(c *Config) bool { return c.UI }},
		{"unrelated env ignored", []string{"--model", model}, map[string]string{"PARALLEL": "99", "ELASTICSERVE_UNKNOWN": "x"},
			func(c *Config) bool { return c.Parallel == 4 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Load(tt.args, envFunc(tt.env))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if !tt.check(cfg) {
				t.Fatalf("unexpected config %+v", *cfg)
			}
		})
	}
}

func TestInvalid(t *testing.T) {
	model := tempFile(t, "m.gguf")
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string // substring of the error
	}{
		{"no model", nil, nil, "--model (ELASTICSERVE_MODEL): required"},
		{"missing model file", []string{"--model", filepath.Join(dir, "nope.gguf")}, nil, "does not exist"},
		{"model is a dir", []string{"--model", dir}, nil, "not a regular file"},
		{"missing mmproj", []string{"--model", model, "--mmproj", filepath.Join(dir, "p.gguf")}, nil, "--mmproj"},
		{"bad addr", []string{"--model", model, "--addr", "localhost"}, nil, "--addr"},
		{"bad port", []string{"--model", model, "--addr", "127.0.0.1:99999"}, nil, "invalid port"},
		{"parallel zero", []string{"--model", model, "--parallel", "0"}, nil, "--parallel"},
		{"ctx too small", []string{"--model", model, "--ctx-size", "32", "--parallel", "1"}, nil, "--ctx-size"},
		{"ctx per seq too small", []string{"--model", model, "--ctx-size", "128", "--parallel", "4"}, nil, "per sequence"},
		{"threads too many", []string{"--model", model, "--threads", "5000"}, nil, "--threads"},
		{"batch zero", []string{"--model", model, "--batch-size", "0"}, nil, "--batch-size"},
		{"ubatch zero", []string{"--model", model, "--ubatch-size", "0"}, nil, "--ubatch-size"},
		{"unknown policy", []string{"--model", model, "--policy", "lru"}, nil, "--policy"},
		{"budget zero", []string{"--model", model, "--budget", "0"}, nil, "--budget"},
		{"budget above one", []string{"--model", model, "--budget", "1.5"}, nil, "--budget"},
		{"budget NaN", []string{"--model", model, "--budget", "NaN"}, nil, "--budget"},
		{"sink negative", []string{"--model", model, "--sink", "-1"}, nil, "--sink"},
		{"sink too large", []string{"--model", model, "--sink", "5000"}, nil, "--sink (ELASTICSERVE_SINK): 5000 is not in"},
		{"distance too large", []string{"--model", model, "--distance", "-200000"}, nil, "--distance"},
		{"unknown selection", []string{"--model", model, "--selection", "published"}, nil, "--selection (ELASTICSERVE_SELECTION): unknown selection"},
		{"unknown selection from env", []string{"--model", model}, map[string]string{"ELASTICSERVE_SELECTION": "ref"}, "--selection"},
		{"max images negative", []string{"--model", model, "--max-images", "-1"}, nil, "--max-images"},
		{"max image bytes zero", []string{"--model", model, "--max-image-bytes", "0"}, nil, "--max-image-bytes"},
		{"bad size", []string{"--model", model, "--max-image-bytes", "ten"}, nil, "invalid size"},
		{"pixels zero", []string{"--model", model, "--max-image-pixels", "0"}, nil, "--max-image-pixels"},
		{"url timeout zero", []string{"--model", model, "--image-url-timeout", "0s"}, nil, "--image-url-timeout"},
		{"body too small", []string{"--model", model, "--max-body-bytes", "10"}, nil, "--max-body-bytes"},
		{"queue negative", []string{"--model", model, "--queue-size", "-2"}, nil, "--queue-size"},
		{"request timeout negative", []string{"--model", model, "--request-timeout", "-1s"}, nil, "--request-timeout"},
		{"grace negative", []string{"--model", model, "--shutdown-grace", "-1s"}, nil, "--shutdown-grace"},
		{"log level", []string{"--model", model, "--log-level", "loud"}, nil, "--log-level"},
		{"log format", []string{"--model", model, "--log-format", "xml"}, nil, "--log-format"},
		{"n-predict zero", []string{"--model", model, "--n-predict", "0"}, nil, "--n-predict"},
		{"n-predict below -1", []string{"--model", model, "--n-predict", "-5"}, nil, "--n-predict"},
		{"alias with space", []string{"--model", model, "--model-alias", "my model"}, nil, "--model-alias"},
		{"api key with newline", []string{"--model", model, "--api-key", "a\nb"}, nil, "--api-key"},
		// An origin with a path never equals a browser's Origin header: refuse it
		// rather than let CORS silently never match.
		{"cors origin with a slash", []string{"--model", model, "--cors-origins", "https://a.example/"}, nil, "--cors-origins (ELASTICSERVE_CORS_ORIGINS): origin \"https://a.example/\" must not have a path"},
		{"cors origin without scheme", []string{"--model", model, "--cors-origins", "a.example"}, nil, "scheme://host"},
		{"cors origin with two wildcards", []string{"--model", model}, map[string]string{"ELASTICSERVE_CORS_ORIGINS": "https://*.*.example"}, "--cors-origins"},
		{"kv type", []string{"--model", model, "--kv-type", "q5_1"}, nil, "--kv-type (ELASTICSERVE_KV_TYPE): must be f16, bf16, f32, q8_0 or q4_0"},
		{"decode flash attn", []string{"--model", model, "--decode-flash-attn", "yes"}, nil, "--decode-flash-attn"},
		{"prefill ctx below -1", []string{"--model", model, "--prefill-ctx-size", "-2"}, nil, "--prefill-ctx-size"},
		{"prefill ctx with unified", []string{"--model", model, "--kv-unified", "--prefill-ctx-size", "2048"}, nil, "--prefill-ctx-size"},
		{"prefill streams below 0", []string{"--model", model, "--prefill-streams", "-1"}, nil, "--prefill-streams"},
		{"prefill streams without a prefill context", []string{"--model", model, "--prefill-ctx-size", "-1", "--prefill-streams", "2"}, nil, "--prefill-streams"},
		{"prefill streams with unified", []string{"--model", model, "--kv-unified", "--prefill-streams", "2"}, nil, "--prefill-streams"},
		{"decode flash attn without prefill ctx", []string{"--model", model, "--prefill-ctx-size", "-1", "--decode-flash-attn", "on"}, nil, "--decode-flash-attn"},
		{"unknown flag", []string{"--model", model, "--bogus"}, nil, "flag provided but not defined: -bogus"},
		{"bad flag int", []string{"--model", model, "--parallel", "two"}, nil, "-parallel"},
		{"positional arg", []string{"--model", model, "extra"}, nil, "unexpected argument"},
		{"bad env int", []string{"--model", model}, map[string]string{"ELASTICSERVE_CTX_SIZE": "big"}, "ELASTICSERVE_CTX_SIZE"},
		{"bad env bool", []string{"--model", model}, map[string]string{"ELASTICSERVE_FLASH_ATTN": "maybe"}, "ELASTICSERVE_FLASH_ATTN"},
		{"bad env duration", []string{"--model", model}, map[string]string{"ELASTICSERVE_SHUTDOWN_GRACE": "soon"}, "ELASTICSERVE_SHUTDOWN_GRACE"},
		{"bad env size", []string{"--model", model}, map[string]string{"ELASTICSERVE_MAX_BODY_BYTES": "-1"}, "ELASTICSERVE_MAX_BODY_BYTES"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Load(tt.args, envFunc(tt.env))
			if err == nil {
				t.Fatalf("Load succeeded: %+v", *cfg)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.want) {
				t.Fatalf("error %q does not contain %q", msg, tt.want)
			}
			if strings.Contains(msg, "\n") {
				t.Fatalf("error is not one line: %q", msg)
			}
		})
	}
}

func TestPrefillCells(t *testing.T) {
	model := tempFile(t, "m.gguf")
	tests := []struct {
		name     string
		args     []string
		ctxTrain int
		want     int
	}{
		// stream 1024 / budget 0.8 = 1280, a multiple of 256
		{"default", nil, 0, 1280},
		{"capped by the training context", nil, 1200, 1200},
		{"never below a stream", nil, 512, 1024},
		{"full: one stream", []string{"--policy", "full"}, 0, 1024},
		{"budget 0.5", []string{"--budget", "0.5", "--ctx-size", "8192", "--parallel", "8"}, 0, 2048},
		{"set", []string{"--prefill-ctx-size", "3000"}, 0, 3000},
		{"off", []string{"--prefill-ctx-size", "-1"}, 0, 0},
		{"unified: none", []string{"--kv-unified"}, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Load(append([]string{"--model", model, "--ctx-size", "4096"}, tt.args...), nil) // the size tests set (0 is sized at load)
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.PrefillCells(tt.ctxTrain); got != tt.want {
				t.Errorf("PrefillCells(%d) = %d, want %d", tt.ctxTrain, got, tt.want)
			}
		})
	}
}

func TestDecodeCells(t *testing.T) {
	model := tempFile(t, "m.gguf")
	tests := []struct {
		args []string
		want int
	}{
		{nil, 4096},
		{[]string{"--ctx-size", "5000"}, 4096}, // 1250 a stream -> 1024
		{[]string{"--ctx-size", "5000", "--parallel", "3"}, 4608}, // 1666 -> 1536
		{[]string{"--ctx-size", "5000", "--kv-unified"}, 5000},
		{[]string{"--ctx-size", "800", "--parallel", "4"}, 800}, // under 256 a stream: llama.cpp's minimum
	}
	for _, tt := range tests {
		cfg, err := Load(append([]string{"--model", model, "--ctx-size", "4096"}, tt.args...), nil) // the size tests set (0 is sized at load)
		if err != nil {
			t.Fatal(err)
		}
		if got := cfg.DecodeCells(); got != tt.want {
			t.Errorf("%v: DecodeCells = %d, want %d", tt.args, got, tt.want)
		}
	}
}

func TestDecodeFlash(t *testing.T) {
	model := tempFile(t, "m.gguf")
	tests := []struct {
		args []string
		gpu  bool
		want bool
	}{
		{nil, false, false},
		{nil, true, true},
		{[]string{"--decode-flash-attn", "off"}, true, false},
		{[]string{"--decode-flash-attn", "on"}, false, true},
		{[]string{"--kv-unified"}, true, false}, // no prefill context: nothing to split
		{[]string{"--flash-attn"}, true, false}, // flash attention everywhere already
	}
	for _, tt := range tests {
		cfg, err := Load(append([]string{"--model", model, "--ctx-size", "4096"}, tt.args...), nil) // the size tests set (0 is sized at load)
		if err != nil {
			t.Fatal(err)
		}
		if got := cfg.DecodeFlash(tt.gpu); got != tt.want {
			t.Errorf("%v gpu=%t: DecodeFlash = %t, want %t", tt.args, tt.gpu, got, tt.want)
		}
	}
}

// Cache is the validated setting: the flags' values as a Spec, or the
// *elasticcache.ConfigError naming the bad field.
func TestCache(t *testing.T) {
	c := &Config{Policy: "H2O", Budget: 0.5, Sink: 2, Distance: 7}
	spec, err := c.Cache()
	if err != nil {
		t.Fatal(err)
	}
	want := elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.5, Sink: 2, Distance: 7}
	if spec.Config() != want {
		t.Fatalf("Cache() = %+v, want %+v", spec.Config(), want)
	}
	for field, bad := range map[string]*Config{
		"policy":    {Policy: "lru", Budget: 0.5},
		"budget":    {Policy: "elastic", Budget: 0},
		"sink":      {Policy: "elastic", Budget: 0.5, Sink: -1},
		"distance":  {Policy: "elastic", Budget: 0.5, Distance: 1 << 30},
		"selection": {Policy: "elastic", Budget: 0.5, Selection: "published"},
	} {
		spec, err := bad.Cache()
		var ce *elasticcache.ConfigError
		if !errors.As(err, &ce) || ce.Field != field || !spec.IsZero() {
			t.Errorf("%s: Cache() = %+v, %v; want a ConfigError for %s", field, spec, err, field)
		}
	}
}

func TestHelp(t *testing.T) {
	for _, arg := range []string{"-h", "--help", "-help"} {
		_, err := Load([]string{arg}, nil)
		if !errors.Is(err, ErrHelp) || !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("%s: err = %v, want ErrHelp", arg, err)
		}
	}
	u := Usage()
	fs := newFlagSet(&Config{})
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		n++
		if !strings.Contains(u, "-"+f.Name) {
			t.Errorf("usage lacks -%s", f.Name)
		}
		if !strings.Contains(f.Usage, "(env "+EnvName(f.Name)+")") {
			t.Errorf("flag -%s usage does not name its env var: %q", f.Name, f.Usage)
		}
	})
	if n < 28 {
		t.Fatalf("only %d flags", n)
	}
}

// Every env tag must be the flag name mirrored, and every flag must have a field.
func TestFlagsMirrorEnv(t *testing.T) {
	params, err := env.GetFieldParamsWithOptions(&Config{}, env.Options{Prefix: EnvPrefix, Environment: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	for _, p := range params {
		keys[p.Key] = true
	}
	fs := newFlagSet(&Config{})
	fs.VisitAll(func(f *flag.Flag) {
		if !keys[EnvName(f.Name)] {
			t.Errorf("flag -%s has no env field %s", f.Name, EnvName(f.Name))
		}
		delete(keys, EnvName(f.Name))
	})
	for k := range keys {
		t.Errorf("env %s has no flag", k)
	}
}

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"0", 0, true}, {"1024", 1024, true}, {"10MiB", 10 << 20, true}, {"10mib", 10 << 20, true},
		{"10M", 10 << 20, true}, {"1MB", 1000000, true}, {"2k", 2048, true}, {"3 GiB", 3 << 30, true},
		{"5B", 5, true}, {"", 0, false}, {"-1", 0, false}, {"1.5M", 0, false}, {"MiB", 0, false},
		{"99999999999999999999", 0, false}, {"9999999999999G", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != tt.want) {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestStringRedactsKey(t *testing.T) {
	c := &Config{APIKey: "sk-secret", Parallel: 1}
	if s := c.String(); strings.Contains(s, "sk-secret") {
		t.Fatalf("String leaks key: %s", s)
	}
}
