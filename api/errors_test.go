package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

var _ error = (*apiError)(nil)

// engineErrorCase is one engine error and the OpenAI error it must become.
type engineErrorCase struct {
	name       string
	err        error
	status     int
	typ, code  string
	param      string   // "<null>" for null
	msg        []string // substrings of the message
	notMsg     string   // must not appear in the message ("" : not checked)
	retryAfter bool
}

func engineErrorCases() []engineErrorCase {
	secret := errors.New("cgo pointer 0xdeadbeef in slot 3")
	return []engineErrorCase{
		{name: "prompt too long", err: &completion.PromptTooLongError{Tokens: 5000, Limit: 1024},
			status: 400, typ: typeInvalidRequest, code: "context_length_exceeded", param: "messages", msg: []string{"5000", "1024"}},
		{name: "prompt too long, wrapped", err: fmt.Errorf("engine: %w", &completion.PromptTooLongError{Tokens: 70, Limit: 64}),
			status: 400, typ: typeInvalidRequest, code: "context_length_exceeded", param: "messages", msg: []string{"70", "64"}},
		{name: "policy unsupported", err: &completion.PolicyUnsupportedError{Policy: elasticcache.H2O, Reason: "flash attention is on"},
			status: 400, typ: typeInvalidRequest, code: "unsupported_policy", param: "elastic_cache.policy", msg: []string{"h2o", "flash attention"}},
		{name: "image unreadable", err: &completion.ImageError{Index: 7, Err: errors.New("bad huffman code")},
			status: 400, typ: typeInvalidRequest, code: "invalid_image", param: "messages", msg: []string{"image 7", "bad huffman code"}},
		{name: "marker in text", err: &completion.MarkerInTextError{Message: 9, Part: 0, Marker: "<m>"},
			status: 400, typ: typeInvalidRequest, code: "invalid_value", param: "messages", msg: []string{`"<m>"`}},
		{name: "no vision", err: completion.ErrNoVision,
			status: 400, typ: typeInvalidRequest, code: "images_not_supported", param: "messages", msg: []string{"--mmproj"}},
		{name: "empty prompt", err: completion.ErrEmptyPrompt,
			status: 400, typ: typeInvalidRequest, code: "invalid_value", param: "messages", msg: []string{"empty"}},
		{name: "cache config", err: &elasticcache.ConfigError{Field: "budget", Msg: "2 is not in (0, 1]"},
			status: 400, typ: typeInvalidRequest, code: "invalid_value", param: "elastic_cache.budget", msg: []string{"2 is not in (0, 1]"}},
		{name: "internal", err: &completion.InternalError{RequestID: "req-1", Err: secret},
			status: 500, typ: typeServer, code: "internal_error", param: "<null>", msg: []string{"req-1"}, notMsg: "deadbeef"},
		// An internal failure stays the server's fault, whatever it wraps.
		{name: "internal wrapping a request error", err: &completion.InternalError{RequestID: "req-2", Err: &completion.ImageError{Err: secret}},
			status: 500, typ: typeServer, code: "internal_error", param: "<null>", notMsg: "deadbeef"},
		{name: "queue full", err: completion.ErrQueueFull,
			status: 429, typ: typeRateLimit, code: "queue_full", param: "<null>", retryAfter: true},
		{name: "shutting down", err: completion.ErrShuttingDown,
			status: 503, typ: typeServiceUnavailable, code: "shutting_down", param: "<null>", retryAfter: true},
		{name: "untyped", err: errors.New("boom"),
			status: 500, typ: typeServer, code: "internal_error", param: "<null>", msg: []string{"boom"}},
	}
}

func (tt engineErrorCase) check(t *testing.T, e ErrorDetail, raw string) {
	t.Helper()
	if e.Type != tt.typ || str(e.Code) != tt.code || str(e.Param) != tt.param {
		t.Fatalf("type %q code %q param %q, want %q %q %q: %s", e.Type, str(e.Code), str(e.Param), tt.typ, tt.code, tt.param, raw)
	}
	for _, m := range tt.msg {
		if !strings.Contains(e.Message, m) {
			t.Fatalf("message %q lacks %q", e.Message, m)
		}
	}
	if tt.notMsg != "" && strings.Contains(e.Message, tt.notMsg) {
		t.Fatalf("message %q leaks %q", e.Message, tt.notMsg)
	}
}

// Each engine error, returned by Submit or ending the request (with and
// without streaming), reaches the client as the same OpenAI error.
func TestEngineErrorMapping(t *testing.T) {
	for _, tt := range engineErrorCases() {
		t.Run(tt.name, func(t *testing.T) {
			for _, stream := range []bool{false, true} {
				fb := newFake()
				fb.submitErr = tt.err
				w := postChat(newHandler(t, testOptions(), fb), chatBody(t, map[string]any{"stream": stream}))
				if w.Code != tt.status {
					t.Fatalf("submit (stream %v): status %d, want %d: %s", stream, w.Code, tt.status, w.Body)
				}
				tt.check(t, decodeError(t, w), w.Body.String())
				if (w.Header().Get("Retry-After") != "") != tt.retryAfter {
					t.Fatalf("submit: Retry-After %q", w.Header().Get("Retry-After"))
				}
			}

			fb := newFake()
			fb.events = []completion.Event{{Text: "partial"}, {Done: true, Err: tt.err}}
			w := postChat(newHandler(t, testOptions(), fb), chatBody(t, map[string]any{}))
			if w.Code != tt.status {
				t.Fatalf("final event: status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			tt.check(t, decodeError(t, w), w.Body.String())

			w = postChat(newHandler(t, testOptions(), fb), chatBody(t, map[string]any{"stream": true}))
			events := sseEvents(t, w.Body.String())
			if w.Code != http.StatusOK || len(events) != 4 || events[3] != "[DONE]" {
				t.Fatalf("stream: %d, events %q", w.Code, events)
			}
			var body ErrorBody
			if err := json.Unmarshal([]byte(events[2]), &body); err != nil {
				t.Fatalf("error event %q: %v", events[2], err)
			}
			tt.check(t, body.Error, events[2])
		})
	}
}

// An error about one image or one text part names that part's field.
func TestEngineErrorNamesThePart(t *testing.T) {
	png := dataURLOf("image/png", pngBytes(t, 4, 4))
	msgs := []any{
		map[string]any{"role": "system", "content": "Be brief."},
		map[string]any{"role": "assistant", "content": nil},
		map[string]any{"role": "user", "content": []any{textPart("a"), imagePart(png), textPart("b"), imagePart(png)}},
	}
	tests := []struct {
		err   error
		param string
		code  string
	}{
		{&completion.ImageError{Index: 1, Err: errors.New("corrupt")}, "messages[2].content[3].image_url", "invalid_image"},
		{&completion.ImageError{Index: 0, Err: errors.New("corrupt")}, "messages[2].content[1].image_url", "invalid_image"},
		{&completion.ImageError{Index: 2, Err: errors.New("corrupt")}, "messages", "invalid_image"},
		{&completion.MarkerInTextError{Message: 2, Part: 2, Marker: "<m>"}, "messages[2].content[2].text", "invalid_value"},
		{&completion.MarkerInTextError{Message: 0, Part: 0, Marker: "<m>"}, "messages[0].content", "invalid_value"},
		{&completion.MarkerInTextError{Message: 1, Part: 0, Marker: "<m>"}, "messages", "invalid_value"},
	}
	for _, tt := range tests {
		for _, stream := range []bool{false, true} {
			fb := newFake()
			fb.events = []completion.Event{{Done: true, Err: tt.err}}
			w := postChat(newHandler(t, testOptions(), fb), chatBody(t, map[string]any{"messages": msgs, "stream": stream}))
			var e ErrorDetail
			if stream {
				var body ErrorBody
				_ = json.Unmarshal([]byte(sseEvents(t, w.Body.String())[1]), &body)
				e = body.Error
			} else {
				e = decodeError(t, w)
			}
			if str(e.Param) != tt.param || str(e.Code) != tt.code {
				t.Errorf("%v (stream %v): param %q code %q, want %q %q", tt.err, stream, str(e.Param), str(e.Code), tt.param, tt.code)
			}
		}
	}
}

// The API reads an image's header only; the engine decodes the body (here
// the fake, as llama.cpp would) and refuses a truncated one.
func TestTruncatedImageRefusedByEngine(t *testing.T) {
	p, j := pngBytes(t, 8, 8), jpegBytes(t, 16, 16)
	for _, tt := range []struct {
		name, mediaType string
		data            []byte
	}{
		{"truncated png", "image/png", p[:len(p)-30]},
		{"png header only", "image/png", p[:33]},
		{"truncated jpeg", "image/jpeg", j[:len(j)-20]},
	} {
		t.Run(tt.name, func(t *testing.T) {
			fb := newFake()
			w := postChat(newHandler(t, testOptions(), fb), chatBody(t, map[string]any{"messages": userParts(textPart("x"), imagePart(dataURLOf(tt.mediaType, tt.data)))}))
			e := decodeError(t, w)
			if w.Code != 400 || str(e.Param) != "messages[0].content[1].image_url" || str(e.Code) != "invalid_image" ||
				!strings.Contains(e.Message, "truncated or corrupt") {
				t.Fatalf("%d %s", w.Code, w.Body)
			}
			if len(fb.lastRequest(t).Images()) != 1 {
				t.Fatal("the image did not reach the engine")
			}
		})
	}
}

// Without a marker from the backend the API does not check text for one; the
// engine's MarkerInTextError then names the field as the API's check would.
func TestMarkerCheckedByEngineWhenUnknown(t *testing.T) {
	fb := newFake()
	fb.info.MediaMarker = ""
	fb.submitErr = &completion.MarkerInTextError{Message: 0, Part: 1, Marker: testMarker}
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"messages": userParts(textPart("see"), textPart("look "+testMarker))}))
	e := decodeError(t, w)
	if w.Code != 400 || str(e.Param) != "messages[0].content[1].text" || str(e.Code) != "invalid_value" || fb.submitted() != 1 {
		t.Fatalf("%d %s (submitted %d)", w.Code, w.Body, fb.submitted())
	}
}

// An engine failure's details go to the log, under the request's id, and
// not to the client.
func TestInternalErrorIsLogged(t *testing.T) {
	var logs bytes.Buffer
	fb := newFake()
	fb.events = []completion.Event{{Done: true, Err: &completion.InternalError{RequestID: "r-9", Err: errors.New("kv cell 17 lost")}}}
	w := postChat(New(testOptions(), fb, zerolog.New(&logs)), chatBody(t, map[string]any{}), withHeader("X-Request-Id", "r-9"))
	if e := decodeError(t, w); w.Code != 500 || str(e.Code) != "internal_error" || strings.Contains(e.Message, "cell 17") {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	if !strings.Contains(logs.String(), "kv cell 17 lost") || !strings.Contains(logs.String(), `"request_id":"r-9"`) {
		t.Fatalf("log: %s", logs.String())
	}
}

// TestShouldRetryHeader: the OpenAI SDKs retry 408, 409, 429 and 5xx by
// default and read x-should-retry first. A deterministic failure says
// "false" so it is not sent again in vain; a retryable one leaves the
// header out (the SDK's rule retries it), and 429/503 keep Retry-After.
func TestShouldRetryHeader(t *testing.T) {
	tests := []struct {
		status     int
		retryAfter int
		want       string // x-should-retry; "" : absent
	}{
		{http.StatusBadRequest, 0, "false"},
		{http.StatusUnauthorized, 0, "false"},
		{http.StatusForbidden, 0, "false"},
		{http.StatusNotFound, 0, "false"},
		{http.StatusMethodNotAllowed, 0, "false"},
		{http.StatusRequestEntityTooLarge, 0, "false"},
		{http.StatusUnsupportedMediaType, 0, "false"},
		{http.StatusUnprocessableEntity, 0, "false"},
		{http.StatusRequestTimeout, 0, ""},
		{http.StatusConflict, 0, ""},
		{http.StatusTooManyRequests, 1, ""},
		{http.StatusInternalServerError, 0, ""},
		{http.StatusBadGateway, 0, ""},
		{http.StatusServiceUnavailable, 5, ""},
		{http.StatusGatewayTimeout, 0, ""},
	}
	for _, tt := range tests {
		t.Run(http.StatusText(tt.status), func(t *testing.T) {
			w := newRecorder()
			writeError(w, &apiError{Status: tt.status, Message: "x", RetryAfter: tt.retryAfter})
			if w.Code != tt.status {
				t.Fatalf("status %d", w.Code)
			}
			got, present := w.Header()["X-Should-Retry"]
			switch {
			case tt.want == "" && present:
				t.Fatalf("x-should-retry %q on a retryable %d", got, tt.status)
			case tt.want != "" && (len(got) != 1 || got[0] != tt.want):
				t.Fatalf("x-should-retry %q, want %q", got, tt.want)
			}
			if ra := w.Header().Get("Retry-After"); (tt.retryAfter > 0) != (ra != "") {
				t.Fatalf("Retry-After %q with RetryAfter %d", ra, tt.retryAfter)
			}
		})
	}
}

// Through the handler: a validation error and a 404 say false, a full
// queue (429) and a shutdown (503) carry Retry-After and no false.
func TestShouldRetryThroughHandler(t *testing.T) {
	tests := []struct {
		name       string
		submitErr  error
		body       string
		path       string
		status     int
		want       string
		retryAfter bool
	}{
		{name: "bad request", body: `{"messages":[]}`, status: 400, want: "false"},
		{name: "unknown endpoint", path: "/v1/nope", body: `{}`, status: 404, want: "false"},
		{name: "queue full", submitErr: completion.ErrQueueFull, status: 429, retryAfter: true},
		{name: "shutting down", submitErr: completion.ErrShuttingDown, status: 503, retryAfter: true},
		{name: "internal", submitErr: errors.New("boom"), status: 500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fb := newFake()
			fb.submitErr = tt.submitErr
			path, body := tt.path, tt.body
			if path == "" {
				path = "/v1/chat/completions"
			}
			if body == "" {
				body = chatBody(t, map[string]any{})
			}
			w := do(newHandler(t, testOptions(), fb), http.MethodPost, path, body)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			if got := w.Header().Get("X-Should-Retry"); got != tt.want {
				t.Fatalf("x-should-retry %q, want %q", got, tt.want)
			}
			if (w.Header().Get("Retry-After") != "") != tt.retryAfter {
				t.Fatalf("Retry-After %q", w.Header().Get("Retry-After"))
			}
		})
	}
}
