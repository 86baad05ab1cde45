package integration

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"hash/crc32"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// null marks an error param that must be JSON null.
const null = "<null>"

// badCase is one entry of the bad-input catalogue.
type badCase struct {
	name    string
	server  string // "main" (default) or "restricted"
	method  string // default POST
	path    string // default /v1/chat/completions
	body    []byte
	chunked bool              // send the body without Content-Length
	headers map[string]string // "" removes a header
	status  int
	typ     string // default: invalid_request_error (or the type for status)
	param   string // exact error.param; null for JSON null
	code    string
	msg     string // regexp the message must match (optional)
}

// chatWith is a valid small request with fields replaced (nil deletes).
func chatWith(tb testing.TB, fields map[string]any) []byte {
	tb.Helper()
	m := map[string]any{
		"messages":   []any{map[string]any{"role": "user", "content": "hi"}},
		"max_tokens": 2,
	}
	for k, v := range fields {
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
	}
	return mustJSON(tb, m)
}

// userParts is a messages array with one user message made of parts.
func userParts(parts ...any) []any {
	return []any{map[string]any{"role": "user", "content": parts}}
}

func textPart(s string) map[string]any { return map[string]any{"type": "text", "text": s} }

func imagePart(url string) map[string]any {
	return map[string]any{"type": "image_url", "image_url": map[string]any{"url": url}}
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// pngBomb is a tiny PNG whose header claims w x h pixels (valid CRC), the
// shape of a decompression bomb: refused from the header alone.
func pngBomb(tb testing.TB, w, h uint32) []byte {
	tb.Helper()
	p := append([]byte(nil), redCircle(tb)...)
	// 8-byte signature, then the IHDR chunk: length(4) "IHDR"(4) width(4) height(4) ...
	if string(p[12:16]) != "IHDR" {
		tb.Fatalf("unexpected PNG layout")
	}
	binary.BigEndian.PutUint32(p[16:20], w)
	binary.BigEndian.PutUint32(p[20:24], h)
	binary.BigEndian.PutUint32(p[29:33], crc32.ChecksumIEEE(p[12:29]))
	return p
}

// bmp1x1 is a BMP header (a real image format the server does not take).
var bmp1x1 = []byte("BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00")

func catalogue(t *testing.T) []badCase {
	png := redCircle(t)
	_, webpPic, _ := examplePictures(t)
	good := "data:image/png;base64," + b64(png)
	tooManyImages := []any{textPart("count them")}
	for range 5 {
		tooManyImages = append(tooManyImages, imagePart(good))
	}
	overBytes := make([]byte, 70000) // above --max-image-bytes 65536
	copy(overBytes, png)
	bigText := strings.Repeat("a", 1100<<10)     // above --max-body-bytes 1 MiB
	longPrompt := strings.Repeat("circle ", 700) // ~4900 tokens: more than the 4096 cells
	auth := map[string]string{"Authorization": "Bearer " + testAPIKey}

	return []badCase{
		// --- the body as a whole ---
		{name: "malformed JSON", body: []byte(`{"messages": [{"role": "user", "content": "hi"}`),
			status: 400, param: null, code: "invalid_json", msg: "not valid JSON"},
		{name: "trailing garbage", body: []byte(`{"messages":[{"role":"user","content":"hi"}]} xyz`),
			status: 400, param: null, code: "invalid_json"},
		{name: "body is an array", body: []byte(`[1,2,3]`), status: 400, param: null, code: "invalid_json", msg: "JSON object"},
		{name: "empty body", body: []byte(``), status: 400, param: null, code: "invalid_json"},
		{name: "invalid UTF-8", body: []byte("{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\xfd\"}],\"max_tokens\":2}"),
			status: 400, param: null, code: "invalid_utf8"},
		{name: "body over the limit", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "user", "content": bigText}}}),
			status: 413, param: null, code: "request_too_large"},
		{name: "body over the limit, chunked", chunked: true,
			body:   chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "user", "content": bigText}}}),
			status: 413, param: null, code: "request_too_large"},
		{name: "wrong content type", body: chatWith(t, nil), headers: map[string]string{"Content-Type": "text/plain"},
			status: 415, param: null, code: "unsupported_media_type"},
		{name: "no content type", body: chatWith(t, nil), headers: map[string]string{"Content-Type": ""},
			status: 415, param: null, code: "unsupported_media_type"},
		{name: "wrong charset", body: chatWith(t, nil), headers: map[string]string{"Content-Type": "application/json; charset=latin1"},
			status: 415, param: null, code: "unsupported_media_type"},
		{name: "wrong method", method: http.MethodGet, status: 405, param: null, code: "method_not_allowed"},
		{name: "wrong method on models", method: http.MethodDelete, path: "/v1/models", status: 405, param: null, code: "method_not_allowed"},
		{name: "unknown endpoint", method: http.MethodGet, path: "/v1/completions/nope", status: 404, typ: "not_found_error", param: null, code: "not_found"},

		// --- wrong JSON types ---
		{name: "messages is a string", body: []byte(`{"messages":"hi"}`), status: 400, param: "messages", code: "invalid_type"},
		{name: "max_tokens is a string", body: chatWith(t, map[string]any{"max_tokens": "ten"}), status: 400, param: "max_tokens", code: "invalid_type"},
		{name: "temperature is a string", body: chatWith(t, map[string]any{"temperature": "hot"}), status: 400, param: "temperature", code: "invalid_type"},
		{name: "stream is a string", body: chatWith(t, map[string]any{"stream": "yes"}), status: 400, param: "stream", code: "invalid_type"},
		{name: "content is a number", body: []byte(`{"messages":[{"role":"user","content":5}]}`), status: 400, param: "messages.content", code: "invalid_type"},
		{name: "stop is a number", body: chatWith(t, map[string]any{"stop": 7}), status: 400, param: "stop", code: "invalid_type"},
		{name: "max_tokens is fractional", body: chatWith(t, map[string]any{"max_tokens": 1.5}), status: 400, param: "max_tokens", code: "invalid_type"},

		// --- messages ---
		{name: "missing messages", body: chatWith(t, map[string]any{"messages": nil}), status: 400, param: "messages", code: "invalid_value"},
		{name: "empty messages", body: chatWith(t, map[string]any{"messages": []any{}}), status: 400, param: "messages", code: "invalid_value"},
		{name: "unknown role", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "wizard", "content": "hi"}}}),
			status: 400, param: "messages[0].role", code: "invalid_value", msg: "wizard"},
		{name: "missing role", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"content": "hi"}}}),
			status: 400, param: "messages[0].role", code: "invalid_value"},
		{name: "tool message without tool_call_id", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "tool", "content": "hi"}}}),
			status: 400, param: "messages[0].tool_call_id", code: "invalid_value"},
		{name: "function role", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "function", "content": "hi"}}}),
			status: 400, param: "messages[0].role", code: "invalid_value", msg: "deprecated"},
		{name: "user content missing", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "user"}}}),
			status: 400, param: "messages[0].content", code: "invalid_value"},
		{name: "unknown content part type", body: chatWith(t, map[string]any{"messages": userParts(map[string]any{"type": "input_audio", "input_audio": map[string]any{}})}),
			status: 400, param: "messages[0].content[0].type", code: "invalid_value", msg: "input_audio"},
		{name: "text part without text", body: chatWith(t, map[string]any{"messages": userParts(map[string]any{"type": "text"})}),
			status: 400, param: "messages[0].content[0].text", code: "invalid_value"},
		{name: "image marker in text", body: chatWith(t, map[string]any{"messages": userParts(textPart("look <__media__> here"))}),
			status: 400, param: "messages[0].content[0].text", code: "invalid_value"},
		{name: "prompt longer than the context", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "user", "content": longPrompt}}}),
			status: 400, param: "messages", code: "context_length_exceeded", msg: `the prompt is \d{4,} tokens .*at most \d+`},

		// --- images ---
		{name: "image_url without url", body: chatWith(t, map[string]any{"messages": userParts(map[string]any{"type": "image_url", "image_url": map[string]any{}})}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_value"},
		{name: "image_url missing", body: chatWith(t, map[string]any{"messages": userParts(map[string]any{"type": "image_url"})}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_value"},
		{name: "data URL without base64", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png," + b64(png)))}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url", msg: "base64"},
		{name: "data URL without comma", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64"))}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url"},
		{name: "bad base64", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64,iVBOR%%%%not-base64!!"))}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url", msg: "base64"},
		{name: "non-image mime", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:text/plain;base64," + b64([]byte("hello"))))}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "unsupported_image", msg: "text/plain"},
		{name: "non-image bytes", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64," + b64([]byte("this is plainly not a picture"))))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image"},
		{name: "empty image", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64,"))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image"},
		{name: "truncated PNG", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64," + b64(png[:len(png)/2])))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image", msg: "truncated|corrupt"},
		{name: "BMP image", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/bmp;base64," + b64(bmp1x1)))}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "unsupported_image", msg: "bmp"},
		{name: "BMP bytes declared PNG", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64," + b64(bmp1x1)))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image", msg: "image/bmp images are not supported"},
		{name: "WebP over the pixel limit (5000x5000 header)", body: chatWith(t, map[string]any{"messages": userParts(textPart("x"), imagePart("data:image/webp;base64,"+b64(webpBomb(5000, 5000))))}),
			status: 400, param: "messages[0].content[1].image_url", code: "image_too_large", msg: "5000x5000"},
		{name: "GIF over the pixel limit (5000x5000 screen)", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/gif;base64," + b64(gifBomb(5000, 5000))))}),
			status: 400, param: "messages[0].content[0].image_url", code: "image_too_large", msg: "5000x5000"},
		{name: "corrupt WebP", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/webp;base64," + b64(webpPic[:len(webpPic)-40])))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image", msg: "webp image is truncated or corrupt"},
		{name: "GIF without a frame", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/gif;base64," + b64(gifBomb(4, 4))))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image", msg: "gif image is truncated or corrupt"},
		{name: "image over the byte limit", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/png;base64," + b64(overBytes)))}),
			status: 413, param: "messages[0].content[0].image_url", code: "image_too_large"},
		{name: "decompression bomb (50000x50000 header)", body: chatWith(t, map[string]any{"messages": userParts(textPart("x"), imagePart("data:image/png;base64,"+b64(pngBomb(t, 50000, 50000))))}),
			status: 400, param: "messages[0].content[1].image_url", code: "image_too_large", msg: "50000x50000"},
		{name: "more images than allowed", body: chatWith(t, map[string]any{"messages": userParts(tooManyImages...)}),
			status: 400, param: "messages", code: "too_many_images", msg: `at most 4\b`},
		{name: "image in an assistant message", body: chatWith(t, map[string]any{"messages": []any{
			map[string]any{"role": "user", "content": "hi"},
			map[string]any{"role": "assistant", "content": []any{imagePart(good)}},
			map[string]any{"role": "user", "content": "and?"},
		}}), status: 400, param: "messages[1].content[0]", code: "invalid_value"},
		{name: "image URL while URLs are disabled", body: chatWith(t, map[string]any{"messages": userParts(textPart("x"), imagePart("https://example.com/cat.png"))}),
			status: 400, param: "messages[0].content[1].image_url.url", code: "image_url_not_allowed", msg: "--allow-image-urls"},
		{name: "image URL with another scheme", body: chatWith(t, map[string]any{"messages": userParts(imagePart("file:///etc/passwd"))}),
			status: 400, param: "messages[0].content[0].image_url.url", code: "invalid_image_url"},
		{name: "image detail unknown", body: chatWith(t, map[string]any{"messages": userParts(map[string]any{"type": "image_url", "image_url": map[string]any{"url": good, "detail": "ultra"}})}),
			status: 400, param: "messages[0].content[0].image_url.detail", code: "invalid_value"},
		{name: "image to a text-only server", server: "restricted", headers: auth,
			body:   chatWith(t, map[string]any{"messages": userParts(textPart("x"), imagePart(good))}),
			status: 400, param: "messages", code: "images_not_supported", msg: "--mmproj"},

		// --- sampling and limits ---
		{name: "max_tokens 0", body: chatWith(t, map[string]any{"max_tokens": 0}), status: 400, param: "max_tokens", code: "invalid_value"},
		{name: "max_tokens negative", body: chatWith(t, map[string]any{"max_tokens": -5}), status: 400, param: "max_tokens", code: "invalid_value"},
		{name: "max_completion_tokens 0", body: chatWith(t, map[string]any{"max_completion_tokens": 0}), status: 400, param: "max_completion_tokens", code: "invalid_value"},
		{name: "temperature negative", body: chatWith(t, map[string]any{"temperature": -0.1}), status: 400, param: "temperature", code: "invalid_value"},
		{name: "temperature above 2", body: chatWith(t, map[string]any{"temperature": 2.5}), status: 400, param: "temperature", code: "invalid_value"},
		{name: "top_p 0", body: chatWith(t, map[string]any{"top_p": 0}), status: 400, param: "top_p", code: "invalid_value"},
		{name: "top_p above 1", body: chatWith(t, map[string]any{"top_p": 1.01}), status: 400, param: "top_p", code: "invalid_value"},
		{name: "presence_penalty out of range", body: chatWith(t, map[string]any{"presence_penalty": 3}), status: 400, param: "presence_penalty", code: "invalid_value"},
		{name: "top_k negative", body: chatWith(t, map[string]any{"top_k": -1}), status: 400, param: "top_k", code: "invalid_value"},
		{name: "n 2", body: chatWith(t, map[string]any{"n": 2}), status: 400, param: "n", code: "invalid_value"},
		{name: "n 0", body: chatWith(t, map[string]any{"n": 0}), status: 400, param: "n", code: "invalid_value"},
		{name: "five stop strings", body: chatWith(t, map[string]any{"stop": []string{"a", "b", "c", "d", "e"}}), status: 400, param: "stop", code: "invalid_value"},
		{name: "empty stop string", body: chatWith(t, map[string]any{"stop": []string{"ok", ""}}), status: 400, param: "stop[1]", code: "invalid_value"},
		{name: "top_logprobs above 20", body: chatWith(t, map[string]any{"logprobs": true, "top_logprobs": 21}), status: 400, param: "top_logprobs", code: "invalid_value"},
		{name: "top_logprobs without logprobs", body: chatWith(t, map[string]any{"top_logprobs": 2}), status: 400, param: "top_logprobs", code: "invalid_value"},
		{name: "tool_choice names an unknown tool", body: chatWith(t, map[string]any{"tools": []any{map[string]any{"type": "function", "function": map[string]any{"name": "f"}}},
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "g"}}}),
			status: 400, param: "tool_choice.function.name", code: "invalid_value", msg: `"g"`},
		{name: "tool_choice required without tools", body: chatWith(t, map[string]any{"tool_choice": "required"}), status: 400, param: "tool_choice", code: "invalid_value"},
		{name: "tool without name", body: chatWith(t, map[string]any{"tools": []any{map[string]any{"type": "function", "function": map[string]any{}}}}),
			status: 400, param: "tools[0].function.name", code: "invalid_value"},
		{name: "tool parameters with an unsupported keyword", body: chatWith(t, map[string]any{"tools": []any{map[string]any{"type": "function",
			"function": map[string]any{"name": "f", "parameters": map[string]any{"type": "object", "patternProperties": map[string]any{}}}}}}),
			status: 400, param: "tools[0].function.parameters", code: "unsupported_schema", msg: "patternProperties"},
		{name: "tool_calls arguments not JSON", body: chatWith(t, map[string]any{"messages": []any{map[string]any{"role": "assistant",
			"tool_calls": []any{map[string]any{"id": "c1", "type": "function", "function": map[string]any{"name": "f", "arguments": "{oops"}}}}}}),
			status: 400, param: "messages[0].tool_calls[0].function.arguments", code: "invalid_value"},
		{name: "response_format unknown type", body: chatWith(t, map[string]any{"response_format": map[string]any{"type": "xml"}}),
			status: 400, param: "response_format.type", code: "invalid_value"},
		{name: "json_schema without schema object", body: chatWith(t, map[string]any{"response_format": map[string]any{"type": "json_schema"}}),
			status: 400, param: "response_format.json_schema", code: "invalid_value"},
		{name: "json_schema with an unsupported keyword", body: chatWith(t, map[string]any{"response_format": map[string]any{"type": "json_schema",
			"json_schema": map[string]any{"name": "s", "schema": map[string]any{"type": "array", "uniqueItems": true}}}}),
			status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema", msg: "uniqueItems"},
		// Passes the keyword check; llama.cpp's converter refuses the pattern.
		{name: "json_schema pattern the converter refuses", body: chatWith(t, map[string]any{"response_format": map[string]any{"type": "json_schema",
			"json_schema": map[string]any{"name": "s", "schema": map[string]any{"type": "string", "pattern": "^[a-z$"}}}}),
			status: 400, param: "response_format.json_schema.schema", code: "unsupported_schema"},
		{name: "response_format with tools", body: chatWith(t, map[string]any{"tools": []any{map[string]any{"type": "function", "function": map[string]any{"name": "f"}}}, "response_format": map[string]any{"type": "json_object"}}),
			status: 400, param: "response_format", code: "invalid_value"},
		{name: "unknown model", body: chatWith(t, map[string]any{"model": "gpt-4o"}),
			status: 404, typ: "not_found_error", param: "model", code: "model_not_found", msg: "gpt-4o"},

		// --- elastic_cache extension ---
		{name: "unknown policy", body: chatWith(t, map[string]any{"elastic_cache": map[string]any{"policy": "lru"}}),
			status: 400, param: "elastic_cache.policy", code: "invalid_value", msg: "lru"},
		{name: "budget 0", body: chatWith(t, map[string]any{"elastic_cache": map[string]any{"budget": 0}}),
			status: 400, param: "elastic_cache.budget", code: "invalid_value"},
		{name: "budget above 1", body: chatWith(t, map[string]any{"elastic_cache": map[string]any{"budget": 1.5}}),
			status: 400, param: "elastic_cache.budget", code: "invalid_value"},
		{name: "budget negative", body: chatWith(t, map[string]any{"elastic_cache": map[string]any{"budget": -0.5}}),
			status: 400, param: "elastic_cache.budget", code: "invalid_value"},
		{name: "elastic_cache wrong type", body: chatWith(t, map[string]any{"elastic_cache": "elastic"}),
			status: 400, param: "elastic_cache", code: "invalid_type"},

		// --- /tokenize and /detokenize ---
		{name: "detokenize an id past the vocabulary", path: "/v1/detokenize", body: []byte(`{"tokens":[1,2147483647]}`),
			status: 400, param: "tokens[1]", code: "invalid_value", msg: "not a token id of this model"},
		{name: "detokenize a negative id", path: "/detokenize", body: []byte(`{"tokens":[-3]}`), status: 400, param: "tokens[0]", code: "invalid_value"},
		{name: "detokenize a fractional id", path: "/detokenize", body: []byte(`{"tokens":[1.5]}`), status: 400, param: "tokens[0]", code: "invalid_type"},
		{name: "tokenize with neither content nor messages", path: "/tokenize", body: []byte(`{"add_special":true}`), status: 400, param: "content", code: "invalid_value"},
		{name: "tokenize with content and messages", path: "/v1/tokenize", body: []byte(`{"content":"x","messages":[{"role":"user","content":"x"}]}`),
			status: 400, param: "messages", code: "invalid_value"},
		{name: "tokenize a chat with a corrupt WebP", path: "/tokenize", body: chatWith(t, map[string]any{"messages": userParts(imagePart("data:image/webp;base64," + b64(webpPic[:len(webpPic)-40])))}),
			status: 400, param: "messages[0].content[0].image_url", code: "invalid_image"},
		{name: "tokenize without API key", server: "restricted", path: "/tokenize", body: []byte(`{"content":"x"}`),
			status: 401, typ: "authentication_error", param: null, code: "invalid_api_key"},

		// --- auth (server started with --api-key) ---
		{name: "missing API key", server: "restricted", body: chatWith(t, nil),
			status: 401, typ: "authentication_error", param: null, code: "invalid_api_key"},
		{name: "wrong API key", server: "restricted", body: chatWith(t, nil), headers: map[string]string{"Authorization": "Bearer sk-nope"},
			status: 401, typ: "authentication_error", param: null, code: "invalid_api_key"},
		{name: "API key with the wrong scheme", server: "restricted", body: chatWith(t, nil), headers: map[string]string{"Authorization": "Basic " + testAPIKey},
			status: 401, typ: "authentication_error", param: null, code: "invalid_api_key"},
		{name: "models without API key", server: "restricted", method: http.MethodGet, path: "/v1/models",
			status: 401, typ: "authentication_error", param: null, code: "invalid_api_key"},
	}
}

// TestBadInputCatalogue sends every bad request and checks the status and
// the OpenAI error; after each case, and after the whole table, a good
// request must still be served.
func TestBadInputCatalogue(t *testing.T) {
	servers := map[string]*server{
		"main":       sharedServer(t, "main", mainSpec),
		"restricted": sharedServer(t, "restricted", restrictedSpec),
	}
	cases := catalogue(t)
	if len(cases) < 30 {
		t.Fatalf("the catalogue must hold at least 30 cases, has %d", len(cases))
	}
	t.Logf("bad-input catalogue: %d cases", len(cases))
	goodReq := func(t *testing.T, name string) {
		t.Helper()
		s := servers[name]
		h := map[string]string{}
		if name == "restricted" {
			h["Authorization"] = "Bearer " + testAPIKey
		}
		r := request(t, http.MethodPost, s.URL+"/v1/chat/completions", chatWith(t, map[string]any{"max_tokens": 1}), h)
		if r.Status != http.StatusOK || !bytes.Contains(r.Body, []byte(`"choices"`)) {
			t.Fatalf("a good request after the bad one failed: %d %s", r.Status, r.Body)
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := tc.server
			if name == "" {
				name = "main"
			}
			s := servers[name]
			method, path := tc.method, tc.path
			if method == "" {
				method = http.MethodPost
			}
			if path == "" {
				path = "/v1/chat/completions"
			}
			r := sendCase(t, s, method, path, tc)
			if r.Status != tc.status {
				t.Errorf("status %d, want %d; body %s", r.Status, tc.status, clip(r.Body))
			}
			if ct := r.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			e := parseError(t, r.Body)
			wantType := tc.typ
			if wantType == "" {
				wantType = "invalid_request_error"
			}
			if e.Type != wantType {
				t.Errorf("type %q, want %q (%s)", e.Type, wantType, e.Message)
			}
			if e.param() != tc.param {
				t.Errorf("param %q, want %q (%s)", e.param(), tc.param, e.Message)
			}
			if e.code() != tc.code {
				t.Errorf("code %q, want %q (%s)", e.code(), tc.code, e.Message)
			}
			if tc.msg != "" && !regexp.MustCompile("(?i)"+tc.msg).MatchString(e.Message) {
				t.Errorf("message %q does not match %q", e.Message, tc.msg)
			}
			if tc.status == http.StatusUnauthorized && r.Header.Get("WWW-Authenticate") == "" {
				t.Errorf("401 without WWW-Authenticate")
			}
			// Every case here is the request's own fault: the OpenAI SDKs must
			// not send it again.
			if got := r.Header.Get("X-Should-Retry"); got != "false" {
				t.Errorf("x-should-retry %q on a %d, want false", got, r.Status)
			}
			goodReq(t, name)
		})
	}
	for name, s := range servers {
		goodReq(t, name)
		h := map[string]string{}
		if name == "restricted" {
			h["Authorization"] = "Bearer " + testAPIKey
		}
		waitIdle(t, s, h, 5*time.Second)
	}
	// Image bytes never reach the log (the data URLs above were logged nowhere).
	if strings.Contains(servers["main"].log.String(), b64(redCircle(t))[:40]) {
		t.Errorf("the server log contains image data")
	}
}

func sendCase(t *testing.T, s *server, method, path string, tc badCase) response {
	t.Helper()
	var rd io.Reader
	if tc.body != nil {
		rd = bytes.NewReader(tc.body)
		if tc.chunked {
			rd = io.MultiReader(rd) // hides the length: Transfer-Encoding chunked
		}
	}
	return send(t, method, s.URL+path, rd, tc.headers)
}

func clip(b []byte) string {
	if len(b) > 400 {
		return string(b[:400]) + "..."
	}
	return string(b)
}
