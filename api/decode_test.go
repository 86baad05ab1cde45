package api

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

func TestBadRequests(t *testing.T) {
	png1 := pngBytes(t, 8, 8)
	user := func(content any) []any { return []any{map[string]any{"role": "user", "content": content}} }
	img := imagePart(dataURLOf("image/png", png1))
	tests := []struct {
		name   string
		body   string // raw body; when empty, fields is marshalled
		fields map[string]any
		status int
		param  string // "<null>" for null
		code   string // checked when non-empty
	}{
		{name: "empty body", body: " ", status: 400, param: "<null>", code: "invalid_json"},
		{name: "syntax error", body: `{"messages": [`, status: 400, param: "<null>", code: "invalid_json"},
		{name: "trailing garbage", body: `{"messages":[]} x`, status: 400, param: "<null>", code: "invalid_json"},
		{name: "array body", body: `[]`, status: 400, param: "<null>", code: "invalid_json"},
		{name: "invalid utf-8", body: "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}", status: 400, param: "<null>", code: "invalid_utf8"},
		{name: "no messages", body: `{"model":""}`, status: 400, param: "messages"},
		{name: "empty messages", fields: map[string]any{"messages": []any{}}, status: 400, param: "messages"},
		{name: "messages not array", fields: map[string]any{"messages": "hi"}, status: 400, param: "messages", code: "invalid_type"},
		{name: "role missing", fields: map[string]any{"messages": []any{map[string]any{"content": "x"}}}, status: 400, param: "messages[0].role"},
		{name: "role function", fields: map[string]any{"messages": []any{map[string]any{"role": "function", "content": "x"}}}, status: 400, param: "messages[0].role"},
		{name: "role unknown", fields: map[string]any{"messages": []any{map[string]any{"role": "robot", "content": "x"}}}, status: 400, param: "messages[0].role"},
		{name: "role not string", fields: map[string]any{"messages": []any{map[string]any{"role": 1, "content": "x"}}}, status: 400, param: "messages.role"},
		{name: "content number", fields: map[string]any{"messages": user(42)}, status: 400, param: "messages.content", code: "invalid_type"},
		{name: "content part not object", fields: map[string]any{"messages": user([]any{1})}, status: 400, param: "messages.content", code: "invalid_type"},
		{name: "user content null", fields: map[string]any{"messages": user(nil)}, status: 400, param: "messages[0].content"},
		{name: "part type missing", fields: map[string]any{"messages": user([]any{map[string]any{"text": "x"}})}, status: 400, param: "messages[0].content[0].type"},
		{name: "part type audio", fields: map[string]any{"messages": user([]any{map[string]any{"type": "input_audio"}})}, status: 400, param: "messages[0].content[0].type"},
		{name: "text part without text", fields: map[string]any{"messages": user([]any{map[string]any{"type": "text"}})}, status: 400, param: "messages[0].content[0].text"},
		{name: "text part text number", fields: map[string]any{"messages": user([]any{map[string]any{"type": "text", "text": 3}})}, status: 400, param: "messages.content.text"},
		{name: "image marker in text", fields: map[string]any{"messages": user("look " + testMarker)}, status: 400, param: "messages[0].content"},
		{name: "image marker in part", fields: map[string]any{"messages": user([]any{textPart(testMarker)})}, status: 400, param: "messages[0].content[0].text"},
		{name: "image in system message", fields: map[string]any{"messages": []any{map[string]any{"role": "system", "content": []any{img}}}}, status: 400, param: "messages[0].content[0]"},
		{name: "image in assistant message", fields: map[string]any{"messages": []any{map[string]any{"role": "assistant", "content": []any{img}}}}, status: 400, param: "messages[0].content[0]"},
		{name: "image_url missing", fields: map[string]any{"messages": user([]any{map[string]any{"type": "image_url"}})}, status: 400, param: "messages[0].content[0].image_url.url"},
		{name: "image_url number", fields: map[string]any{"messages": user([]any{map[string]any{"type": "image_url", "image_url": 5}})}, status: 400, param: "messages.content.image_url"},
		{name: "image detail bad", fields: map[string]any{"messages": user([]any{map[string]any{"type": "image_url", "image_url": map[string]any{"url": dataURLOf("image/png", png1), "detail": "ultra"}}})}, status: 400, param: "messages[0].content[0].image_url.detail"},
		{name: "image ftp url", fields: map[string]any{"messages": user([]any{imagePart("ftp://x/y.png")})}, status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url"},
		{name: "image http url not allowed", fields: map[string]any{"messages": user([]any{imagePart("https://example.com/a.png")})}, status: 400, param: "messages[0].content[0].image_url.url", code: "image_url_not_allowed"},
		{name: "data url not base64", fields: map[string]any{"messages": user([]any{imagePart("data:image/png,abc")})}, status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url"},
		{name: "data url bad base64", fields: map[string]any{"messages": user([]any{imagePart("data:image/png;base64,!!!!")})}, status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url"},
		{name: "data url no comma", fields: map[string]any{"messages": user([]any{imagePart("data:image/png;base64")})}, status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url"},
		{name: "data url bmp type", fields: map[string]any{"messages": user([]any{imagePart(dataURLOf("image/bmp", png1))})}, status: 400, param: "messages[0].content[0].image_url.url", code: "unsupported_image"},
		{name: "not an image", fields: map[string]any{"messages": user([]any{imagePart(dataURLOf("image/png", []byte("hello, I am text")))})}, status: 400, param: "messages[0].content[0].image_url", code: "invalid_image"},
		{name: "webp", fields: map[string]any{"messages": user([]any{imagePart(dataURLOf("image/webp", []byte("RIFF\x1a\x00\x00\x00WEBPVP8 ")))})}, status: 400, param: "messages[0].content[0].image_url", code: "invalid_image"},
		{name: "too many images", fields: map[string]any{"messages": user([]any{img, img, img, img, img})}, status: 400, param: "messages", code: "too_many_images"},
		{name: "image too many bytes", fields: map[string]any{"messages": user([]any{imagePart(dataURLOf("image/png", make([]byte, 2<<20)))})}, status: 413, param: "messages[0].content[0].image_url", code: "image_too_large"},
		{name: "image too many pixels", fields: map[string]any{"messages": user([]any{imagePart(dataURLOf("image/png", pngBytes(t, 2048, 1024)))})}, status: 400, param: "messages[0].content[0].image_url", code: "image_too_large"},
		{name: "max_tokens zero", fields: map[string]any{"max_tokens": 0}, status: 400, param: "max_tokens"},
		{name: "max_tokens string", fields: map[string]any{"max_tokens": "ten"}, status: 400, param: "max_tokens", code: "invalid_type"},
		{name: "max_tokens fraction", fields: map[string]any{"max_tokens": 1.5}, status: 400, param: "max_tokens", code: "invalid_type"},
		{name: "max_tokens huge", body: `{"messages":[{"role":"user","content":"x"}],"max_tokens":1e40}`, status: 400, param: "max_tokens"},
		{name: "max_completion_tokens negative", fields: map[string]any{"max_completion_tokens": -1}, status: 400, param: "max_completion_tokens"},
		{name: "temperature high", fields: map[string]any{"temperature": 2.5}, status: 400, param: "temperature"},
		{name: "temperature negative", fields: map[string]any{"temperature": -0.1}, status: 400, param: "temperature"},
		{name: "temperature string", fields: map[string]any{"temperature": "hot"}, status: 400, param: "temperature"},
		{name: "top_p zero", fields: map[string]any{"top_p": 0}, status: 400, param: "top_p"},
		{name: "top_p above one", fields: map[string]any{"top_p": 1.01}, status: 400, param: "top_p"},
		{name: "too many stops", fields: map[string]any{"stop": []string{"a", "b", "c", "d", "e"}}, status: 400, param: "stop"},
		{name: "empty stop", fields: map[string]any{"stop": []string{"a", ""}}, status: 400, param: "stop[1]"},
		{name: "empty stop string", fields: map[string]any{"stop": ""}, status: 400, param: "stop[0]"},
		{name: "stop numbers", fields: map[string]any{"stop": []any{1}}, status: 400, param: "stop", code: "invalid_type"},
		{name: "stop number", fields: map[string]any{"stop": 5}, status: 400, param: "stop", code: "invalid_type"},
		{name: "presence penalty", fields: map[string]any{"presence_penalty": 3}, status: 400, param: "presence_penalty"},
		{name: "frequency penalty", fields: map[string]any{"frequency_penalty": -2.5}, status: 400, param: "frequency_penalty"},
		{name: "n two", fields: map[string]any{"n": 2}, status: 400, param: "n"},
		{name: "n zero", fields: map[string]any{"n": 0}, status: 400, param: "n"},
		{name: "top_k negative", fields: map[string]any{"top_k": -1}, status: 400, param: "top_k"},
		{name: "min_p above one", fields: map[string]any{"min_p": 1.5}, status: 400, param: "min_p"},
		{name: "repeat_penalty zero", fields: map[string]any{"repeat_penalty": 0}, status: 400, param: "repeat_penalty"},
		{name: "stream not bool", fields: map[string]any{"stream": "yes"}, status: 400, param: "stream", code: "invalid_type"},
		{name: "seed string", fields: map[string]any{"seed": "abc"}, status: 400, param: "seed", code: "invalid_type"},
		{name: "top_logprobs above 20", fields: map[string]any{"logprobs": true, "top_logprobs": 21}, status: 400, param: "top_logprobs"},
		{name: "top_logprobs negative", fields: map[string]any{"logprobs": true, "top_logprobs": -1}, status: 400, param: "top_logprobs"},
		{name: "top_logprobs without logprobs", fields: map[string]any{"top_logprobs": 3}, status: 400, param: "top_logprobs"},
		{name: "tool without function", fields: map[string]any{"tools": []any{map[string]any{"type": "function"}}}, status: 400, param: "tools[0].function"},
		{name: "tool type", fields: map[string]any{"tools": []any{map[string]any{"type": "retrieval"}}}, status: 400, param: "tools[0].type"},
		{name: "tool name invalid", fields: map[string]any{"tools": []any{tool("get weather", nil)}}, status: 400, param: "tools[0].function.name"},
		{name: "tool names repeat", fields: map[string]any{"tools": []any{tool("f", nil), tool("f", nil)}}, status: 400, param: "tools[1].function.name"},
		{name: "tool parameters not object", fields: map[string]any{"tools": []any{tool("f", map[string]any{"type": "string"})}}, status: 400, param: "tools[0].function.parameters"},
		{name: "tool parameters unsupported", fields: map[string]any{"tools": []any{tool("f", map[string]any{"type": "object", "not": map[string]any{}})}},
			status: 400, param: "tools[0].function.parameters", code: "unsupported_schema"},
		{name: "tool_choice unknown function", fields: map[string]any{"tools": []any{tool("f", nil)},
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "g"}}}, status: 400, param: "tool_choice.function.name"},
		{name: "tool_choice unknown mode", fields: map[string]any{"tools": []any{tool("f", nil)}, "tool_choice": "always"}, status: 400, param: "tool_choice"},
		{name: "tool_choice without tools", fields: map[string]any{"tool_choice": "required"}, status: 400, param: "tool_choice"},
		{name: "tool_choice not string", fields: map[string]any{"tools": []any{tool("f", nil)}, "tool_choice": 3}, status: 400, param: "tool_choice", code: "invalid_type"},
		{name: "tools with response_format", fields: map[string]any{"tools": []any{tool("f", nil)}, "response_format": map[string]any{"type": "json_object"}},
			status: 400, param: "response_format"},
		{name: "role tool without id", fields: map[string]any{"messages": []any{map[string]any{"role": "tool", "content": "x"}}}, status: 400, param: "messages[0].tool_call_id"},
		{name: "tool_calls on user", fields: map[string]any{"messages": []any{map[string]any{"role": "user", "content": "x",
			"tool_calls": []any{map[string]any{"id": "c", "type": "function", "function": map[string]any{"name": "f", "arguments": "{}"}}}}}}, status: 400, param: "messages[0].tool_calls"},
		{name: "tool_calls arguments not JSON", fields: map[string]any{"messages": []any{map[string]any{"role": "assistant",
			"tool_calls": []any{map[string]any{"id": "c", "type": "function", "function": map[string]any{"name": "f", "arguments": "{city"}}}}}},
			status: 400, param: "messages[0].tool_calls[0].function.arguments"},
		{name: "response_format unknown", fields: map[string]any{"response_format": map[string]any{"type": "yaml"}}, status: 400, param: "response_format.type"},
		{name: "json_schema missing", fields: map[string]any{"response_format": map[string]any{"type": "json_schema"}}, status: 400, param: "response_format.json_schema"},
		{name: "json_schema name", fields: map[string]any{"response_format": jsonSchema("a b", map[string]any{"type": "object"})}, status: 400, param: "response_format.json_schema.name"},
		{name: "json_schema unsupported keyword", fields: map[string]any{"response_format": jsonSchema("s", map[string]any{"type": "object",
			"properties": map[string]any{"n": map[string]any{"type": "number", "multipleOf": 2}}})}, status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "json_schema remote ref", fields: map[string]any{"response_format": jsonSchema("s", map[string]any{"$ref": "https://example.com/s.json"})},
			status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "json_schema not object", fields: map[string]any{"response_format": jsonSchema("s", []any{1})}, status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "json_schema pattern unanchored", fields: map[string]any{"response_format": jsonSchema("s", map[string]any{"type": "string", "pattern": "[a-z]+"})},
			status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "json_schema number bound", fields: map[string]any{"response_format": jsonSchema("s", map[string]any{"type": "number", "minimum": 0})},
			status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "json_schema format email", fields: map[string]any{"response_format": jsonSchema("s", map[string]any{"type": "string", "format": "email"})},
			status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "cache policy", fields: map[string]any{"elastic_cache": map[string]any{"policy": "lru"}}, status: 400, param: "elastic_cache.policy"},
		{name: "cache budget zero", fields: map[string]any{"elastic_cache": map[string]any{"budget": 0}}, status: 400, param: "elastic_cache.budget"},
		{name: "cache budget high", fields: map[string]any{"elastic_cache": map[string]any{"budget": 1.5}}, status: 400, param: "elastic_cache.budget"},
		{name: "cache sink negative", fields: map[string]any{"elastic_cache": map[string]any{"sink": -1}}, status: 400, param: "elastic_cache.sink"},
		{name: "cache distance huge", fields: map[string]any{"elastic_cache": map[string]any{"distance": 1 << 30}}, status: 400, param: "elastic_cache.distance"},
		{name: "cache selection unknown", fields: map[string]any{"elastic_cache": map[string]any{"selection": "published"}}, status: 400, param: "elastic_cache.selection"},
		{name: "cache selection not string", fields: map[string]any{"elastic_cache": map[string]any{"selection": 1}}, status: 400, param: "elastic_cache.selection", code: "invalid_type"},
		{name: "cache not object", fields: map[string]any{"elastic_cache": "fast"}, status: 400, param: "elastic_cache", code: "invalid_type"},
		{name: "cache budget string", fields: map[string]any{"elastic_cache": map[string]any{"budget": "half"}}, status: 400, param: "elastic_cache.budget", code: "invalid_type"},
		{name: "cache explain string", fields: map[string]any{"elastic_cache": map[string]any{"explain": "yes"}}, status: 400, param: "elastic_cache.explain", code: "invalid_type"},
		{name: "cache explain number", fields: map[string]any{"elastic_cache": map[string]any{"explain": 1}}, status: 400, param: "elastic_cache.explain", code: "invalid_type"},
		{name: "unknown model", fields: map[string]any{"model": "gpt-4o"}, status: 404, param: "model", code: "model_not_found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fb := newFake()
			h := newHandler(t, testOptions(), fb)
			body := tt.body
			if body == "" {
				body = chatBody(t, tt.fields)
			}
			w := postChat(h, body)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			e := decodeError(t, w)
			if str(e.Param) != tt.param {
				t.Fatalf("param %q, want %q: %s", str(e.Param), tt.param, w.Body)
			}
			if tt.code != "" && str(e.Code) != tt.code {
				t.Fatalf("code %q, want %q: %s", str(e.Code), tt.code, w.Body)
			}
			wantType := map[int]string{400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}[tt.status]
			if e.Type != wantType {
				t.Fatalf("type %q, want %q", e.Type, wantType)
			}
			if fb.submitted() != 0 {
				t.Fatal("an invalid request reached the backend")
			}
		})
	}
}

func TestImagesNeedVision(t *testing.T) {
	fb := newFake()
	fb.info.Vision = false
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"messages": userParts(imagePart(dataURLOf("image/png", pngBytes(t, 4, 4))))}))
	e := decodeError(t, w)
	if w.Code != 400 || str(e.Code) != "images_not_supported" {
		t.Fatalf("got %d %s", w.Code, w.Body)
	}
	// Text-only requests still work.
	if w := postChat(h, chatBody(t, map[string]any{})); w.Code != 200 {
		t.Fatalf("text request: %d %s", w.Code, w.Body)
	}
}

func TestImagesDisabled(t *testing.T) {
	opts := testOptions()
	opts.MaxImages = 0
	h := newHandler(t, opts, newFake())
	w := postChat(h, chatBody(t, map[string]any{"messages": userParts(imagePart(dataURLOf("image/png", pngBytes(t, 4, 4))))}))
	if e := decodeError(t, w); w.Code != 400 || str(e.Code) != "too_many_images" {
		t.Fatalf("got %d %s", w.Code, w.Body)
	}
}

// The request that reaches the backend: markers, image bytes, defaults and overrides.
func TestEngineRequest(t *testing.T) {
	p1, j1 := pngBytes(t, 6, 5), jpegBytes(t, 9, 7)
	tests := []struct {
		name  string
		opts  func(*Options)
		body  map[string]any
		check func(t *testing.T, r *completion.Request)
	}{
		{
			name: "defaults",
			body: map[string]any{},
			check: func(t *testing.T, r *completion.Request) {
				if r.MaxTokens != 0 || r.Stop != nil || len(r.Images()) != 0 {
					t.Fatalf("unexpected %+v", r)
				}
				if r.Sampling != completion.DefaultSampling() {
					t.Fatalf("sampling %+v, want llama-server defaults", r.Sampling)
				}
				if r.Cache != elasticcache.DefaultSpec() {
					t.Fatalf("cache %+v", r.Cache.Config())
				}
				if r.ID == "" {
					t.Fatal("no request id")
				}
			},
		},
		{
			name: "server defaults applied",
			opts: func(o *Options) {
				o.DefaultMaxTokens = 77
				o.Cache = elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.5, Sink: 2, Distance: 3})
			},
			body: map[string]any{"elastic_cache": map[string]any{"budget": 0.25}},
			check: func(t *testing.T, r *completion.Request) {
				want := elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.25, Sink: 2, Distance: 3}
				if r.MaxTokens != 77 || r.Cache.Config() != want {
					t.Fatalf("max %d cache %+v", r.MaxTokens, r.Cache.Config())
				}
			},
		},
		{
			name: "sampling overrides",
			body: map[string]any{"temperature": 0, "top_p": 0.5, "top_k": 0, "min_p": 0, "repeat_penalty": 1.1,
				"presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 42, "max_tokens": 5, "max_completion_tokens": 9,
				"stop": "END", "n": 1, "model": "test-vlm", "stream": false, "user": "ignored", "store": false,
				"elastic_cache": map[string]any{"policy": "Local", "sink": 0, "distance": -3}},
			check: func(t *testing.T, r *completion.Request) {
				s := r.Sampling
				if s.Temperature != 0 || s.TopP != 0.5 || s.TopK != 0 || s.MinP != 0 || s.RepeatPenalty != float32(1.1) ||
					s.PresencePenalty != 0.5 || s.FrequencyPenalty != -0.5 || s.Seed != 42 || s.RepeatLastN != 64 {
					t.Fatalf("sampling %+v", s)
				}
				if r.MaxTokens != 9 || len(r.Stop) != 1 || r.Stop[0] != "END" {
					t.Fatalf("max %d stop %q", r.MaxTokens, r.Stop)
				}
				if r.Cache.Config() != (elasticcache.Config{Policy: elasticcache.Local, Budget: elasticcache.DefaultBudget, Sink: 0, Distance: -3, Selection: elasticcache.DefaultConfig().Selection}) {
					t.Fatalf("cache %+v", r.Cache.Config())
				}
			},
		},
		{
			name: "explain",
			body: map[string]any{"elastic_cache": map[string]any{"explain": true}},
			check: func(t *testing.T, r *completion.Request) {
				if !r.Explain || r.Cache != elasticcache.DefaultSpec() {
					t.Fatalf("explain %v cache %+v", r.Explain, r.Cache.Config())
				}
			},
		},
		{
			name: "explain off",
			body: map[string]any{"elastic_cache": map[string]any{"explain": false, "policy": "full"}},
			check: func(t *testing.T, r *completion.Request) {
				if r.Explain {
					t.Fatal("explain on")
				}
			},
		},
		{
			name: "selection reference",
			body: map[string]any{"elastic_cache": map[string]any{"selection": " Reference "}},
			check: func(t *testing.T, r *completion.Request) {
				want := elasticcache.DefaultConfig()
				want.Selection = elasticcache.ReferenceSelection
				if r.Cache.Config() != want || r.Cache.Selection() != elasticcache.ReferenceSelection || !r.Cache.CompactPositions() {
					t.Fatalf("cache %+v", r.Cache.Config())
				}
			},
		},
		{
			name: "selection paper overrides a reference server default",
			opts: func(o *Options) {
				o.Cache = elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.5, Sink: 1, Selection: elasticcache.ReferenceSelection})
			},
			body: map[string]any{"elastic_cache": map[string]any{"selection": "paper", "budget": 0.3}},
			check: func(t *testing.T, r *completion.Request) {
				want := elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.3, Sink: 1} // paper reads as ""
				if r.Cache.Config() != want || r.Cache.Selection() != elasticcache.PaperSelection {
					t.Fatalf("cache %+v", r.Cache.Config())
				}
			},
		},
		{
			name: "server reference selection kept when the request names none",
			opts: func(o *Options) {
				o.Cache = elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.Elastic, Budget: 0.5, Sink: 1, Selection: elasticcache.ReferenceSelection})
			},
			body: map[string]any{"elastic_cache": map[string]any{"sink": 2}},
			check: func(t *testing.T, r *completion.Request) {
				if r.Cache.Selection() != elasticcache.ReferenceSelection || r.Cache.Sink() != 2 {
					t.Fatalf("cache %+v", r.Cache.Config())
				}
			},
		},
		{
			name: "multi-turn with images",
			body: map[string]any{"model": "model.gguf", "messages": []any{
				map[string]any{"role": "developer", "content": []any{textPart("Be brief."), textPart("Really.")}},
				map[string]any{"role": "user", "content": []any{textPart("What is in"), imagePart(dataURLOf("image/png", p1)), textPart("and")}},
				map[string]any{"role": "assistant", "content": nil},
				map[string]any{"role": "assistant", "content": "A cat."},
				map[string]any{"role": "user", "content": []any{
					map[string]any{"type": "image_url", "image_url": dataURLOf("image/jpg", j1)},
					map[string]any{"type": "image_url", "image_url": map[string]any{"url": dataURLOf("image/jpeg", j1), "detail": "low"}}}},
			}},
			check: func(t *testing.T, r *completion.Request) {
				// Every part names the request field it came from.
				text := func(s, field string) completion.Part { return completion.Part{Text: s, Field: field} }
				img := func(b []byte, field string) completion.Part {
					return completion.Part{Kind: completion.PartImage, Image: b, Field: field}
				}
				want := []completion.Message{
					{Role: "system", Parts: []completion.Part{text("Be brief.", "messages[0].content[0].text"), text("Really.", "messages[0].content[1].text")}},
					{Role: "user", Parts: []completion.Part{text("What is in", "messages[1].content[0].text"),
						img(p1, "messages[1].content[1].image_url"), text("and", "messages[1].content[2].text")}},
					{Role: "assistant"},
					{Role: "assistant", Parts: []completion.Part{text("A cat.", "messages[3].content")}},
					{Role: "user", Parts: []completion.Part{img(j1, "messages[4].content[0].image_url"), img(j1, "messages[4].content[1].image_url")}},
				}
				if !reflect.DeepEqual(r.Messages, want) {
					t.Fatalf("messages\n got %+v\nwant %+v", r.Messages, want)
				}
				if imgs := r.Images(); len(imgs) != 3 || !bytes.Equal(imgs[0], p1) || !bytes.Equal(imgs[1], j1) || !bytes.Equal(imgs[2], j1) {
					t.Fatalf("images %d", len(imgs))
				}
			},
		},
		{
			name: "seed -1 means random",
			body: map[string]any{"seed": -1},
			check: func(t *testing.T, r *completion.Request) {
				if r.Sampling.Seed != 0xFFFFFFFF {
					t.Fatalf("seed %d", r.Sampling.Seed)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := testOptions()
			if tt.opts != nil {
				tt.opts(&opts)
			}
			fb := newFake()
			h := newHandler(t, opts, fb)
			w := postChat(h, chatBody(t, tt.body))
			if w.Code != 200 {
				t.Fatalf("status %d: %s", w.Code, w.Body)
			}
			tt.check(t, fb.lastRequest(t))
		})
	}
}

func TestFoldSeed(t *testing.T) {
	for _, tt := range []struct {
		in   int64
		want uint32
	}{{0, 0}, {42, 42}, {-1, 0xFFFFFFFF}, {0xFFFFFFFE, 0xFFFFFFFE}, {0xFFFFFFFF, 0xFFFFFFFE}, {1 << 32, 1}} {
		if got := foldSeed(tt.in); got != tt.want {
			t.Errorf("foldSeed(%d) = %d, want %d", tt.in, got, tt.want)
		}
	}
	if foldSeed(-2) == 0xFFFFFFFF {
		t.Error("-2 must not mean random")
	}
}

func TestDecodeContentVariants(t *testing.T) {
	tests := []struct {
		json string
		text *string
		n    int // parts; -1: Parts nil
	}{
		{`"hi"`, ptr("hi"), -1},
		{`null`, nil, -1},
		{`[]`, nil, 0},
		{`[{"type":"text","text":"a"}]`, nil, 1},
	}
	for _, tt := range tests {
		var c MessageContent
		if err := json.Unmarshal([]byte(tt.json), &c); err != nil {
			t.Fatalf("%s: %v", tt.json, err)
		}
		if (tt.text == nil) != (c.Text == nil) || (tt.text != nil && *tt.text != *c.Text) {
			t.Fatalf("%s: text %v", tt.json, c.Text)
		}
		if (tt.n < 0) != (c.Parts == nil) || (tt.n >= 0 && len(c.Parts) != tt.n) {
			t.Fatalf("%s: parts %v", tt.json, c.Parts)
		}
	}
	var s StopList
	for in, want := range map[string]string{`"x"`: "x", `["a","b"]`: "a,b", `null`: "", `[]`: ""} {
		if err := json.Unmarshal([]byte(in), &s); err != nil || strings.Join(s, ",") != want {
			t.Fatalf("stop %s: %v %q", in, err, s)
		}
	}
}

func ptr[T any](v T) *T { return &v }

func tool(name string, params any) map[string]any {
	f := map[string]any{"name": name}
	if params != nil {
		f["parameters"] = params
	}
	return map[string]any{"type": "function", "function": f}
}

func jsonSchema(name string, schema any) map[string]any {
	return map[string]any{"type": "json_schema", "json_schema": map[string]any{"name": name, "schema": schema, "strict": true}}
}
