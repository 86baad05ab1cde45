package api

import (
	"net/http"
	"net/http/httptest"
	"strings"
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

func TestAuth(t *testing.T) {
	opts := testOptions()
	opts.APIKey = "sk-secret"
	h := newHandler(t, opts, newFake())
	tests := []struct {
		name   string
		method string
		path   string
		auth   string
		status int
	}{
		{"no key", "POST", "/v1/chat/completions", "", 401},
		{"wrong key", "POST", "/v1/chat/completions", "Bearer sk-wrong", 401},
		{"prefix of key", "POST", "/v1/chat/completions", "Bearer sk-secre", 401},
		{"basic scheme", "POST", "/v1/chat/completions", "Basic sk-secret", 401},
		{"bare key", "POST", "/v1/chat/completions", "sk-secret", 401},
		{"right key", "POST", "/v1/chat/completions", "Bearer sk-secret", 200},
		{"lower-case scheme", "POST", "/v1/chat/completions", "bearer sk-secret", 200},
		{"models need key", "GET", "/v1/models", "", 401},
		{"models with key", "GET", "/v1/models", "Bearer sk-secret", 200},
		{"metrics need key", "GET", "/metrics", "", 401},
		{"metrics with key", "GET", "/metrics", "Bearer sk-secret", 200},
		{"health open", "GET", "/health", "", 200},
		{"ready open", "GET", "/ready", "", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := ""
			if tt.method == "POST" {
				body = chatBody(t, map[string]any{})
			}
			var opts []reqOpt
			if tt.auth != "" {
				opts = append(opts, withHeader("Authorization", tt.auth))
			}
			w := do(h, tt.method, tt.path, body, opts...)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			if tt.status == 401 {
				e := decodeError(t, w)
				if e.Type != "authentication_error" || str(e.Code) != "invalid_api_key" || w.Header().Get("WWW-Authenticate") == "" {
					t.Fatalf("%s", w.Body)
				}
				if strings.Contains(w.Body.String(), "sk-secret") {
					t.Fatal("the key leaked into the response")
				}
			}
		})
	}
}
