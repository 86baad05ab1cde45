package api

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-chi/chi/v5/middleware"
	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// Behind every middleware, a handler still reaches net/http's writer through
// http.ResponseController (flush, deadlines), sees the request id under
// chi's key, and the middlewares share one recording writer.
func TestMiddlewareKeepsTheWriter(t *testing.T) {
	type seen struct {
		flushErr, deadlineErr error
		reqID                 string
		writer                http.ResponseWriter
	}
	got := make(chan seen, 1)
	m := newMetrics(newFake())
	log := zerolog.New(io.Discard)
	h := requestID(accessLog(log)(m.middleware(recoverer(log)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		_, _ = io.WriteString(w, "data: x\n\n")
		got <- seen{
			flushErr:    rc.Flush(),
			deadlineErr: rc.SetWriteDeadline(time.Now().Add(time.Minute)),
			reqID:       middleware.GetReqID(r.Context()),
			writer:      w,
		}
	})))))
	srv := httptest.NewServer(h)
	defer srv.Close()
	req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
	req.Header.Set("X-Request-Id", "trace-42")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	s := <-got
	if s.flushErr != nil || s.deadlineErr != nil {
		t.Fatalf("ResponseController through the middlewares: flush %v, deadline %v", s.flushErr, s.deadlineErr)
	}
	if s.reqID != "trace-42" || resp.Header.Get("X-Request-Id") != "trace-42" {
		t.Fatalf("request id %q, header %q", s.reqID, resp.Header.Get("X-Request-Id"))
	}
	ww, ok := s.writer.(middleware.WrapResponseWriter)
	if !ok {
		t.Fatalf("handler got %T", s.writer)
	}
	if _, wrapped := ww.Unwrap().(middleware.WrapResponseWriter); wrapped {
		t.Fatal("the response writer is wrapped more than once")
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
