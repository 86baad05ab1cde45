package api

import (
	"fmt"
	"net/http"
	"runtime/debug"

	"github.com/rs/zerolog"
)

// recoverer turns a handler panic into a 500 (when nothing was sent yet) and
// keeps the server alive. chi's Recoverer does not fit: it answers a bare 500
// with no body, not an OpenAI error, and prints the stack to stderr (or to
// chi's own request logger), not to the server's log.
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
