package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
)

// apiKeyAuth requires "Authorization: Bearer <key>" when key is non-empty
// (no dependency has one: chi has Basic auth only).
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
