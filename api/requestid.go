package api

import (
	"context"
	"net/http"
	"strings"

	"github.com/go-chi/chi/v5/middleware"
)

// RequestIDFromContext returns the request id set by the router ("" if
// none); middleware.GetReqID reads the same value.
func RequestIDFromContext(ctx context.Context) string { return middleware.GetReqID(ctx) }

const requestIDHeader = "X-Request-Id"

// requestID echoes a sane X-Request-Id or makes one, and puts it in the
// context under chi's key.
//
// Neither dependency's request-id middleware fits. chi's RequestID trusts
// any client id (one that could corrupt a log line or a header) and sends
// none back; zerolog's hlog.RequestIDHandler never takes the client's id (it
// always makes an xid, under its own context key), so a client could not
// trace its request through our logs by the id it sent.
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
