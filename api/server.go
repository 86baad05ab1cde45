// Package api is elasticserve's OpenAI-compatible HTTP layer: routing,
// request decoding and validation, image checks, SSE streaming, auth and
// metrics. It talks to the inference engine only through Backend, so it
// builds and tests without cgo.
package api

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// Backend is the inference engine as the HTTP layer sees it.
type Backend interface {
	// Submit validates resource limits (prompt length etc.) and enqueues.
	// Its errors, and those of a final Event, are the typed errors of package
	// completion (see engineError for how each reaches the client). The
	// returned channel yields completion.Events; the last has Done=true.
	// Cancelling ctx must make the engine stop the request and close the
	// channel soon.
	Submit(ctx context.Context, req *completion.Request) (<-chan completion.Event, error)
	// Info describes the loaded model; it must be cheap (called per request).
	Info() BackendInfo
	// Stats is a snapshot for /metrics.
	Stats() completion.Stats
	// Ready reports whether the model is loaded and requests are accepted.
	Ready() bool
	// Tokenize turns text into the model's token ids (addSpecial: BOS etc.
	// as the model wants; parseSpecial: special-token text becomes its
	// token) and returns each token's raw piece (bytes, maybe not UTF-8).
	Tokenize(ctx context.Context, text string, addSpecial, parseSpecial bool) ([]int32, []string, error)
	// Detokenize turns token ids, each in [0, BackendInfo.VocabSize), back
	// into text.
	Detokenize(ctx context.Context, tokens []int32) (string, error)
	// CountPrompt is the number of prompt tokens, images included, req's
	// messages take, as Submit would count them (Usage.PromptTokens); its
	// errors are Submit's.
	CountPrompt(ctx context.Context, req *completion.Request) (int, error)
}

// BackendInfo describes the loaded model.
type BackendInfo struct {
	ModelID   string    // canonical id (e.g. the model file name); also accepted as "model"
	Created   time.Time // reported as the model's "created" (e.g. model file mtime or load time)
	CtxPerSeq int       // KV cells per sequence (ctx-size / parallel)
	Vision    bool      // a multimodal projector is loaded
	Slots     int       // parallel sequences
	// VocabSize is the number of token ids (valid ids are 0..VocabSize-1);
	// 0: unknown, ids are not range-checked here.
	VocabSize int
	// MediaMarker is the text the engine renders an image part as; text
	// holding it is refused before it reaches the engine. Empty: no check
	// here (the engine still refuses it, with *completion.MarkerInTextError).
	MediaMarker string
	// CachePolicies lists the cache policies and whether this model can apply
	// them; nil: not reported.
	CachePolicies []ModelPolicy
	// KVContexts are the engine's llama contexts (decode, then prefill) and the
	// KV memory each holds; nil: not reported.
	KVContexts []KVContext
}

// KVContext is one llama context's KV cache: its role ("decode", "prefill"),
// cells and bytes (in its own row types).
type KVContext struct {
	Role  string
	Cells int
	Bytes int64
}

// Options is what the HTTP layer needs from the configuration; the command
// fills it from its own (api does not read the server's options itself).
type Options struct {
	// ModelAlias is the model id served; empty: BackendInfo.ModelID.
	ModelAlias string
	// APIKey, when non-empty, is required as a Bearer token on everything
	// but /health and /ready.
	APIKey string
	// CORSOrigins are the browser origins allowed cross-origin ("*": any);
	// empty: no CORS headers, and OPTIONS is not answered.
	CORSOrigins []string

	MaxBodyBytes          int64 // request body limit; <= 0: 64 MiB
	MaxImageBytes         int64 // per image, decoded; <= 0: 10 MiB
	MaxImages             int   // per request; 0: images refused
	MaxImagePixels        int64 // width*height; <= 0: 16777216
	AllowImageURLs        bool
	AllowPrivateImageURLs bool
	ImageURLTimeout       time.Duration // <= 0: 10s

	// RequestTimeout bounds one completion; 0: none.
	RequestTimeout time.Duration
	// StreamKeepAlive is how long a stream may stay silent before the server sends
	// an SSE comment; <= 0: 10s.
	StreamKeepAlive time.Duration
	// DefaultMaxTokens applies when a request sets no max_tokens; <= 0: none.
	DefaultMaxTokens int
	// Cache is the server's default Elastic Cache setting, already validated; a
	// request's elastic_cache overrides it (Spec.With). Zero: elasticcache.DefaultSpec().
	Cache elasticcache.Spec
	// UI serves the playground page at GET / (and its files under /ui/).
	UI bool
}

func (o Options) withDefaults() Options {
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = 64 << 20
	}
	if o.MaxImageBytes <= 0 {
		o.MaxImageBytes = 10 << 20
	}
	if o.MaxImagePixels <= 0 {
		o.MaxImagePixels = 16777216
	}
	if o.ImageURLTimeout <= 0 {
		o.ImageURLTimeout = 10 * time.Second
	}
	if o.StreamKeepAlive <= 0 {
		o.StreamKeepAlive = 10 * time.Second
	}
	if o.Cache.IsZero() {
		o.Cache = elasticcache.DefaultSpec()
	}
	return o
}

// server holds the handlers' shared state; one per New.
type server struct {
	opts    Options
	backend Backend
	log     zerolog.Logger
	metrics *metrics
	fetcher *imageFetcher
}

// New builds the HTTP handler. It does not start anything.
func New(opts Options, backend Backend, log zerolog.Logger) http.Handler {
	opts = opts.withDefaults()
	s := &server{
		opts:    opts,
		backend: backend,
		log:     log,
		metrics: newMetrics(backend),
	}
	if opts.AllowImageURLs {
		s.fetcher = newImageFetcher(opts.ImageURLTimeout, opts.MaxImageBytes, opts.AllowPrivateImageURLs)
	}
	return s.routes()
}

func (s *server) routes() http.Handler {
	r := chi.NewRouter()
	r.Use(requestID, accessLog(s.log), s.metrics.middleware, recoverer(s.log))
	if len(s.opts.CORSOrigins) > 0 {
		r.Use(corsMiddleware(s.opts.CORSOrigins)) // before auth: preflights carry no API key
	}
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, notFound("not_found", "unknown endpoint %s %s", r.Method, r.URL.Path))
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, req *http.Request) {
		var allowed []string
		for _, m := range []string{http.MethodGet, http.MethodPost} {
			if r.Match(chi.NewRouteContext(), m, req.URL.Path) {
				allowed = append(allowed, m)
			}
		}
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: typeInvalidRequest, Code: "method_not_allowed",
			Message: "method " + req.Method + " is not allowed on " + req.URL.Path})
	})

	r.Get("/health", s.handleHealth)
	r.Get("/ready", s.handleReady)
	if s.opts.UI {
		r.Get("/", serveUI)
		r.Get("/ui/*", serveUI)
	}

	r.Group(func(r chi.Router) {
		r.Use(apiKeyAuth(s.opts.APIKey))
		r.Get("/metrics", s.handleMetrics)
		for _, prefix := range []string{"/v1", ""} {
			r.Get(prefix+"/models", s.handleListModels)
			r.Get(prefix+"/models/*", s.handleGetModel)
			r.With(limitBody(s.opts.MaxBodyBytes), requireJSON).Post(prefix+"/chat/completions", s.handleChat)
			r.With(limitBody(s.opts.MaxBodyBytes), requireJSON).Post(prefix+"/tokenize", s.handleTokenize)
			r.With(limitBody(s.opts.MaxBodyBytes), requireJSON).Post(prefix+"/detokenize", s.handleDetokenize)
		}
	})
	return r
}

func (s *server) handleHealth(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *server) handleReady(w http.ResponseWriter, _ *http.Request) {
	if !s.backend.Ready() {
		writeError(w, &apiError{Status: http.StatusServiceUnavailable, Type: typeServiceUnavailable, Code: "not_ready",
			Message: "the model is not loaded yet", RetryAfter: 1})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}
