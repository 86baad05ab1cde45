package api

import "net/http"

func bodyTooLarge(limit int64) *apiError {
	return tooLarge("", "request_too_large", "the request body is larger than the server's limit of %d bytes", limit)
}

// limitBody caps the request body at max bytes (413 beyond). The cap is
// net/http's MaxBytesHandler; readBody turns its *http.MaxBytesError into the
// 413. A body that declares a larger Content-Length is refused here, before
// any of it is read, which MaxBytesHandler alone would not do.
func limitBody(max int64) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		capped := http.MaxBytesHandler(next, max)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ContentLength > max {
				writeError(w, bodyTooLarge(max))
				return
			}
			capped.ServeHTTP(w, r)
		})
	}
}
