package api

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/rs/zerolog"
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
