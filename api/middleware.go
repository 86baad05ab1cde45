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

	"github.com/rs/zerolog"
)

// respWriter records the status and size of a response. Middlewares share
// one (see wrapWriter); it passes Flush through for SSE and Unwrap for
// http.ResponseController.
type respWriter struct {
	http.ResponseWriter
	status      int
	bytes       int64
	wroteHeader bool
}

func wrapWriter(w http.ResponseWriter) *respWriter {
	if rw, ok := w.(*respWriter); ok {
		return rw
	}
	return &respWriter{ResponseWriter: w}
}

func (w *respWriter) WriteHeader(code int) {
	if !w.wroteHeader && code >= 200 {
		w.status = code
		w.wroteHeader = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *respWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *respWriter) Flush() {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *respWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// statusOr is the recorded status; a handler that wrote nothing sent 200.
func (w *respWriter) statusOr() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}

// ---- request id ----

type ctxKey int

const requestIDKey ctxKey = iota

// RequestIDFromContext returns the request id set by the router ("" if none).
func RequestIDFromContext(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey).(string)
	return id
}

const requestIDHeader = "X-Request-Id"

// requestID echoes a sane X-Request-Id or makes one, and puts it in the context.
func requestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get(requestIDHeader)
		if !validRequestID(id) {
			id = randomHex(8)
		}
		w.Header().Set(requestIDHeader, id)
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), requestIDKey, id)))
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
			rw := wrapWriter(w)
			next.ServeHTTP(rw, r)
			status := rw.statusOr()
			ev := log.Info()
			if status >= 500 {
				ev = log.Warn()
			}
			ev.Str("request_id", RequestIDFromContext(r.Context())).
				Str("method", r.Method).
				Str("path", r.URL.Path).
				Int("status", status).
				Int64("bytes", rw.bytes).
				Dur("duration", time.Since(start)).
				Str("remote", r.RemoteAddr).
				Msg("http request")
		})
	}
}

// ---- panic recovery ----

// recoverer turns a handler panic into a 500 (when nothing was sent yet) and
// keeps the server alive.
func recoverer(log zerolog.Logger) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rw := wrapWriter(w)
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
				if !rw.wroteHeader {
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
