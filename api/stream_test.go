package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// sseEvents splits an SSE body into its data payloads, checking framing.
func sseEvents(t *testing.T, body string) []string {
	t.Helper()
	if !strings.HasSuffix(body, "\n\n") {
		t.Fatalf("stream does not end with a blank line: %q", body)
	}
	var out []string
	for _, block := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		if !strings.HasPrefix(block, "data: ") || strings.Contains(block, "\n") {
			t.Fatalf("bad SSE event %q", block)
		}
		out = append(out, strings.TrimPrefix(block, "data: "))
	}
	return out
}

func TestStreamFormat(t *testing.T) {
	for _, includeUsage := range []bool{false, true} {
		name := map[bool]string{false: "without usage", true: "with usage"}[includeUsage]
		t.Run(name, func(t *testing.T) {
			fb := newFake()
			fb.events = okEvents("Hel", "lo", "", " there")
			h := newHandler(t, testOptions(), fb)
			body := map[string]any{"stream": true}
			if includeUsage {
				body["stream_options"] = map[string]any{"include_usage": true}
			}
			w := postChat(h, chatBody(t, body))
			if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/event-stream") {
				t.Fatalf("status %d type %q", w.Code, w.Header().Get("Content-Type"))
			}
			if !w.Flushed {
				t.Fatal("stream was never flushed")
			}
			events := sseEvents(t, w.Body.String())
			if events[len(events)-1] != "[DONE]" {
				t.Fatalf("last event %q", events[len(events)-1])
			}
			var chunks []map[string]any
			for _, e := range events[:len(events)-1] {
				var m map[string]any
				if err := json.Unmarshal([]byte(e), &m); err != nil {
					t.Fatalf("chunk %q: %v", e, err)
				}
				chunks = append(chunks, m)
			}
			id := chunks[0]["id"]
			for _, c := range chunks {
				if c["object"] != "chat.completion.chunk" || c["id"] != id || c["model"] != "test-vlm" || c["created"] == nil {
					t.Fatalf("chunk header %v", c)
				}
			}
			if !strings.HasPrefix(id.(string), "chatcmpl-") {
				t.Fatalf("id %v", id)
			}
			delta := func(c map[string]any) map[string]any {
				return c["choices"].([]any)[0].(map[string]any)["delta"].(map[string]any)
			}
			first := delta(chunks[0])
			if first["role"] != "assistant" || first["content"] != "" {
				t.Fatalf("first chunk delta %v", first)
			}
			var text strings.Builder
			finishAt := -1
			for i, c := range chunks[1:] {
				choices := c["choices"].([]any)
				if len(choices) == 0 {
					continue
				}
				ch := choices[0].(map[string]any)
				if ch["finish_reason"] != nil {
					if ch["finish_reason"] != "stop" || len(ch["delta"].(map[string]any)) != 0 {
						t.Fatalf("finish chunk %v", ch)
					}
					finishAt = i + 1
					continue
				}
				if _, ok := ch["delta"].(map[string]any)["role"]; ok {
					t.Fatal("role sent twice")
				}
				text.WriteString(ch["delta"].(map[string]any)["content"].(string))
				if _, ok := c["usage"]; ok {
					t.Fatal("usage in a content chunk")
				}
			}
			if text.String() != "Hello there" {
				t.Fatalf("text %q", text.String())
			}
			wantChunks := 1 + 3 + 1 // role, 3 non-empty pieces, finish
			if includeUsage {
				wantChunks++
				last := chunks[len(chunks)-1]
				if len(last["choices"].([]any)) != 0 || finishAt != len(chunks)-2 {
					t.Fatalf("usage chunk %v", last)
				}
				u := last["usage"].(map[string]any)
				if u["prompt_tokens"] != 11.0 || u["completion_tokens"] != 4.0 || u["total_tokens"] != 15.0 {
					t.Fatalf("usage %v", u)
				}
				if kv := last["kv_cache"].(map[string]any); kv["policy"] != "elastic" || kv["kept"] != 9.0 {
					t.Fatalf("kv_cache %v", kv)
				}
			} else if finishAt != len(chunks)-1 {
				t.Fatal("finish chunk is not the last chunk")
			}
			if len(chunks) != wantChunks {
				t.Fatalf("%d chunks, want %d", len(chunks), wantChunks)
			}
		})
	}
}

func TestStreamErrorAfterStart(t *testing.T) {
	fb := newFake()
	fb.events = []completion.Event{{Text: "partial"}, {Done: true, Err: errors.New("decode failed")}}
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"stream": true}))
	events := sseEvents(t, w.Body.String())
	if len(events) != 4 || events[3] != "[DONE]" {
		t.Fatalf("events %q", events)
	}
	var e ErrorBody
	if err := json.Unmarshal([]byte(events[2]), &e); err != nil || e.Error.Type != "server_error" || !strings.Contains(e.Error.Message, "decode failed") {
		t.Fatalf("error event %q", events[2])
	}
}

func TestStreamSubmitErrorIsJSON(t *testing.T) {
	fb := newFake()
	fb.submitErr = completion.ErrQueueFull
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"stream": true}))
	if e := decodeError(t, w); w.Code != 429 || e.Type != "rate_limit_error" {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}

func TestNonStreamShape(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"model": "test-vlm"}))
	if w.Code != 200 || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	var m map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(m["id"].(string), "chatcmpl-") || m["object"] != "chat.completion" || m["model"] != "test-vlm" || m["created"].(float64) < 1e9 {
		t.Fatalf("header fields %v", m)
	}
	choices := m["choices"].([]any)
	if len(choices) != 1 {
		t.Fatalf("choices %v", choices)
	}
	c := choices[0].(map[string]any)
	lp, hasLP := c["logprobs"]
	if c["index"] != 0.0 || c["finish_reason"] != "stop" || !hasLP || lp != nil {
		t.Fatalf("choice %v", c)
	}
	msg := c["message"].(map[string]any)
	if msg["role"] != "assistant" || msg["content"] != "Hello world" {
		t.Fatalf("message %v", msg)
	}
	u := m["usage"].(map[string]any)
	if u["prompt_tokens"] != 11.0 || u["completion_tokens"] != 2.0 || u["total_tokens"] != 13.0 {
		t.Fatalf("usage %v", u)
	}
	kv := m["kv_cache"].(map[string]any)
	for _, k := range []string{"policy", "budget", "prompt_entries", "kept", "merged", "evicted", "peak_cells", "final_cells", "bytes_saved"} {
		if _, ok := kv[k]; !ok {
			t.Fatalf("kv_cache lacks %s: %v", k, kv)
		}
	}
}

func TestFinishReasonLength(t *testing.T) {
	fb := newFake()
	fb.events = []completion.Event{{Text: "a"}, {Done: true, FinishReason: completion.FinishLength, Usage: completion.Usage{PromptTokens: 1, CompletionTokens: 1, TotalTokens: 2}}}
	h := newHandler(t, testOptions(), fb)
	var resp ChatCompletion
	w := postChat(h, chatBody(t, map[string]any{"max_tokens": 1}))
	if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil || resp.Choices[0].FinishReason != "length" || resp.KVCache != nil {
		t.Fatalf("%s", w.Body)
	}
}

// A client that goes away cancels the request's context, so the engine frees the slot.
func TestClientDisconnectCancels(t *testing.T) {
	for _, stream := range []bool{true, false} {
		t.Run(map[bool]string{true: "stream", false: "non-stream"}[stream], func(t *testing.T) {
			fb := newFake()
			fb.events = []completion.Event{{Text: "tick"}}
			fb.block = true
			srv := httptest.NewServer(newHandler(t, testOptions(), fb))
			defer srv.Close()

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions",
				strings.NewReader(chatBody(t, map[string]any{"stream": stream})))
			req.Header.Set("Content-Type", "application/json")
			done := make(chan struct{})
			go func() {
				defer close(done)
				resp, err := srv.Client().Do(req)
				if err != nil {
					return
				}
				defer resp.Body.Close()
				// Read the role chunk, then hang up.
				_, _ = bufio.NewReader(resp.Body).ReadString('\n')
				cancel()
			}()
			if !stream {
				// Non-stream: nothing comes back until Done; hang up after the request lands.
				deadline := time.Now().Add(5 * time.Second)
				for fb.submitted() == 0 && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				cancel()
			}
			select {
			case <-fb.cancelled:
			case <-time.After(5 * time.Second):
				t.Fatal("the backend's context was not cancelled")
			}
			<-done
		})
	}
}

func TestRequestTimeout(t *testing.T) {
	for _, stream := range []bool{false, true} {
		fb := newFake()
		fb.events = nil
		fb.block = true
		opts := testOptions()
		opts.RequestTimeout = 50 * time.Millisecond
		w := postChat(newHandler(t, opts, fb), chatBody(t, map[string]any{"stream": stream}))
		if !stream {
			if e := decodeError(t, w); w.Code != http.StatusGatewayTimeout || str(e.Code) != "request_timeout" {
				t.Fatalf("%d %s", w.Code, w.Body)
			}
			continue
		}
		events := sseEvents(t, w.Body.String())
		if len(events) != 3 || !strings.Contains(events[1], "request_timeout") || events[2] != "[DONE]" {
			t.Fatalf("stream events %q", events)
		}
	}
}

// A channel closed without a Done event is a server error, not a hang.
func TestChannelClosedWithoutDone(t *testing.T) {
	fb := newFake()
	fb.events = []completion.Event{{Text: "x"}}
	w := postChat(newHandler(t, testOptions(), fb), chatBody(t, map[string]any{}))
	if e := decodeError(t, w); w.Code != 500 || e.Type != "server_error" {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}

// A failure is counted once, whether it reaches the client as a status or mid-stream.
func TestMetricsCountFailuresOnce(t *testing.T) {
	fb := newFake()
	fb.events = []completion.Event{{Text: "x"}, {Done: true, Err: errors.New("boom")}}
	h := newHandler(t, testOptions(), fb)
	postChat(h, chatBody(t, map[string]any{"stream": true}))
	postChat(h, chatBody(t, map[string]any{}))
	m := parseMetrics(t, do(h, "GET", "/metrics", "").Body.String())
	if m["elasticserve_request_errors_total"] != 2 {
		t.Fatalf("errors_total = %v, want 2", m["elasticserve_request_errors_total"])
	}
	if m[`elasticserve_requests_total{endpoint="/v1/chat/completions",status="500"}`] != 1 {
		t.Fatalf("%v", m)
	}
}

// Each SSE event reaches the client while the generation is still running.
func TestStreamFlushesEachEvent(t *testing.T) {
	fb := newFake()
	fb.events = []completion.Event{{Text: "tick"}}
	fb.block = true // the request stays open after "tick"
	srv := httptest.NewServer(newHandler(t, testOptions(), fb))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions",
		strings.NewReader(chatBody(t, map[string]any{"stream": true})))
	req.Header.Set("Content-Type", "application/json")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	var texts []string
	for len(texts) < 2 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", texts, err)
		}
		data, ok := strings.CutPrefix(strings.TrimSpace(line), "data: ")
		if !ok {
			continue
		}
		var c ChatCompletionChunk
		if err := json.Unmarshal([]byte(data), &c); err != nil || len(c.Choices) != 1 || c.Choices[0].Delta.Content == nil {
			t.Fatalf("chunk %q: %v", data, err)
		}
		texts = append(texts, *c.Choices[0].Delta.Content)
	}
	if texts[0] != "" || texts[1] != "tick" {
		t.Fatalf("chunks %q", texts)
	}
	cancel()
	select {
	case <-fb.cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the backend's context was not cancelled")
	}
}

// The wire shape of usage and kv_cache is the API's own, field for field.
func TestUsageAndKVCacheJSON(t *testing.T) {
	b, err := json.Marshal(ChatCompletionChunk{
		Choices: []ChunkChoice{},
		Usage:   &Usage{PromptTokens: 1, CompletionTokens: 2, TotalTokens: 3},
		KVCache: kvCacheOf(&completion.KVReport{Policy: "elastic", Budget: 0.5, PromptEntries: 4, Kept: 5, Merged: 6, Evicted: 7,
			PeakCells: 8, FinalCells: 9, BytesSaved: 10, PrefillMs: 1.5, CompressMs: 2.5, DecodeMs: 3.5}),
	})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"id":"","object":"","created":0,"model":"","choices":[],` +
		`"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":{"cached_tokens":0}},` +
		`"kv_cache":{"policy":"elastic","budget":0.5,"prompt_entries":4,"reused":0,"kept":5,"merged":6,"evicted":7,` +
		`"peak_cells":8,"final_cells":9,"bytes_saved":10,"prefill_ms":1.5,"compress_ms":2.5,"decode_ms":3.5}}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	if kvCacheOf(nil) != nil {
		t.Fatal("no report must stay absent")
	}
	// Reused cells say where they came from.
	b, err = json.Marshal(kvCacheOf(&completion.KVReport{Policy: "full", Budget: 1, PromptEntries: 300, Reused: 290, ReusedFrom: "host"}))
	if err != nil || !strings.Contains(string(b), `"reused":290,"reused_from":"host","kept"`) {
		t.Fatalf("reused from the host tier: %s (%v)", b, err)
	}
	if u := usageOf(completion.Usage{PromptTokens: 4, CompletionTokens: 5, TotalTokens: 9}); u != (Usage{PromptTokens: 4, CompletionTokens: 5, TotalTokens: 9}) {
		t.Fatalf("usage %+v", u)
	}
}
