package api

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// One line per request with its request id, method, path (no query), status,
// size, duration and remote address; a server error is a warning, and a
// handler that writes nothing is logged as the 200 net/http sends.
func TestAccessLogLine(t *testing.T) {
	for _, tt := range []struct {
		name   string
		h      http.HandlerFunc
		status int
		bytes  int
		level  string
	}{
		{"ok", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("hello")) }, 200, 5, "info"},
		{"nothing written", func(http.ResponseWriter, *http.Request) {}, 200, 0, "info"},
		{"client error", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(404) }, 404, 0, "info"},
		{"server error", func(w http.ResponseWriter, _ *http.Request) { writeError(w, internalError("x")) }, 500, -1, "warn"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs bytes.Buffer
			h := requestID(accessLog(zerolog.New(&logs))(tt.h))
			r := httptest.NewRequest(http.MethodPost, "/v1/x?key=secret", nil)
			r.Header.Set("X-Request-Id", "rid-1")
			h.ServeHTTP(httptest.NewRecorder(), r)
			var line map[string]any
			dec := json.NewDecoder(&logs)
			if err := dec.Decode(&line); err != nil {
				t.Fatal(err)
			}
			if dec.More() {
				t.Fatalf("more than one line: %s", logs.String())
			}
			want := map[string]any{"level": tt.level, "message": "http request", "request_id": "rid-1", "method": "POST",
				"path": "/v1/x", "remote": "192.0.2.1:1234", "status": float64(tt.status)}
			if tt.bytes >= 0 {
				want["bytes"] = float64(tt.bytes)
			}
			for k, v := range want {
				if line[k] != v {
					t.Errorf("%s = %v, want %v (%v)", k, line[k], v, line)
				}
			}
			if _, ok := line["duration"].(float64); !ok {
				t.Errorf("no duration: %v", line)
			}
		})
	}
}

func TestAccessLogHasNoSecrets(t *testing.T) {
	var logs bytes.Buffer
	opts := testOptions()
	opts.APIKey = "sk-secret"
	h := New(opts, newFake(), zerolog.New(&logs))
	img := dataURLOf("image/png", pngBytes(t, 4, 4))
	postChat(h, chatBody(t, map[string]any{"messages": userParts(textPart("my private prompt"), imagePart(img))}),
		withHeader("Authorization", "Bearer sk-secret"))
	out := logs.String()
	for _, secret := range []string{"sk-secret", "my private prompt", img[30:60]} {
		if strings.Contains(out, secret) {
			t.Fatalf("log contains %q: %s", secret, out)
		}
	}
	for _, field := range []string{`"method":"POST"`, `"path":"/v1/chat/completions"`, `"status":200`, `"request_id"`, `"bytes"`, `"duration"`} {
		if !strings.Contains(out, field) {
			t.Fatalf("log lacks %s: %s", field, out)
		}
	}
}
