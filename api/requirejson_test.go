package api

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// A POST must be application/json (UTF-8 when a charset is given); other
// methods pass whatever they send.
func TestRequireJSONMiddleware(t *testing.T) {
	h := requireJSON(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	for _, tt := range []struct {
		method, ct string
		status     int
	}{
		{http.MethodPost, "application/json", 200},
		{http.MethodPost, "Application/JSON; charset=UTF-8", 200},
		{http.MethodPost, "application/json; charset=utf8", 200},
		{http.MethodPost, "application/json; charset=latin1", 415},
		{http.MethodPost, "text/plain", 415},
		{http.MethodPost, "", 415},
		{http.MethodPost, "application/json;;", 415},
		{http.MethodGet, "", 200},
		{http.MethodGet, "text/plain", 200},
	} {
		r := httptest.NewRequest(tt.method, "/", nil)
		r.Header.Set("Content-Type", tt.ct)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != tt.status {
			t.Errorf("%s %q: %d, want %d", tt.method, tt.ct, w.Code, tt.status)
			continue
		}
		if tt.status == 415 {
			if e := decodeError(t, w); str(e.Code) != "unsupported_media_type" || e.Type != "invalid_request_error" {
				t.Errorf("%s %q: %s", tt.method, tt.ct, w.Body)
			}
		}
	}
}

// Through the router: a chat POST that is not JSON is a 415.
func TestContentTypeThroughHandler(t *testing.T) {
	h := newHandler(t, testOptions(), newFake())

	for _, ct := range []string{"text/plain", "", "application/x-www-form-urlencoded", "application/json; charset=latin1"} {
		w := postChat(h, chatBody(t, map[string]any{}), withHeader("Content-Type", ct))
		if e := decodeError(t, w); w.Code != http.StatusUnsupportedMediaType || str(e.Code) != "unsupported_media_type" {
			t.Fatalf("content type %q: %d %s", ct, w.Code, w.Body)
		}
	}
	w := postChat(h, chatBody(t, map[string]any{}), withHeader("Content-Type", "application/json; charset=utf-8"))
	if w.Code != 200 {
		t.Fatalf("charset utf-8: %d %s", w.Code, w.Body)
	}
}
