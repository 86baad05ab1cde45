package api

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// With a key, only "Bearer <key>" (scheme in any case, spaces trimmed) gets
// through; a refusal is a 401 invalid_api_key with WWW-Authenticate. Without
// a key everything gets through.
func TestAPIKeyAuthMiddleware(t *testing.T) {
	next := http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})
	h := apiKeyAuth("sk-secret")(next)
	for _, tt := range []struct {
		auth   string
		status int
	}{
		{"Bearer sk-secret", 200}, {"bearer sk-secret", 200}, {"  Bearer   sk-secret  ", 200},
		{"", 401}, {"Bearer", 401}, {"Bearer ", 401}, {"Bearer sk-secre", 401}, {"Bearer sk-secret2", 401},
		{"Basic sk-secret", 401}, {"sk-secret", 401},
	} {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("Authorization", tt.auth)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != tt.status {
			t.Errorf("%q: %d, want %d", tt.auth, w.Code, tt.status)
			continue
		}
		if tt.status == 401 {
			if e := decodeError(t, w); e.Type != "authentication_error" || str(e.Code) != "invalid_api_key" ||
				w.Header().Get("WWW-Authenticate") != `Bearer realm="elasticserve"` {
				t.Errorf("%q: %s %v", tt.auth, w.Body, w.Header())
			}
		}
	}
	w := httptest.NewRecorder()
	apiKeyAuth("")(next).ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
	if w.Code != 200 {
		t.Fatalf("no key configured: %d", w.Code)
	}
}
