package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"mime"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/go-chi/chi/v5/middleware"
	"github.com/go-chi/cors"
	"github.com/rs/zerolog"
)

// wrapWriter returns the response writer shared by the middlewares that
// read the status and size of a response: the first one wraps w with chi's
// recorder (which passes Flush through for SSE, and Unwrap for
// http.ResponseController), the others reuse it.
func wrapWriter(w http.ResponseWriter, r *http.Request) middleware.WrapResponseWriter {
	if ww, ok := w.(middleware.WrapResponseWriter); ok {
		return ww
	}
	return middleware.NewWrapResponseWriter(w, r.ProtoMajor)
}

// statusOf is the status sent; a handler that wrote nothing sent 200.
func statusOf(w middleware.WrapResponseWriter) int {
	if w.Status() == 0 {
		return http.StatusOK
	}
	return w.Status()
}

// ---- request id ----

// RequestIDFromContext returns the request id set by the router ("" if
// none); middleware.GetReqID reads the same value.
func RequestIDFromContext(ctx context.Context) string { return middleware.GetReqID(ctx) }

const requestIDHeader = "X-Request-Id"

// requestID echoes a sane X-Request-Id or makes one, and puts it in the
// context under chi's key. Unlike chi's RequestID it never trusts a
// client's id that could corrupt a log line or a header.
func requestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get(requestIDHeader)
		if !validRequestID(id) {
			id = randomHex(8)
		}
		w.Header().Set(requestIDHeader, id)
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), middleware.RequestIDKey, id)))
	})
}

func validRequestID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-_.:", c) >= 0) {
			return false
		}
	}
	return true
}

// ---- access log ----

// accessLog logs one line per request: never bodies, queries or headers.
func accessLog(log zerolog.Logger) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			rw := wrapWriter(w, r)
			next.ServeHTTP(rw, r)
			status := statusOf(rw)
			ev := log.Info()
			if status >= 500 {
				ev = log.Warn()
			}
			ev.Str("request_id", RequestIDFromContext(r.Context())).
				Str("method", r.Method).
				Str("path", r.URL.Path).
				Int("status", status).
				Int("bytes", rw.BytesWritten()).
				Dur("duration", time.Since(start)).
				Str("remote", r.RemoteAddr).
				Msg("http request")
		})
	}
}

// ---- panic recovery ----

// recoverer turns a handler panic into a 500 (when nothing was sent yet) and
// keeps the server alive. chi's Recoverer would answer in plain text; this
// one answers with an OpenAI error.
func recoverer(log zerolog.Logger) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rw := wrapWriter(w, r)
			defer func() {
				v := recover()
				if v == nil {
					return
				}
				if v == http.ErrAbortHandler { //nolint:errorlint // sentinel compared by identity, as net/http does
					panic(v)
				}
				log.Error().Str("request_id", RequestIDFromContext(r.Context())).
					Str("panic", fmt.Sprint(v)).Bytes("stack", debug.Stack()).Msg("handler panic")
				if rw.Status() == 0 {
					writeError(rw, internalError("internal server error"))
				}
			}()
			next.ServeHTTP(rw, r)
		})
	}
}

// ---- body limits and content type ----

func bodyTooLarge(limit int64) *apiError {
	return tooLarge("", "request_too_large", "the request body is larger than the server's limit of %d bytes", limit)
}

// limitBody caps the request body at max bytes (413 beyond).
func limitBody(max int64) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ContentLength > max {
				writeError(w, bodyTooLarge(max))
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, max)
			next.ServeHTTP(w, r)
		})
	}
}

// requireJSON answers 415 to a POST whose Content-Type is not application/json.
func requireJSON(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			ct := r.Header.Get("Content-Type")
			mt, params, err := mime.ParseMediaType(ct)
			cs := strings.ToLower(params["charset"])
			if err != nil || mt != "application/json" || (cs != "" && cs != "utf-8" && cs != "utf8") {
				writeError(w, &apiError{Status: http.StatusUnsupportedMediaType, Type: typeInvalidRequest, Code: "unsupported_media_type",
					Message: fmt.Sprintf("Content-Type must be application/json, got %q", ct)})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// ---- auth ----

// apiKeyAuth requires "Authorization: Bearer <key>" when key is non-empty.
// Keys are compared as SHA-256 digests in constant time, so neither content
// nor length leaks through timing.
func apiKeyAuth(key string) func(http.Handler) http.Handler {
	if key == "" {
		return func(next http.Handler) http.Handler { return next }
	}
	want := sha256.Sum256([]byte(key))
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			token, ok := bearerToken(r.Header.Get("Authorization"))
			if !ok {
				unauthorized(w, "missing API key: send the header 'Authorization: Bearer <key>'")
				return
			}
			got := sha256.Sum256([]byte(token))
			if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
				unauthorized(w, "incorrect API key provided")
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

func bearerToken(h string) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}

func unauthorized(w http.ResponseWriter, msg string) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="elasticserve"`)
	writeError(w, &apiError{Status: http.StatusUnauthorized, Type: typeAuthentication, Code: "invalid_api_key", Message: msg})
}

// ---- CORS ----

// corsAllowedHeaders are the request headers a browser client may send
// cross-origin: the API's own, and those of the OpenAI JS SDK, which (with
// dangerouslyAllowBrowser) adds X-Stainless-* platform headers and, when
// configured, OpenAI-Organization / OpenAI-Project / OpenAI-Beta. The SDK
// adds new X-Stainless-* names from release to release, so these two are
// matched as prefixes.
var (
	corsAllowedHeaders  = []string{"Authorization", "Content-Type", "Accept", "X-Request-Id"}
	corsAllowedPrefixes = []string{"X-Stainless-", "Openai-"} // canonical form of OpenAI-
	// corsExposedHeaders are the response headers a browser lets the page
	// (and the SDK's retry logic) read.
	corsExposedHeaders = []string{requestIDHeader, "Retry-After", shouldRetryHeader}
)

// corsMiddleware answers CORS for the origins listed ("*": any). It goes
// before auth: a browser sends its preflight (OPTIONS) without the
// Authorization header, and go-chi/cors answers a preflight itself (200)
// without calling the rest of the chain.
//
// go-chi/cors matches allowed request headers by exact name, or allows all
// of them with "*" (echoing the requested list in
// Access-Control-Allow-Headers). To allow the SDK's header prefixes, a
// preflight whose requested headers all pass corsHeaderAllowed goes to an
// instance that allows "*"; any other goes to one that allows only the
// exact names, which refuses it (no Access-Control-Allow-Origin).
func corsMiddleware(origins []string) func(http.Handler) http.Handler {
	base := cors.Options{
		AllowedOrigins: origins,
		AllowedMethods: []string{http.MethodGet, http.MethodPost},
		ExposedHeaders: corsExposedHeaders,
		MaxAge:         600, // seconds a browser may cache a preflight
	}
	open, strict := base, base
	open.AllowedHeaders = []string{"*"}
	strict.AllowedHeaders = corsAllowedHeaders
	openMW, strictMW := cors.Handler(open), cors.Handler(strict)
	return func(next http.Handler) http.Handler {
		openH, strictH := openMW(next), strictMW(next)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodOptions && !corsHeadersAllowed(r.Header.Get("Access-Control-Request-Headers")) {
				strictH.ServeHTTP(w, r)
				return
			}
			openH.ServeHTTP(w, r)
		})
	}
}

// corsHeadersAllowed reports whether every header in a preflight's
// Access-Control-Request-Headers list may be sent.
func corsHeadersAllowed(list string) bool {
	for _, h := range strings.Split(list, ",") {
		h = http.CanonicalHeaderKey(strings.TrimSpace(h))
		if h != "" && !corsHeaderAllowed(h) {
			return false
		}
	}
	return true
}

func corsHeaderAllowed(h string) bool {
	for _, a := range corsAllowedHeaders {
		if h == a {
			return true
		}
	}
	for _, p := range corsAllowedPrefixes {
		if len(h) > len(p) && strings.HasPrefix(h, p) {
			return true
		}
	}
	return false
}
