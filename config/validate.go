package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// Validate checks every option and returns the first problem as one line
// naming the flag (and its environment variable). The checks run in a fixed
// order, so that of several problems the same one is always reported.
func (c *Config) Validate() error {
	for _, check := range []func() error{
		c.checkModelSet, c.checkContexts, c.checkPaths, c.checkSlots, c.checkAPI,
		c.checkCache, c.checkImages, c.checkLimits, c.checkLogging, c.checkNPredict,
	} {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// invalid is Validate's error for the option named by flagName.
func invalid(flagName, format string, a ...any) error {
	return fmt.Errorf("config: --%s (%s): %s", flagName, EnvName(flagName), fmt.Sprintf(format, a...))
}

func (c *Config) checkModelSet() error {
	if c.Model == "" {
		return invalid("model", "required: path of the GGUF model file")
	}
	return nil
}

// checkContexts: the llama contexts' layout (row type, flash attention, the
// prefill context) and the GPU offload.
func (c *Config) checkContexts() error {
	switch c.KVType {
	case "f16", "bf16", "f32", "q8_0", "q4_0":
	default:
		return invalid("kv-type", "must be f16, bf16, f32, q8_0 or q4_0, got %q", c.KVType)
	}
	switch c.DecodeFlashAttn {
	case "auto", "on", "off":
	default:
		return invalid("decode-flash-attn", "must be auto, on or off, got %q", c.DecodeFlashAttn)
	}
	if c.PrefillCtxSize < -1 {
		return invalid("prefill-ctx-size", "must be -1 (none), 0 (automatic) or a cell count, got %d", c.PrefillCtxSize)
	}
	if c.KVUnified && c.PrefillCtxSize > 0 {
		return invalid("prefill-ctx-size", "a prefill context needs a stream per slot: drop it or --kv-unified")
	}
	if c.PrefillStreams < 0 {
		return invalid("prefill-streams", "must be 0 (automatic) or a stream count, got %d", c.PrefillStreams)
	}
	if c.PrefillStreams > 1 && (c.KVUnified || c.PrefillCtxSize < 0) {
		return invalid("prefill-streams", "there is no prefill context (--kv-unified or --prefill-ctx-size -1) to hold %d streams", c.PrefillStreams)
	}
	if c.DecodeFlashAttn == "on" && (c.KVUnified || c.PrefillCtxSize < 0) {
		return invalid("decode-flash-attn", "decode-only flash attention needs the prefill context (--kv-unified=false, --prefill-ctx-size >= 0); use --flash-attn")
	}
	if c.GPULayers < -1 {
		return invalid("gpu-layers", "must be -1 (all) or a layer count >= 0, got %d", c.GPULayers)
	}
	return nil
}

// checkPaths: the model and projector files exist, and the listen address parses.
func (c *Config) checkPaths() error {
	if err := regularFile(c.Model); err != nil {
		return invalid("model", "%v", err)
	}
	if c.MMProj != "" {
		if err := regularFile(c.MMProj); err != nil {
			return invalid("mmproj", "%v", err)
		}
	}
	if err := validAddr(c.Addr); err != nil {
		return invalid("addr", "%v", err)
	}
	return nil
}

// checkSlots: slots, their cells, threads and batches.
func (c *Config) checkSlots() error {
	if c.Parallel < 1 || c.Parallel > 256 {
		return invalid("parallel", "must be between 1 and 256, got %d", c.Parallel)
	}
	if c.CtxSize != 0 && c.CtxSize < 64 {
		return invalid("ctx-size", "must be 0 (automatic) or at least 64, got %d", c.CtxSize)
	}
	if per := c.CtxSize / c.Parallel; c.CtxSize != 0 && per < 64 {
		return invalid("ctx-size", "%d cells shared by --parallel %d leaves %d per sequence; need at least 64 (raise --ctx-size or lower --parallel)", c.CtxSize, c.Parallel, per)
	}
	if c.Threads < 1 || c.Threads > 1024 {
		return invalid("threads", "must be between 1 and 1024, got %d", c.Threads)
	}
	if c.BatchSize < 1 {
		return invalid("batch-size", "must be at least 1, got %d", c.BatchSize)
	}
	if c.UBatchSize < 1 {
		return invalid("ubatch-size", "must be at least 1, got %d", c.UBatchSize)
	}
	return nil
}

// checkAPI: what clients see of the server (model id, API key, CORS origins).
func (c *Config) checkAPI() error {
	if c.ModelAlias == "" || strings.ContainsFunc(c.ModelAlias, isSpaceOrControl) {
		return invalid("model-alias", "must be non-empty without spaces or control characters, got %q", c.ModelAlias)
	}
	if c.APIKey != "" && (strings.TrimSpace(c.APIKey) != c.APIKey || strings.ContainsFunc(c.APIKey, isSpaceOrControl)) {
		return invalid("api-key", "must not contain spaces or control characters")
	}
	if _, err := parseOrigins(c.CORSOrigins); err != nil {
		return invalid("cors-origins", "%v", err)
	}
	return nil
}

// checkCache validates the default cache setting through Cache and reports
// elasticcache's error under the option it names (its Field is the flag name).
func (c *Config) checkCache() error {
	_, err := c.Cache()
	var ce *elasticcache.ConfigError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ce) && isOption(ce.Field):
		return invalid(ce.Field, "%s", ce.Msg)
	}
	return fmt.Errorf("config: elastic cache: %v", err)
}

func (c *Config) checkImages() error {
	if c.MaxImageBytes < 1 {
		return invalid("max-image-bytes", "must be at least 1 byte, got %d", c.MaxImageBytes)
	}
	if c.MaxImages < 0 || c.MaxImages > 64 {
		return invalid("max-images", "must be between 0 and 64, got %d", c.MaxImages)
	}
	if c.MaxImagePixels < 1 {
		return invalid("max-image-pixels", "must be at least 1, got %d", c.MaxImagePixels)
	}
	if c.ImageURLTimeout <= 0 {
		return invalid("image-url-timeout", "must be positive, got %s", c.ImageURLTimeout)
	}
	return nil
}

// checkLimits: request body, memory bounds, queue and time limits.
func (c *Config) checkLimits() error {
	if c.MaxBodyBytes < 1024 {
		return invalid("max-body-bytes", "must be at least 1024, got %d", c.MaxBodyBytes)
	}
	if c.ImageCacheMB < 0 {
		return invalid("image-cache-mb", "must be >= 0, got %d", c.ImageCacheMB)
	}
	if c.CacheDirMB < 0 {
		return invalid("cache-dir-mb", "must be >= 0, got %d", c.CacheDirMB)
	}
	if c.CacheRAMMB < -1 {
		return invalid("cache-ram-mb", "must be >= 0, or -1 for the default share of memory, got %d", c.CacheRAMMB)
	}
	if c.QueueSize < 0 {
		return invalid("queue-size", "must be >= 0, got %d", c.QueueSize)
	}
	if c.RequestTimeout < 0 {
		return invalid("request-timeout", "must be >= 0 (0: none), got %s", c.RequestTimeout)
	}
	if c.ShutdownGrace < 0 {
		return invalid("shutdown-grace", "must be >= 0, got %s", c.ShutdownGrace)
	}
	return nil
}

func (c *Config) checkLogging() error {
	if _, err := c.ZerologLevel(); err != nil {
		return invalid("log-level", "unknown level %q (want trace, debug, info, warn or error)", c.LogLevel)
	}
	if c.LogFormat != "json" && c.LogFormat != "console" {
		return invalid("log-format", "must be json or console, got %q", c.LogFormat)
	}
	return nil
}

func (c *Config) checkNPredict() error {
	if c.MaxTokensDefault < -1 || c.MaxTokensDefault == 0 {
		return invalid("n-predict", "must be -1 (no limit) or a positive token count, got %d", c.MaxTokensDefault)
	}
	return nil
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
