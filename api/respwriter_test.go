package api

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/go-chi/chi/v5/middleware"
	"github.com/rs/zerolog"
)

// Behind every middleware, a handler still reaches net/http's writer through
// http.ResponseController (flush, deadlines), sees the request id under
// chi's key, and the middlewares that read the status (metrics, recoverer)
// share one recording writer.
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
