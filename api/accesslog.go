package api

import (
	"net/http"
	"time"

	"github.com/rs/zerolog"
	"github.com/rs/zerolog/hlog"
)

// accessLog logs one line per request: never bodies, queries or headers. It
// is zerolog's hlog: NewHandler puts log in the request's context (handlers
// may log through hlog.FromRequest) and AccessHandler measures the response.
func accessLog(log zerolog.Logger) func(http.Handler) http.Handler {
	access := hlog.AccessHandler(func(r *http.Request, status, size int, d time.Duration) {
		if status == 0 { // the handler wrote nothing: net/http sends 200
			status = http.StatusOK
		}
		l := hlog.FromRequest(r)
		ev := l.Info()
		if status >= 500 {
			ev = l.Warn()
		}
		ev.Str("request_id", RequestIDFromContext(r.Context())).
			Str("method", r.Method).
			Str("path", r.URL.Path).
			Int("status", status).
			Int("bytes", size).
			Dur("duration", d).
			Str("remote", r.RemoteAddr).
			Msg("http request")
	})
	inject := hlog.NewHandler(log)
	return func(next http.Handler) http.Handler { return inject(access(next)) }
}
