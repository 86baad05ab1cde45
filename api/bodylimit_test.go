package api

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// A body over the limit is a 413 request_too_large: refused before the
// handler when its Content-Length says so, and while it is read when it is
// sent without one; a body at the limit reaches the handler whole.
func TestLimitBodyMiddleware(t *testing.T) {
	const limit = 16
	var reached bool
	h := limitBody(limit)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached = true
		body, aerr := readBody(r)
		if aerr != nil {
			writeError(w, aerr)
			return
		}
		_, _ = w.Write(body)
	}))
	for _, tt := range []struct {
		name    string
		size    int
		chunked bool
		status  int
		reached bool
	}{
		{"at the limit", limit, false, 200, true},
		{"declared over", limit + 1, false, 413, false},
		{"chunked at the limit", limit, true, 200, true},
		{"chunked over", limit + 1, true, 413, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reached = false
			r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(strings.Repeat("x", tt.size)))
			if tt.chunked {
				r.ContentLength = -1
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != tt.status || reached != tt.reached {
				t.Fatalf("status %d (handler reached: %v): %s", w.Code, reached, w.Body)
			}
			if tt.status == 413 {
				if e := decodeError(t, w); str(e.Code) != "request_too_large" || e.Param != nil || !strings.Contains(e.Message, "16 bytes") {
					t.Fatalf("%s", w.Body)
				}
			} else if w.Body.Len() != tt.size {
				t.Fatalf("handler read %d bytes", w.Body.Len())
			}
		})
	}
}

// Through the router: a body over --max-body-bytes is a 413, with or without
// a Content-Length.
func TestBodyLimitThroughHandler(t *testing.T) {
	opts := testOptions()
	opts.MaxBodyBytes = 2048
	h := newHandler(t, opts, newFake())
	big := chatBody(t, map[string]any{"messages": []any{map[string]any{"role": "user", "content": strings.Repeat("x", 4096)}}})

	w := postChat(h, big)
	if e := decodeError(t, w); w.Code != 413 || str(e.Code) != "request_too_large" || e.Param != nil {
		t.Fatalf("big body: %d %s", w.Code, w.Body)
	}
	// Without Content-Length (chunked), the limit still applies while reading.
	r := newChunkedRequest(big)
	rec := newRecorder()
	h.ServeHTTP(rec, r)
	if e := decodeError(t, rec); rec.Code != 413 || str(e.Code) != "request_too_large" {
		t.Fatalf("chunked big body: %d %s", rec.Code, rec.Body)
	}

}
