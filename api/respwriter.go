package api

import (
	"net/http"

	"github.com/go-chi/chi/v5/middleware"
)

// wrapWriter returns the response writer shared by the middlewares that
// read the status and size of a response (metrics, recoverer): the first one
// wraps w with chi's recorder (which passes Flush through for SSE, and Unwrap
// for http.ResponseController), the others reuse it.
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
