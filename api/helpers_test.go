package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// fakeBackend is a scripted Backend for testing the HTTP layer.
type fakeBackend struct {
	mu        sync.Mutex
	info      BackendInfo
	stats     completion.Stats
	ready     bool
	submitErr error
	events    []completion.Event // sent in order, then the channel is closed
	block     bool               // after events, wait for ctx to end (then close)
	panicMsg  string             // Submit panics with this when set
	requests  []*completion.Request
	cancelled chan struct{} // closed when a request's ctx ends while it runs
}

// testMarker is llama.cpp's media marker, which the fake engine reports.
const testMarker = "<__media__>"

var _ Backend = (*fakeBackend)(nil)

func newFake() *fakeBackend {
	return &fakeBackend{
		info: BackendInfo{ModelID: "model.gguf", Created: time.Unix(1700000000, 0), CtxPerSeq: 1024, Vision: true, Slots: 4, MediaMarker: testMarker, VocabSize: fakeBOS + 1,
			KVContexts: []KVContext{{Role: "decode", Cells: 4096, Bytes: 4096 * 1536}, {Role: "prefill", Cells: 1536, Bytes: 1536 * 1536}}},
		stats:     completion.Stats{QueueDepth: 2, SlotsBusy: 1, KVCellsUsed: 300, KVCellsTotal: 4096, KVInvariantFailures: 1},
		ready:     true,
		events:    okEvents("Hello", " world"),
		cancelled: make(chan struct{}),
	}
}

// okEvents scripts a successful completion of the given pieces.
func okEvents(pieces ...string) []completion.Event {
	evs := make([]completion.Event, 0, len(pieces)+1)
	for _, p := range pieces {
		evs = append(evs, completion.Event{Text: p})
	}
	return append(evs, completion.Event{
		Done: true, FinishReason: completion.FinishStop,
		Usage: completion.Usage{PromptTokens: 11, CompletionTokens: len(pieces), TotalTokens: 11 + len(pieces)},
		KV:    &completion.KVReport{Policy: "elastic", Budget: 0.8, PromptEntries: 11, Kept: 9, Merged: 1, Evicted: 1, PeakCells: 12, FinalCells: 10, BytesSaved: 4096},
	})
}

func (f *fakeBackend) Submit(ctx context.Context, req *completion.Request) (<-chan completion.Event, error) {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	err, evs, block, pm := f.submitErr, f.events, f.block, f.panicMsg
	f.mu.Unlock()
	if pm != "" {
		panic(pm)
	}
	if err != nil {
		return nil, err
	}
	if err := decodeImages(req); err != nil {
		return nil, err
	}
	ch := make(chan completion.Event)
	go func() {
		defer close(ch)
		for _, ev := range evs {
			select {
			case ch <- ev:
			case <-ctx.Done():
				close(f.cancelled)
				return
			}
		}
		if block {
			<-ctx.Done()
			close(f.cancelled)
		}
	}()
	return ch, nil
}

// decodeImages decodes every image as the engine's vision encoder does,
// which is where a truncated or corrupt image is found.
func decodeImages(req *completion.Request) error {
	for i, data := range req.Images() {
		if _, _, err := image.Decode(bytes.NewReader(data)); err != nil {
			return &completion.ImageError{Index: i, Err: err}
		}
	}
	return nil
}

// The fake vocabulary: token i < 256 is the byte i, fakeBOS is "<s>".
const (
	fakeBOS        = 256
	fakeImageToken = 10 // tokens one image counts as
)

// Tokenize is one token per byte (plus fakeBOS with addSpecial).
func (f *fakeBackend) Tokenize(_ context.Context, text string, addSpecial, _ bool) ([]int32, []string, error) {
	var ids []int32
	var pieces []string
	if addSpecial {
		ids, pieces = append(ids, fakeBOS), append(pieces, "<s>")
	}
	for i := 0; i < len(text); i++ {
		ids, pieces = append(ids, int32(text[i])), append(pieces, text[i:i+1])
	}
	return ids, pieces, nil
}

func (f *fakeBackend) Detokenize(_ context.Context, tokens []int32) (string, error) {
	var b strings.Builder
	for _, t := range tokens {
		if t == fakeBOS {
			b.WriteString("<s>")
			continue
		}
		b.WriteByte(byte(t))
	}
	return b.String(), nil
}

// CountPrompt counts text bytes plus fakeImageToken per image, after
// decoding the images as Submit does; it records the request.
func (f *fakeBackend) CountPrompt(_ context.Context, req *completion.Request) (int, error) {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	err := f.submitErr
	f.mu.Unlock()
	if err != nil {
		return 0, err
	}
	if err := decodeImages(req); err != nil {
		return 0, err
	}
	n := 0
	for _, m := range req.Messages {
		for _, p := range m.Parts {
			if p.Kind == completion.PartImage {
				n += fakeImageToken
			} else {
				n += len(p.Text)
			}
		}
	}
	return n, nil
}

func (f *fakeBackend) Info() BackendInfo       { f.mu.Lock(); defer f.mu.Unlock(); return f.info }
func (f *fakeBackend) Stats() completion.Stats { f.mu.Lock(); defer f.mu.Unlock(); return f.stats }
func (f *fakeBackend) Ready() bool             { f.mu.Lock(); defer f.mu.Unlock(); return f.ready }

func (f *fakeBackend) lastRequest(t *testing.T) *completion.Request {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.requests) == 0 {
		t.Fatal("no request reached the backend")
	}
	return f.requests[len(f.requests)-1]
}

func (f *fakeBackend) submitted() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.requests) }

func testOptions() Options {
	return Options{ModelAlias: "test-vlm", MaxImages: 4, MaxImageBytes: 1 << 20, MaxImagePixels: 1 << 20, MaxBodyBytes: 8 << 20}
}

func newHandler(t *testing.T, opts Options, fb *fakeBackend) http.Handler {
	t.Helper()
	return New(opts, fb, zerolog.New(io.Discard))
}

type reqOpt func(*http.Request)

func withHeader(k, v string) reqOpt { return func(r *http.Request) { r.Header.Set(k, v) } }

func do(h http.Handler, method, path string, body string, opts ...reqOpt) *httptest.ResponseRecorder {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r := httptest.NewRequest(method, path, rd)
	if method == http.MethodPost {
		r.Header.Set("Content-Type", "application/json")
	}
	for _, o := range opts {
		o(r)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func postChat(h http.Handler, body string, opts ...reqOpt) *httptest.ResponseRecorder {
	return do(h, http.MethodPost, "/v1/chat/completions", body, opts...)
}

// decodeError checks the OpenAI error shape and returns its detail.
func decodeError(t *testing.T, w *httptest.ResponseRecorder) ErrorDetail {
	t.Helper()
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("error Content-Type = %q", ct)
	}
	var raw map[string]map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &raw); err != nil {
		t.Fatalf("error body is not JSON: %v: %s", err, w.Body)
	}
	e, ok := raw["error"]
	if !ok || len(raw) != 1 {
		t.Fatalf("error body lacks the single key error: %s", w.Body)
	}
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := e[k]; !ok {
			t.Fatalf("error lacks %q: %s", k, w.Body)
		}
	}
	var body ErrorBody
	_ = json.Unmarshal(w.Body.Bytes(), &body)
	if body.Error.Message == "" || body.Error.Type == "" {
		t.Fatalf("error has empty message or type: %s", w.Body)
	}
	return body.Error
}

func str(p *string) string {
	if p == nil {
		return "<null>"
	}
	return *p
}

// ---- images ----

func testImage(w, h int) image.Image {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.RGBA{uint8(x * 7), uint8(y * 13), 99, 255})
		}
	}
	return img
}

func pngBytes(t testing.TB, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := png.Encode(&b, testImage(w, h)); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func jpegBytes(t testing.TB, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := jpeg.Encode(&b, testImage(w, h), nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func dataURLOf(mediaType string, data []byte) string {
	return "data:" + mediaType + ";base64," + base64.StdEncoding.EncodeToString(data)
}

// chatBody builds a request body from a map, for readability in tests.
func chatBody(t testing.TB, m map[string]any) string {
	t.Helper()
	if _, ok := m["messages"]; !ok {
		m["messages"] = []any{map[string]any{"role": "user", "content": "hi"}}
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func userParts(parts ...any) []any {
	return []any{map[string]any{"role": "user", "content": parts}}
}

func textPart(s string) map[string]any { return map[string]any{"type": "text", "text": s} }

func imagePart(url string) map[string]any {
	return map[string]any{"type": "image_url", "image_url": map[string]any{"url": url}}
}

// newChunkedRequest is a chat POST without a Content-Length.
func newChunkedRequest(body string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", io.NopCloser(strings.NewReader(body)))
	r.ContentLength = -1
	r.Header.Set("Content-Type", "application/json")
	return r
}

func newRecorder() *httptest.ResponseRecorder { return httptest.NewRecorder() }
