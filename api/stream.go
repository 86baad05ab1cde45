package api

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// sseWriter writes server-sent events, flushing after each.
type sseWriter struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	err error // first write error (client gone); later writes are skipped
}

func newSSE(w http.ResponseWriter) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	return &sseWriter{w: w, rc: http.NewResponseController(w)}
}

// data sends one "data: <json>" event.
func (s *sseWriter) data(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(`{"error":{"message":"cannot encode chunk","type":"server_error","param":null,"code":"internal_error"}}`)
	}
	s.raw(b)
}

func (s *sseWriter) raw(payload []byte) {
	if s.err != nil {
		return
	}
	buf := make([]byte, 0, len(payload)+8)
	buf = append(buf, "data: "...)
	buf = append(buf, payload...)
	buf = append(buf, '\n', '\n')
	if _, err := s.w.Write(buf); err != nil {
		s.err = err
		return
	}
	if err := s.rc.Flush(); err != nil {
		s.err = err
	}
}

func (s *sseWriter) done() { s.raw([]byte("[DONE]")) }

// comment sends an SSE comment line, which clients ignore; it keeps an idle
// connection alive through proxies.
func (s *sseWriter) comment(text string) {
	if s.err != nil {
		return
	}
	if _, err := s.w.Write([]byte(": " + text + "\n\n")); err != nil {
		s.err = err
		return
	}
	if err := s.rc.Flush(); err != nil {
		s.err = err
	}
}

// streamChat answers with SSE: a role chunk, content (or tool-call) chunks, a
// chunk with finish_reason, optionally a usage chunk, then [DONE]. An error after
// the stream began is sent as a data: {"error": ...} event before [DONE]. While
// nothing happens (a long queue wait or image encoding) an SSE comment goes out
// every keep-alive interval, so proxies do not cut an idle connection.
func (s *server) streamChat(ctx context.Context, w http.ResponseWriter, r *http.Request, c *chatState, events <-chan completion.Event, includeUsage bool) {
	sse := newSSE(w)
	var pending []completion.TokenLogprob // logprobs not yet sent with a chunk
	chunk := func(d Delta, finish *string) ChatCompletionChunk {
		ch := ChatCompletionChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
			Choices: []ChunkChoice{{Index: 0, Delta: d, FinishReason: finish}}}
		if len(pending) > 0 {
			ch.Choices[0].Logprobs = logprobsOf(pending)
			pending = nil
		}
		return ch
	}
	content := func(text string) {
		if text != "" {
			sse.data(chunk(Delta{Content: &text}, nil))
		}
	}
	var tools *toolStreamer
	if c.plan.tools != nil {
		tools = &toolStreamer{t: c.plan.tools}
	}
	empty := ""
	sse.data(chunk(Delta{Role: "assistant", Content: &empty}, nil))
	idle := time.NewTimer(s.opts.StreamKeepAlive)
	defer idle.Stop()
	for {
		ev, idled, ok, err := nextEvent(ctx, events, idle.C)
		if idled {
			sse.comment("keep-alive")
			idle.Reset(s.opts.StreamKeepAlive)
			continue
		}
		if !ok {
			if r.Context().Err() == nil { // not a client hang-up: tell the client
				s.metrics.requestFailed()
				sse.data(s.requestError(r.Context(), err, c.plan).body())
				sse.done()
			}
			return
		}
		idle.Reset(s.opts.StreamKeepAlive)
		pending = append(pending, ev.Logprobs...)
		if ev.Text != "" {
			if c.firstTok.IsZero() {
				c.firstTok = time.Now()
			}
			if tools == nil {
				content(ev.Text)
			} else {
				text, calls := tools.feed(ev.Text)
				content(text)
				if len(calls) > 0 {
					sse.data(chunk(Delta{ToolCalls: calls}, nil))
				}
			}
		}
		if !ev.Done {
			continue
		}
		if ev.Err != nil {
			s.metrics.requestFailed()
			sse.data(s.requestError(r.Context(), ev.Err, c.plan).body())
			sse.done()
			return
		}
		s.metrics.completed(ev, c.start, c.firstTok)
		fr := finishReason(ev)
		if tools != nil {
			rest, called := tools.end()
			content(rest)
			if called && fr == completion.FinishStop {
				fr = finishToolCalls
			}
		}
		last := chunk(Delta{}, &fr)
		if !includeUsage && ev.KV != nil && ev.KV.Explain != nil {
			// An explained stream carries its kv_cache report on its last chunk,
			// which is this one when no usage chunk follows.
			last.KVCache = kvCacheOf(ev.KV)
		}
		sse.data(last)
		if includeUsage {
			usage := usageOf(ev.Usage)
			sse.data(ChatCompletionChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
				Choices: []ChunkChoice{}, Usage: &usage, KVCache: kvCacheOf(ev.KV)})
		}
		sse.done()
		return
	}
}
