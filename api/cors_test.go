package api

import (
	"net/http"
	"strings"
	"testing"
)

// The headers the OpenAI JS SDK sends from a browser (dangerouslyAllowBrowser),
// as a browser lists them in a preflight (lower case).
const sdkRequestHeaders = "authorization,content-type,openai-organization,x-stainless-arch,x-stainless-lang," +
	"x-stainless-os,x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout"

// TestCORS: with --cors-origins a browser's preflight from an allowed
// origin is answered before auth (it carries no API key) and allows the
// SDK's headers; another origin, or a header outside the list, gets no
// Access-Control-Allow-Origin (the browser then blocks the call); the
// actual request exposes X-Request-Id, Retry-After and x-should-retry.
// CORS is off by default: a preflight is a 405 as any OPTIONS.
func TestCORS(t *testing.T) {
	const app = "https://app.example"
	type cors struct {
		origins []string
		method  string
		origin  string
		reqHdrs string // Access-Control-Request-Headers of a preflight
		auth    bool
	}
	tests := []struct {
		name   string
		in     cors
		status int
		acao   string // Access-Control-Allow-Origin; "" : absent
		check  func(t *testing.T, h http.Header)
	}{
		{name: "preflight from an allowed origin", in: cors{origins: []string{app}, method: http.MethodOptions, origin: app, reqHdrs: sdkRequestHeaders},
			status: http.StatusOK, acao: app, check: func(t *testing.T, h http.Header) {
				if got := h.Get("Access-Control-Allow-Methods"); got != http.MethodPost {
					t.Errorf("Allow-Methods %q, want POST", got)
				}
				allowed := strings.ToLower(h.Get("Access-Control-Allow-Headers"))
				for _, want := range strings.Split(sdkRequestHeaders, ",") {
					if !strings.Contains(allowed, want) {
						t.Errorf("Allow-Headers %q lacks %s", allowed, want)
					}
				}
				if h.Get("Access-Control-Max-Age") == "" {
					t.Error("no Access-Control-Max-Age: every call would be preceded by a preflight")
				}
			}},
		{name: "preflight from any origin with *", in: cors{origins: []string{"*"}, method: http.MethodOptions, origin: "http://localhost:5173", reqHdrs: "authorization,content-type"},
			status: http.StatusOK, acao: "*"},
		{name: "preflight with a wildcard origin", in: cors{origins: []string{"https://*.example"}, method: http.MethodOptions, origin: app, reqHdrs: "content-type"},
			status: http.StatusOK, acao: app},
		{name: "preflight from another origin", in: cors{origins: []string{app}, method: http.MethodOptions, origin: "https://evil.example", reqHdrs: "authorization"},
			status: http.StatusOK, acao: ""},
		{name: "preflight asking for a header outside the list", in: cors{origins: []string{app}, method: http.MethodOptions, origin: app, reqHdrs: "authorization,x-forwarded-for"},
			status: http.StatusOK, acao: ""},
		{name: "actual request from an allowed origin", in: cors{origins: []string{app}, method: http.MethodPost, origin: app, auth: true},
			status: http.StatusOK, acao: app, check: func(t *testing.T, h http.Header) {
				exposed := strings.ToLower(h.Get("Access-Control-Expose-Headers"))
				for _, want := range []string{"x-request-id", "retry-after", "x-should-retry"} {
					if !strings.Contains(exposed, want) {
						t.Errorf("Expose-Headers %q lacks %s", exposed, want)
					}
				}
			}},
		// The error is readable by the page too (ACAO on a 401).
		{name: "actual request without a key", in: cors{origins: []string{app}, method: http.MethodPost, origin: app},
			status: http.StatusUnauthorized, acao: app},
		{name: "actual request from another origin", in: cors{origins: []string{app}, method: http.MethodPost, origin: "https://evil.example", auth: true},
			status: http.StatusOK, acao: ""},
		{name: "off by default: preflight", in: cors{method: http.MethodOptions, origin: app, reqHdrs: "authorization"},
			status: http.StatusMethodNotAllowed, acao: ""},
		{name: "off by default: actual request", in: cors{method: http.MethodPost, origin: app, auth: true},
			status: http.StatusOK, acao: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := testOptions()
			opts.APIKey = "sk-secret"
			opts.CORSOrigins = tt.in.origins
			h := newHandler(t, opts, newFake())
			hdrs := []reqOpt{withHeader("Origin", tt.in.origin)}
			body := ""
			if tt.in.method == http.MethodOptions {
				hdrs = append(hdrs, withHeader("Access-Control-Request-Method", http.MethodPost),
					withHeader("Access-Control-Request-Headers", tt.in.reqHdrs))
			} else {
				body = chatBody(t, map[string]any{})
			}
			if tt.in.auth {
				hdrs = append(hdrs, withHeader("Authorization", "Bearer sk-secret"))
			}
			w := do(h, tt.in.method, "/v1/chat/completions", body, hdrs...)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			if got := w.Header().Get("Access-Control-Allow-Origin"); got != tt.acao {
				t.Fatalf("Access-Control-Allow-Origin %q, want %q", got, tt.acao)
			}
			if tt.check != nil {
				tt.check(t, w.Header())
			}
		})
	}
}

func TestCORSHeadersAllowed(t *testing.T) {
	tests := []struct {
		list string
		want bool
	}{
		{"", true},
		{"Authorization, Content-Type", true},
		{"x-stainless-some-future-header", true},
		{"OpenAI-Beta,openai-project", true},
		{"x-stainless-", false}, // a prefix alone is no header name
		{"authorization, cookie", false},
		{"x-api-key", false},
	}
	for _, tt := range tests {
		if got := corsHeadersAllowed(tt.list); got != tt.want {
			t.Errorf("corsHeadersAllowed(%q) = %v, want %v", tt.list, got, tt.want)
		}
	}
}
