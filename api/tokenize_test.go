package api

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// The fake backend tokenizes one token per byte (fakeBOS with
// add_special) and counts an image as fakeImageToken tokens.

// TestTokenize: content answers llama-server's shape (ids, or id/piece
// pairs; a piece that is not UTF-8 alone is its bytes), under both paths;
// a chat body answers the prompt's count with its images.
func TestTokenize(t *testing.T) {
	png1 := pngBytes(t, 4, 4)
	tests := []struct {
		name string
		path string
		body string
		want string // the exact JSON answer
	}{
		{"text", "/tokenize", `{"content":"hi"}`, `{"tokens":[104,105],"count":2}`},
		{"v1 path", "/v1/tokenize", `{"content":"hi"}`, `{"tokens":[104,105],"count":2}`},
		{"add_special", "/tokenize", `{"content":"hi","add_special":true}`, `{"tokens":[256,104,105],"count":3}`},
		{"empty text is an empty list, not null", "/tokenize", `{"content":""}`, `{"tokens":[],"count":0}`},
		{"with pieces", "/tokenize", `{"content":"a\u00e9","with_pieces":true}`,
			`{"tokens":[{"id":97,"piece":"a"},{"id":195,"piece":[195]},{"id":169,"piece":[169]}],"count":3}`},
		{"chat body", "/v1/tokenize", chatBody(t, map[string]any{"messages": userParts(textPart("abc"), imagePart(dataURLOf("image/png", png1)))}),
			`{"count":13}`},
		{"chat body, text only", "/tokenize", `{"messages":[{"role":"user","content":"hello"}]}`, `{"count":5}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := do(newHandler(t, testOptions(), newFake()), http.MethodPost, tt.path, tt.body)
			if w.Code != http.StatusOK {
				t.Fatalf("status %d: %s", w.Code, w.Body)
			}
			if got := strings.TrimSpace(w.Body.String()); got != tt.want {
				t.Fatalf("answer %s, want %s", got, tt.want)
			}
		})
	}
}

// The chat body is validated and its images loaded exactly as for a
// completion: the engine gets decoded image bytes (a WebP as PNG).
func TestTokenizeChatLoadsImages(t *testing.T) {
	fb := newFake()
	webpPic := readFixture(t, "test12x8-lossless.webp")
	w := do(newHandler(t, testOptions(), fb), http.MethodPost, "/tokenize",
		chatBody(t, map[string]any{"messages": userParts(imagePart(dataURLOf("image/webp", webpPic)))}))
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	req := fb.lastRequest(t)
	if imgs := req.Images(); len(imgs) != 1 || !strings.HasPrefix(string(imgs[0]), "\x89PNG") {
		t.Fatalf("the count did not see the image as PNG")
	}
}

func TestTokenizeErrors(t *testing.T) {
	tests := []struct {
		name      string
		path      string
		body      string
		submitErr error // the fake's CountPrompt fails so
		vocab     int   // BackendInfo.VocabSize; 0: the fake's
		status    int
		param     string
		code      string
		msg       string
	}{
		{name: "neither content nor messages", path: "/tokenize", body: `{"add_special":true}`, status: 400, param: "content", code: "invalid_value", msg: "content"},
		{name: "content and messages", path: "/tokenize", body: `{"content":"x","messages":[{"role":"user","content":"x"}]}`, status: 400, param: "messages", code: "invalid_value", msg: "not both"},
		{name: "content not a string", path: "/tokenize", body: `{"content":5}`, status: 400, param: "content", code: "invalid_type"},
		{name: "add_special not a bool", path: "/tokenize", body: `{"content":"x","add_special":"yes"}`, status: 400, param: "add_special", code: "invalid_type"},
		{name: "body is an array", path: "/tokenize", body: `["x"]`, status: 400, param: "<null>", code: "invalid_json"},
		{name: "empty body", path: "/tokenize", body: ` `, status: 400, param: "<null>", code: "invalid_json"},
		{name: "bad chat role", path: "/tokenize", body: `{"messages":[{"role":"wizard","content":"x"}]}`, status: 400, param: "messages[0].role", code: "invalid_value"},
		{name: "chat with an unknown model", path: "/tokenize", body: `{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}`, status: 404, param: "model", code: "model_not_found"},
		{name: "chat with a corrupt image", path: "/tokenize", body: chatBody(t, map[string]any{"messages": userParts(imagePart("data:image/webp;base64,UklGRg=="))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image"},
		{name: "chat the engine cannot count", path: "/tokenize", body: `{"messages":[{"role":"user","content":"x"}]}`, submitErr: completion.ErrNoVision,
			status: 400, param: "messages", code: "images_not_supported"},

		{name: "detokenize without tokens", path: "/detokenize", body: `{}`, status: 400, param: "tokens", code: "invalid_value"},
		{name: "detokenize tokens not an array", path: "/detokenize", body: `{"tokens":"1 2"}`, status: 400, param: "tokens", code: "invalid_type"},
		{name: "detokenize fractional id", path: "/detokenize", body: `{"tokens":[1,2.5]}`, status: 400, param: "tokens[1]", code: "invalid_type", msg: "2.5"},
		{name: "detokenize string id", path: "/detokenize", body: `{"tokens":["7"]}`, status: 400, param: "tokens[0]", code: "invalid_type"},
		{name: "detokenize negative id", path: "/detokenize", body: `{"tokens":[5,-1]}`, status: 400, param: "tokens[1]", code: "invalid_value", msg: "-1"},
		{name: "detokenize id past the vocabulary", path: "/v1/detokenize", body: `{"tokens":[104,257]}`, status: 400, param: "tokens[1]", code: "invalid_value", msg: "0 to 256"},
		{name: "detokenize id past int32", path: "/detokenize", body: `{"tokens":[4294967296]}`, vocab: -1, status: 400, param: "tokens[0]", code: "invalid_value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fb := newFake()
			fb.submitErr = tt.submitErr
			if tt.vocab < 0 {
				fb.info.VocabSize = 0 // unknown: only the sign and int32 range are checked
			}
			w := do(newHandler(t, testOptions(), fb), http.MethodPost, tt.path, tt.body)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			e := decodeError(t, w)
			if str(e.Param) != tt.param || str(e.Code) != tt.code || !strings.Contains(e.Message, tt.msg) {
				t.Fatalf("error %s, want param %s code %s message ~%q", w.Body, tt.param, tt.code, tt.msg)
			}
		})
	}
}

func TestDetokenize(t *testing.T) {
	tests := []struct {
		body string
		want string
	}{
		{`{"tokens":[256,104,105]}`, "<s>hi"},
		{`{"tokens":[]}`, ""},
		{`{"tokens":[ 104 ]}`, "h"},
	}
	for _, tt := range tests {
		w := do(newHandler(t, testOptions(), newFake()), http.MethodPost, "/detokenize", tt.body)
		var got DetokenizeResponse
		if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &got) != nil || got.Content != tt.want {
			t.Fatalf("%s: %d %s, want content %q", tt.body, w.Code, w.Body, tt.want)
		}
	}
}

// Both endpoints sit behind the API key, with and without /v1, and take
// only JSON POSTs.
func TestTokenizeRoutes(t *testing.T) {
	opts := testOptions()
	opts.APIKey = "sk-secret"
	h := newHandler(t, opts, newFake())
	for _, path := range []string{"/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize"} {
		body := `{"content":"x"}`
		if strings.HasSuffix(path, "detokenize") {
			body = `{"tokens":[1]}`
		}
		if w := do(h, http.MethodPost, path, body); w.Code != http.StatusUnauthorized {
			t.Errorf("%s without a key: %d", path, w.Code)
		}
		if w := do(h, http.MethodPost, path, body, withHeader("Authorization", "Bearer sk-secret")); w.Code != http.StatusOK {
			t.Errorf("%s with the key: %d %s", path, w.Code, w.Body)
		}
		if w := do(h, http.MethodPost, path, body, withHeader("Authorization", "Bearer sk-secret"), withHeader("Content-Type", "text/plain")); w.Code != http.StatusUnsupportedMediaType {
			t.Errorf("%s as text/plain: %d", path, w.Code)
		}
		if w := do(h, http.MethodGet, path, "", withHeader("Authorization", "Bearer sk-secret")); w.Code != http.StatusMethodNotAllowed {
			t.Errorf("GET %s: %d", path, w.Code)
		}
	}
}
