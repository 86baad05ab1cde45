package api

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// requestID echoes a sane client id, replaces anything else with its own, and
// hands the same id to the handler (RequestIDFromContext) and the client.
func TestRequestIDMiddleware(t *testing.T) {
	var seen string
	h := requestID(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { seen = RequestIDFromContext(r.Context()) }))
	for _, tt := range []struct {
		sent string
		echo bool
	}{
		{"abc-123", true}, {"trace_1.2:x", true}, {strings.Repeat("x", 128), true},
		{"", false}, {"has space", false}, {strings.Repeat("x", 129), false}, {"new\nline", false}, {"é", false},
	} {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("X-Request-Id", tt.sent)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		got := w.Header().Get("X-Request-Id")
		if got != seen || !validRequestID(got) || (got == tt.sent) != tt.echo {
			t.Errorf("sent %q: header %q, handler saw %q (echo %v)", tt.sent, got, seen, tt.echo)
		}
	}
}

func TestRequestID(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{}), withHeader("X-Request-Id", "abc-123"))
	if w.Header().Get("X-Request-Id") != "abc-123" || fb.lastRequest(t).ID != "abc-123" {
		t.Fatalf("echo: %q / %q", w.Header().Get("X-Request-Id"), fb.lastRequest(t).ID)
	}
	for _, bad := range []string{"", "has space", strings.Repeat("x", 200), "new\nline"} {
		w := do(h, "GET", "/health", "", withHeader("X-Request-Id", bad))
		got := w.Header().Get("X-Request-Id")
		if got == "" || got == bad || !validRequestID(got) {
			t.Fatalf("for %q got %q", bad, got)
		}
	}
}
