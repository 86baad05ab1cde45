package api

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
)

func TestHealthReady(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	if w := do(h, "GET", "/health", ""); w.Code != 200 || strings.TrimSpace(w.Body.String()) != `{"status":"ok"}` {
		t.Fatalf("health %d %s", w.Code, w.Body)
	}
	if w := do(h, "GET", "/ready", ""); w.Code != 200 {
		t.Fatalf("ready %d %s", w.Code, w.Body)
	}
	fb.mu.Lock()
	fb.ready = false
	fb.mu.Unlock()
	w := do(h, "GET", "/ready", "")
	if e := decodeError(t, w); w.Code != 503 || str(e.Code) != "not_ready" {
		t.Fatalf("not ready %d %s", w.Code, w.Body)
	}
}

func TestModels(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	for _, path := range []string{"/v1/models", "/models"} {
		w := do(h, "GET", path, "")
		var list ModelList
		if err := json.Unmarshal(w.Body.Bytes(), &list); err != nil || w.Code != 200 {
			t.Fatalf("%s: %d %s", path, w.Code, w.Body)
		}
		want := Model{ID: "test-vlm", Object: "model", Created: 1700000000, OwnedBy: "elasticserve"}
		if list.Object != "list" || len(list.Data) != 1 || list.Data[0] != want {
			t.Fatalf("%s: %+v", path, list)
		}
	}
	for _, id := range []string{"test-vlm", "model.gguf"} {
		w := do(h, "GET", "/v1/models/"+id, "")
		var m Model
		if err := json.Unmarshal(w.Body.Bytes(), &m); err != nil || w.Code != 200 || m.ID != "test-vlm" {
			t.Fatalf("get %s: %d %s", id, w.Code, w.Body)
		}
	}
	w := do(h, "GET", "/v1/models/org/other", "")
	if e := decodeError(t, w); w.Code != 404 || str(e.Code) != "model_not_found" || e.Type != "not_found_error" {
		t.Fatalf("unknown model %d %s", w.Code, w.Body)
	}
	// Without an alias the backend's id is served.
	h = newHandler(t, Options{}, fb)
	if w := do(h, "GET", "/models/model.gguf", ""); w.Code != 200 {
		t.Fatalf("no alias: %d %s", w.Code, w.Body)
	}
	if w := postChat(h, chatBody(t, map[string]any{"model": "model.gguf"})); w.Code != 200 {
		t.Fatalf("chat by model id: %d %s", w.Code, w.Body)
	}
}

func TestChatAlias(t *testing.T) {
	h := newHandler(t, testOptions(), newFake())
	if w := do(h, "POST", "/chat/completions", chatBody(t, map[string]any{})); w.Code != 200 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}

func TestNotFoundAndMethodNotAllowed(t *testing.T) {
	h := newHandler(t, testOptions(), newFake())
	tests := []struct {
		method, path string
		status       int
		typ, code    string
		allow        string
	}{
		{"GET", "/nope", 404, "not_found_error", "not_found", ""},
		{"POST", "/v1/completions", 404, "not_found_error", "not_found", ""},
		{"GET", "/v1/chat/completions", 405, "invalid_request_error", "method_not_allowed", "POST"},
		{"DELETE", "/v1/models", 405, "invalid_request_error", "method_not_allowed", "GET"},
		{"POST", "/health", 405, "invalid_request_error", "method_not_allowed", "GET"},
	}
	for _, tt := range tests {
		w := do(h, tt.method, tt.path, "")
		e := decodeError(t, w)
		if w.Code != tt.status || e.Type != tt.typ || str(e.Code) != tt.code || e.Param != nil {
			t.Fatalf("%s %s: %d %s", tt.method, tt.path, w.Code, w.Body)
		}
		if tt.status == 405 && w.Header().Get("Allow") != tt.allow {
			t.Fatalf("%s %s: Allow %q, want %q", tt.method, tt.path, w.Header().Get("Allow"), tt.allow)
		}
	}
}

// The body the OpenAI SDK sends (with fields this server ignores) is accepted.
func TestOpenAISDKShapedRequest(t *testing.T) {
	body := `{"messages":[{"content":"You are terse.","role":"system"},{"content":[{"text":"Describe","type":"text"},` +
		`{"image_url":{"url":"` + dataURLOf("image/png", pngBytes(t, 3, 3)) + `","detail":"auto"},"type":"image_url"}],"role":"user","name":"bob"}],` +
		`"model":"test-vlm","max_completion_tokens":16,"stream":true,"stream_options":{"include_usage":true},"temperature":0,` +
		`"metadata":{"a":"b"},"store":false,"parallel_tool_calls":null,"tools":null,"user":"u1","service_tier":"auto","logprobs":false,"top_logprobs":null}`
	fb := newFake()
	w := postChat(newHandler(t, testOptions(), fb), body)
	if w.Code != 200 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	b, _ := io.ReadAll(w.Body)
	if !bytes.HasSuffix(b, []byte("data: [DONE]\n\n")) {
		t.Fatalf("%s", b)
	}
	if r := fb.lastRequest(t); len(r.Images()) != 1 || r.MaxTokens != 16 {
		t.Fatalf("%+v", r)
	}
	_ = http.StatusOK
}
