package api

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// A panic before anything was sent becomes a logged 500 OpenAI error; one
// after the answer began leaves the answer as it is; http.ErrAbortHandler
// goes on to net/http, which aborts the connection.
func TestRecovererMiddleware(t *testing.T) {
	var logs bytes.Buffer
	mw := recoverer(zerolog.New(&logs))

	w := httptest.NewRecorder()
	mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("kaboom") })).
		ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
	if e := decodeError(t, w); w.Code != 500 || e.Type != "server_error" || strings.Contains(e.Message, "kaboom") {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	if !strings.Contains(logs.String(), "kaboom") || !strings.Contains(logs.String(), `"stack"`) {
		t.Fatalf("panic not logged: %s", logs.String())
	}

	w = httptest.NewRecorder()
	mw(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("data: x\n\n"))
		panic("late")
	})).ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
	if w.Code != 200 || w.Body.String() != "data: x\n\n" {
		t.Fatalf("a panic after the answer began: %d %q", w.Code, w.Body)
	}

	defer func() {
		if v := recover(); v != http.ErrAbortHandler { //nolint:errorlint // identity, as net/http compares it
			t.Fatalf("ErrAbortHandler recovered as %v", v)
		}
	}()
	mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) })).
		ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/", nil))
}

func TestPanicRecovery(t *testing.T) {
	var logs bytes.Buffer
	fb := newFake()
	fb.panicMsg = "kaboom"
	h := New(testOptions(), fb, zerolog.New(&logs))
	w := postChat(h, chatBody(t, map[string]any{}))
	if e := decodeError(t, w); w.Code != 500 || e.Type != "server_error" || strings.Contains(e.Message, "kaboom") {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	if !strings.Contains(logs.String(), "kaboom") {
		t.Fatal("panic not logged")
	}
	fb.mu.Lock()
	fb.panicMsg = ""
	fb.mu.Unlock()
	if w := postChat(h, chatBody(t, map[string]any{})); w.Code != 200 {
		t.Fatalf("server did not survive: %d %s", w.Code, w.Body)
	}
}
