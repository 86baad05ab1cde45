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
	st := &chatStream{sse: newSSE(w), c: c}
	if c.plan.tools != nil {
		st.tools = &toolStreamer{t: c.plan.tools}
	}
	empty := ""
	st.sse.data(st.chunk(Delta{Role: "assistant", Content: &empty}, nil))
	idle := time.NewTimer(s.opts.StreamKeepAlive)
	defer idle.Stop()
	for {
		ev, idled, ok, err := nextEvent(ctx, events, idle.C)
		if idled {
			st.sse.comment("keep-alive")
			idle.Reset(s.opts.StreamKeepAlive)
			continue
		}
		if !ok {
			if r.Context().Err() == nil { // not a client hang-up: tell the client
				s.streamError(r.Context(), st, err)
			}
			return
		}
		idle.Reset(s.opts.StreamKeepAlive)
		st.pending = append(st.pending, ev.Logprobs...)
		st.text(ev.Text)
		if !ev.Done {
			continue
		}
		if ev.Err != nil {
			s.streamError(r.Context(), st, ev.Err)
			return
		}
		s.metrics.completed(ev, c.start, c.firstTok)
		st.finish(ev, includeUsage)
		return
	}
}

// streamError ends a stream that failed with err: an error event, then [DONE].
func (s *server) streamError(clientCtx context.Context, st *chatStream, err error) {
	s.metrics.requestFailed()
	st.sse.data(s.requestError(clientCtx, err, st.c.plan).body())
	st.sse.done()
}

// chatStream is one streamed answer: its chunks and what is still to send.
type chatStream struct {
	sse     *sseWriter
	c       *chatState
	pending []completion.TokenLogprob // logprobs not yet sent with a chunk
	tools   *toolStreamer             // nil: the answer is text
}

// chunk is a chunk of the answer; it carries the logprobs not yet sent.
func (st *chatStream) chunk(d Delta, finish *string) ChatCompletionChunk {
	c := st.c
	ch := ChatCompletionChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
		Choices: []ChunkChoice{{Index: 0, Delta: d, FinishReason: finish}}}
	if len(st.pending) > 0 {
		ch.Choices[0].Logprobs = logprobsOf(st.pending)
		st.pending = nil
	}
	return ch
}

func (st *chatStream) content(text string) {
	if text != "" {
		st.sse.data(st.chunk(Delta{Content: &text}, nil))
	}
}

// text sends new answer text: as content, or as tool-call deltas.
func (st *chatStream) text(text string) {
	if text == "" {
		return
	}
	if st.c.firstTok.IsZero() {
		st.c.firstTok = time.Now()
	}
	if st.tools == nil {
		st.content(text)
		return
	}
	rest, calls := st.tools.feed(text)
	st.content(rest)
	if len(calls) > 0 {
		st.sse.data(st.chunk(Delta{ToolCalls: calls}, nil))
	}
}

// finish sends what is left of the answer, the chunk with its finish reason,
// the usage chunk when asked for, and [DONE].
func (st *chatStream) finish(ev completion.Event, includeUsage bool) {
	c := st.c
	fr := finishReason(ev)
	if st.tools != nil {
		rest, called := st.tools.end()
		st.content(rest)
		if called && fr == completion.FinishStop {
			fr = finishToolCalls
		}
	}
	last := st.chunk(Delta{}, &fr)
	if !includeUsage && ev.KV != nil && ev.KV.Explain != nil {
		// An explained stream carries its kv_cache report on its last chunk,
		// which is this one when no usage chunk follows.
		last.KVCache = kvCacheOf(ev.KV)
	}
	st.sse.data(last)
	if includeUsage {
		usage := usageOf(ev.Usage)
		st.sse.data(ChatCompletionChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
			Choices: []ChunkChoice{}, Usage: &usage, KVCache: kvCacheOf(ev.KV)})
	}
	st.sse.done()
}
