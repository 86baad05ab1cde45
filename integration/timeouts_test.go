package integration

import (
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/api"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// slowBackend streams n one-character events, one every interval: a
// generation that runs long, without a model.
type slowBackend struct {
	n     int
	every time.Duration
}

var _ api.Backend = slowBackend{}

func (b slowBackend) Submit(ctx context.Context, _ *completion.Request) (<-chan completion.Event, error) {
	ch := make(chan completion.Event)
	go func() {
		defer close(ch)
		send := func(ev completion.Event) bool {
			select {
			case ch <- ev:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for range b.n {
			select {
			case <-time.After(b.every):
			case <-ctx.Done():
				return
			}
			if !send(completion.Event{Text: "x"}) {
				return
			}
		}
		send(completion.Event{Done: true, FinishReason: completion.FinishLength,
			Usage: completion.Usage{PromptTokens: 1, CompletionTokens: b.n, TotalTokens: b.n + 1}})
	}()
	return ch, nil
}

func (slowBackend) Info() api.BackendInfo {
	return api.BackendInfo{ModelID: "slow", Created: time.Unix(1700000000, 0), CtxPerSeq: 4096, Slots: 1}
}
func (slowBackend) Stats() completion.Stats { return completion.Stats{} }
func (slowBackend) Ready() bool             { return true }
func (slowBackend) Tokenize(context.Context, string, bool, bool) ([]int32, []string, error) {
	return nil, nil, nil
}
func (slowBackend) Detokenize(context.Context, []int32) (string, error) { return "", nil }
func (slowBackend) CountPrompt(context.Context, *completion.Request) (int, error) {
	return 1, nil
}

// TestStreamOutlivesReadTimeout: the server binary runs the API behind an
// http.Server with a ReadTimeout (for slow uploads). A healthy stream that
// lasts longer than that must not be cut: net/http keeps the read deadline
// while the handler runs, and its background read (which watches for the
// client going away) cancels the request context when the deadline passes.
// The binary's ReadTimeout is minutes, so this test puts the same handler
// behind an http.Server with a short one.
func TestStreamOutlivesReadTimeout(t *testing.T) {
	const readTimeout = 300 * time.Millisecond
	backend := slowBackend{n: 10, every: 100 * time.Millisecond} // 1s, over 3x the timeout
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:           api.New(api.Options{}, backend, zerolog.Nop()),
		ReadHeaderTimeout: time.Second,
		ReadTimeout:       readTimeout,
	}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	url := "http://" + ln.Addr().String()

	res := stream(t, httpClient, url, textChat("hi", 10, nil), nil)
	if res.Status != http.StatusOK || res.ReadErr != nil {
		t.Fatalf("status %d, read error %v, body %s", res.Status, res.ReadErr, res.Body)
	}
	if res.Err != nil || !res.Done || res.FinishReason != "length" || res.Text != strings.Repeat("x", 10) {
		t.Errorf("stream cut after the %v read timeout: error event %+v, done %v, finish %q, text %q",
			readTimeout, res.Err, res.Done, res.FinishReason, res.Text)
	}

	// The same holds without streaming.
	r := request(t, http.MethodPost, url+"/v1/chat/completions", mustJSON(t, textChat("hi", 10, nil)), nil)
	if r.Status != http.StatusOK {
		t.Errorf("non-streaming request cut after the %v read timeout: %d %s", readTimeout, r.Status, clip(r.Body))
	}
}
