package bench

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3/packages/ssestream"
)

// fakeServer is an OpenAI-compatible chat endpoint that streams tokens "t0",
// "t1", ... and can be told to be slow or to fail some requests.
type fakeServer struct {
	tokens     int           // content deltas per answer (default: max_tokens)
	firstDelay time.Duration // before the first delta
	tokenDelay time.Duration // between deltas
	kv         bool          // send kv_cache in the usage chunk
	// fail, when set, decides per request (numbered from 0 in arrival
	// order): "" streams normally; "429", "stream-error", "cut" and "bad-json" fail.
	fail func(n int) string
	// hold, when > 0, keeps each of the first hold requests from streaming
	// until that many are in flight (or 2 s passed), so the test sees the
	// client's concurrency.
	hold int

	mu       sync.Mutex
	bodies   []map[string]any
	headers  []http.Header
	n        atomic.Int64
	inFlight atomic.Int64
	maxSeen  atomic.Int64
	release  sync.Once
	released chan struct{}
}

func (f *fakeServer) start(t *testing.T) *httptest.Server {
	t.Helper()
	f.released = make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(srv.Close)
	return srv
}

func (f *fakeServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/v1/chat/completions" || r.Method != http.MethodPost {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	n := int(f.n.Add(1) - 1)
	f.mu.Lock()
	f.bodies = append(f.bodies, body)
	f.headers = append(f.headers, r.Header.Clone())
	f.mu.Unlock()
	cur := f.inFlight.Add(1)
	// A request stops counting before its last byte is written: the client
	// may send its next request as soon as it has read it.
	finish := sync.OnceFunc(func() { f.inFlight.Add(-1) })
	defer finish()
	for {
		m := f.maxSeen.Load()
		if cur <= m || f.maxSeen.CompareAndSwap(m, cur) {
			break
		}
	}
	if n < f.hold { // the first wave waits until the whole wave is in flight
		if cur >= int64(f.hold) {
			f.release.Do(func() { close(f.released) })
		}
		select {
		case <-f.released:
		case <-time.After(2 * time.Second):
		}
	}
	mode := ""
	if f.fail != nil {
		mode = f.fail(n)
	}
	if mode == "429" {
		finish()
		w.Header().Set("Retry-After", "1")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		io.WriteString(w, `{"error":{"message":"queue full","type":"server_error","param":null,"code":"queue_full"}}`)
		return
	}
	tokens := f.tokens
	if tokens == 0 {
		tokens = int(body["max_tokens"].(float64))
	}
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	send := func(s string) {
		io.WriteString(w, "data: "+s+"\n\n")
		fl.Flush()
	}
	send(`{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}`)
	sleep := func(d time.Duration) {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
		}
	}
	sleep(f.firstDelay)
	for i := range tokens {
		if i > 0 {
			sleep(f.tokenDelay)
		}
		if i == tokens/2 {
			switch mode {
			case "stream-error":
				send(`{"error":{"message":"decode failed","type":"server_error"}}`)
				send("[DONE]")
				return
			case "cut":
				return // the handler ends: the body ends without [DONE]
			case "bad-json":
				send(`{"choices": [`)
				return
			}
		}
		send(fmt.Sprintf(`{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d"},"finish_reason":null}]}`, i))
	}
	send(`{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`)
	if so, _ := body["stream_options"].(map[string]any); so["include_usage"] == true {
		kv := ""
		if f.kv {
			kv = fmt.Sprintf(`,"kv_cache":{"policy":"elastic","budget":0.5,"peak_cells":%d,"final_cells":%d,"bytes_saved":%d}`, 100+n%2*10, 60, 4096)
		}
		send(fmt.Sprintf(`{"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}%s}`,
			50, tokens, 50+tokens, kv))
	}
	finish()
	send("[DONE]")
}

func TestRunCountsTokensAndReachesEachConcurrency(t *testing.T) {
	f := &fakeServer{kv: true}
	srv := f.start(t)
	res, err := Run(context.Background(), Options{URL: srv.URL + "/v1/", Model: "m", APIKey: "sk-1",
		Concurrency: []int{1, 3}, Requests: 6, MaxTokens: 5, Seed: 7, Warmup: 1,
		Extra: map[string]any{"elastic_cache": map[string]any{"policy": "elastic", "budget": 0.5}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Levels) != 2 {
		t.Fatalf("levels = %d, want 2", len(res.Levels))
	}
	if got := f.n.Load(); got != 1+6+6 {
		t.Errorf("server saw %d requests, want 13 (1 warmup + 6 per level)", got)
	}
	for _, lv := range res.Levels {
		if lv.OK != 6 || lv.Failed != 0 || len(lv.Errors) != 0 {
			t.Errorf("c=%d: ok=%d failed=%d errors=%v", lv.Concurrency, lv.OK, lv.Failed, lv.Errors)
		}
		if lv.OutputTokens != 30 || lv.PromptTokens != 300 || lv.UsageMissing != 0 {
			t.Errorf("c=%d: output %d prompt %d missing %d, want 30, 300, 0", lv.Concurrency, lv.OutputTokens, lv.PromptTokens, lv.UsageMissing)
		}
		if lv.TTFT.N != 6 || lv.ITL.N != 6*4 || lv.E2E.N != 6 {
			t.Errorf("c=%d: samples ttft %d itl %d e2e %d, want 6, 24, 6", lv.Concurrency, lv.TTFT.N, lv.ITL.N, lv.E2E.N)
		}
		if !(lv.TTFT.P50 <= lv.E2E.P50 && lv.TTFT.P50 <= lv.TTFT.P90 && lv.TTFT.P90 <= lv.TTFT.P99) {
			t.Errorf("c=%d: inconsistent percentiles ttft %+v e2e %+v", lv.Concurrency, lv.TTFT, lv.E2E)
		}
		if want := float64(lv.OK) / lv.Wall.Seconds(); math.Abs(lv.ReqPerSec-want) > 1e-9*want || math.Abs(lv.OutTokPerSec-5*want) > 1e-9*want {
			t.Errorf("c=%d: req/s %v tok/s %v, want %v and %v", lv.Concurrency, lv.ReqPerSec, lv.OutTokPerSec, want, 5*want)
		}
		if lv.KV == nil || lv.KV.Reports != 6 || lv.KV.FinalCells != 60 || lv.KV.BytesSaved != 4096 || lv.KV.PeakCells != 105 || lv.KV.Policy != "elastic" {
			t.Errorf("c=%d: kv = %+v, want 6 reports, peak 105, final 60, saved 4096", lv.Concurrency, lv.KV)
		}
	}
	// The request: streaming with usage, the model, greedy, the extension, the key.
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, b := range f.bodies {
		so, _ := b["stream_options"].(map[string]any)
		if b["stream"] != true || so["include_usage"] != true || b["model"] != "m" || b["max_tokens"] != 5.0 || b["temperature"] != 0.0 {
			t.Fatalf("request %d body %v", i, b)
		}
		if ec, _ := b["elastic_cache"].(map[string]any); ec["budget"] != 0.5 {
			t.Fatalf("request %d: extra fields not merged: %v", i, b)
		}
		if got := f.headers[i].Get("Authorization"); got != "Bearer sk-1" {
			t.Fatalf("request %d: Authorization %q", i, got)
		}
	}
	// Each prompt different, within a level and across levels (and the warmup's):
	// no level can be answered from what an earlier one left in a server's cache.
	prompt := func(i int) string {
		return f.bodies[i]["messages"].([]any)[0].(map[string]any)["content"].(string)
	}
	var first []string
	for i := 1; i <= 6; i++ {
		first = append(first, prompt(i))
	}
	if len(slices.Compact(slices.Sorted(slices.Values(first)))) != 6 {
		t.Errorf("prompts of a level repeat: %q", first)
	}
	var all []string
	for i := range 13 {
		all = append(all, prompt(i))
	}
	if n := len(slices.Compact(slices.Sorted(slices.Values(all)))); n != 13 {
		t.Errorf("%d different prompts in 13 requests (warmup and two levels):\n%q", n, all)
	}
}

func TestRunHoldsTheRequestedConcurrency(t *testing.T) {
	for _, c := range []int{1, 4} {
		f := &fakeServer{hold: c, tokens: 2}
		srv := f.start(t)
		res, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{c}, Requests: 8})
		if err != nil {
			t.Fatal(err)
		}
		if got := f.maxSeen.Load(); got != int64(c) {
			t.Errorf("concurrency %d: the server saw at most %d requests in flight", c, got)
		}
		if res.Levels[0].OK != 8 {
			t.Errorf("concurrency %d: ok = %d", c, res.Levels[0].OK)
		}
	}
}

func TestSlowServerLatencies(t *testing.T) {
	f := &fakeServer{tokens: 4, firstDelay: 60 * time.Millisecond, tokenDelay: 15 * time.Millisecond}
	srv := f.start(t)
	res, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{2}, Requests: 4})
	if err != nil {
		t.Fatal(err)
	}
	lv := res.Levels[0]
	// Only bounds the server enforces causally: the clock starts before the
	// request is sent, and the server sleeps before its first delta and before
	// its end. Gaps between deltas are not bounded from below on the client
	// (a late first read shortens the next gap), so ITL and TPOT arithmetic is
	// tested on fixed samples in TestSummarizeLatencies.
	if lv.TTFT.P50 < 60 || lv.E2E.P50 < 60+3*15 || lv.E2E.P50 < lv.TTFT.P50 {
		t.Errorf("TTFT p50 %.1f ms (>= 60), E2E p50 %.1f ms (>= 105 and >= TTFT)", lv.TTFT.P50, lv.E2E.P50)
	}
	if lv.TPOT.N != 4 || lv.ITL.N != 4*3 {
		t.Errorf("TPOT samples %d, ITL samples %d, want 4 and 12", lv.TPOT.N, lv.ITL.N)
	}
	if lv.KV != nil {
		t.Errorf("kv = %+v from a server without kv_cache", lv.KV)
	}
	// Two at a time, four requests of >= 105 ms: two rounds.
	if lv.Wall < 2*105*time.Millisecond {
		t.Errorf("wall %v shorter than two rounds of requests", lv.Wall)
	}
}

func TestSummarizeLatencies(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	samples := []Sample{
		// TPOT (100-40)/3 = 20 ms.
		{TTFT: ms(40)[0], E2E: ms(100)[0], Gaps: ms(10, 20, 30), OutputTokens: 4, Deltas: 4},
		// TPOT (90-50)/4 = 10 ms.
		{TTFT: ms(50)[0], E2E: ms(90)[0], Gaps: ms(5, 5, 15, 15), OutputTokens: 5, Deltas: 5},
		// One token: no TPOT, no gaps.
		{TTFT: ms(30)[0], E2E: ms(30)[0], OutputTokens: 1, Deltas: 1},
		// Failed: left out of every latency.
		{TTFT: ms(1)[0], E2E: ms(1)[0], Gaps: ms(1), Err: errors.New("x")},
	}
	lv := summarize(2, samples, 200*time.Millisecond)
	tests := []struct {
		name string
		got  Dist
		want Dist
	}{
		{"ttft", lv.TTFT, Dist{N: 3, P50: 40, P90: 50, P99: 50, Avg: 40}},
		{"tpot", lv.TPOT, Dist{N: 2, P50: 10, P90: 20, P99: 20, Avg: 15}},
		{"itl", lv.ITL, Dist{N: 7, P50: 15, P90: 30, P99: 30, Avg: 100.0 / 7}},
		{"e2e", lv.E2E, Dist{N: 3, P50: 90, P90: 100, P99: 100, Avg: 220.0 / 3}},
	}
	for _, tc := range tests {
		if tc.got.N != tc.want.N || tc.got.P50 != tc.want.P50 || tc.got.P90 != tc.want.P90 ||
			tc.got.P99 != tc.want.P99 || math.Abs(tc.got.Avg-tc.want.Avg) > 1e-9 {
			t.Errorf("%s = %+v, want %+v", tc.name, tc.got, tc.want)
		}
	}
	if lv.OK != 3 || lv.Failed != 1 || lv.OutputTokens != 10 || lv.OutTokPerSec != 50 {
		t.Errorf("ok %d failed %d output %d tok/s %v, want 3, 1, 10, 50", lv.OK, lv.Failed, lv.OutputTokens, lv.OutTokPerSec)
	}
}

func TestFailuresAreCountedByKind(t *testing.T) {
	modes := []string{"", "429", "stream-error", "cut", "bad-json", ""}
	f := &fakeServer{tokens: 4, fail: func(n int) string { return modes[n%len(modes)] }}
	srv := f.start(t)
	res, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{1}, Requests: 6})
	if err != nil {
		t.Fatal(err)
	}
	lv := res.Levels[0]
	want := map[string]int{"http 429": 1, "stream error": 1, "disconnected": 1, "other": 1}
	if lv.OK != 2 || lv.Failed != 4 || !maps.Equal(lv.Errors, want) {
		t.Errorf("ok %d failed %d errors %v, want 2, 4, %v", lv.OK, lv.Failed, lv.Errors, want)
	}
	if !strings.Contains(lv.FirstError, "HTTP 429: queue full (Retry-After 1)") {
		t.Errorf("first error %q", lv.FirstError)
	}
	// Failed requests are left out of the latencies and the throughput.
	if lv.E2E.N != 2 || lv.OutputTokens != 8 {
		t.Errorf("e2e samples %d, output tokens %d; want 2 and 8", lv.E2E.N, lv.OutputTokens)
	}
	row := res.Rows()[0]
	if got := row[len(row)-1]; got != "disconnected: 1; http 429: 1; other: 1; stream error: 1" {
		t.Errorf("errors cell %q", got)
	}
}

func TestWarmupFailureStopsTheRun(t *testing.T) {
	f := &fakeServer{fail: func(int) string { return "429" }}
	srv := f.start(t)
	_, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{1}, Requests: 2, Warmup: 1})
	var he *HTTPError
	if !errors.As(err, &he) || he.Status != 429 {
		t.Fatalf("err = %v, want the warmup's HTTP 429", err)
	}
	if f.n.Load() != 1 {
		t.Errorf("%d requests sent after a failed warmup", f.n.Load()-1)
	}
}

func TestTimeoutFailsTheRequest(t *testing.T) {
	f := &fakeServer{tokens: 3, firstDelay: 2 * time.Second}
	srv := f.start(t)
	res, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{1}, Requests: 1, Timeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if lv := res.Levels[0]; lv.Failed != 1 || lv.Errors["timeout"] != 1 {
		t.Errorf("failed %d errors %v, want one timeout", lv.Failed, lv.Errors)
	}
}

func TestImageIsSentAsDataURL(t *testing.T) {
	f := &fakeServer{tokens: 1}
	srv := f.start(t)
	png := []byte("\x89PNG\r\n\x1a\n0000")
	if _, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{1}, Requests: 1, Image: png}); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	parts := f.bodies[0]["messages"].([]any)[0].(map[string]any)["content"].([]any)
	if len(parts) != 2 || parts[0].(map[string]any)["type"] != "text" {
		t.Fatalf("content %v", parts)
	}
	url := parts[1].(map[string]any)["image_url"].(map[string]any)["url"].(string)
	if url != "data:image/png;base64,iVBORw0KGgowMDAw" {
		t.Errorf("image url %q", url)
	}
}

func TestUsageMissingFallsBackToDeltas(t *testing.T) {
	// A server that ignores stream_options: the fake sends usage only when asked.
	f := &fakeServer{tokens: 3}
	srv := f.start(t)
	res, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Concurrency: []int{1}, Requests: 2,
		Extra: map[string]any{"stream_options": map[string]any{"include_usage": false}}})
	if err != nil {
		t.Fatal(err)
	}
	lv := res.Levels[0]
	if lv.OK != 2 || lv.UsageMissing != 2 || lv.OutputTokens != 6 {
		t.Errorf("ok %d usage missing %d output %d, want 2, 2, 6", lv.OK, lv.UsageMissing, lv.OutputTokens)
	}
	if row := res.Rows()[0]; row[slices.Index(Header(), "prompt_tokens_per_req")] != "" {
		t.Errorf("prompt tok/req without usage, want blank: %q", row)
	}
}

func TestPromptsAreSeeded(t *testing.T) {
	a, b, c := Prompts(1, 5, 20), Prompts(1, 5, 20), Prompts(2, 5, 20)
	if !slices.Equal(a, b) {
		t.Errorf("same seed, different prompts")
	}
	if slices.Equal(a, c) {
		t.Errorf("different seeds, same prompts")
	}
	for _, p := range a {
		if n := len(strings.Fields(p)); n < 20 {
			t.Errorf("prompt of %d words, want >= 20: %q", n, p)
		}
	}
}

func TestTableAndCSV(t *testing.T) {
	f := &fakeServer{tokens: 2}
	srv := f.start(t)
	res, err := Run(context.Background(), Options{URL: srv.URL + "/v1", Label: "fake", Concurrency: []int{1, 2}, Requests: 2})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	files, err := res.WriteFiles(filepath.Join(dir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(bytes.NewReader(b)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 || !slices.Equal(recs[0], Header()) {
		t.Fatalf("csv: %q", recs)
	}
	col := map[string]int{}
	for i, h := range recs[0] {
		col[h] = i
	}
	for i, rec := range recs[1:] {
		if rec[col["server"]] != "fake" || rec[col["concurrency"]] != fmt.Sprint(i+1) || rec[col["failed"]] != "0" {
			t.Errorf("row %d: %q", i, rec)
		}
		if rec[col["ttft_p50_ms"]] == "" || rec[col["output_tok_per_s"]] == "0.0" {
			t.Errorf("row %d has no latency or throughput: %q", i, rec)
		}
		if rec[col["kv_peak_cells"]] != "" || rec[col["kv_bytes_saved"]] != "" {
			t.Errorf("row %d: kv columns filled without kv_cache: %q", i, rec)
		}
	}
	md := res.Markdown()
	lines := strings.Split(strings.TrimSpace(md), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[2], "| fake | 1 |") || strings.Count(lines[0], "|") != len(columns)+1 {
		t.Errorf("markdown:\n%s", md)
	}
}

// The stream is read with openai-go's SSE decoder: CRLF or LF line ends,
// comments and fields other than data skipped, data lines of one event joined
// by "\n"; a stream cut off before data: [DONE] is a disconnection.
func TestReadStream(t *testing.T) {
	stream := func(body string) Sample {
		var s Sample
		resp := &http.Response{Header: http.Header{"Content-Type": {"text/event-stream"}}, Body: io.NopCloser(strings.NewReader(body))}
		readStream(ssestream.NewDecoder(resp), time.Now(), &s)
		return s
	}
	in := ": comment\r\nevent: message\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n" +
		"data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"b\"}}],\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\nid: 3\n\n" +
		"data: [DONE]\n\n"
	if s := stream(in); s.Err != nil || s.Deltas != 2 || len(s.Gaps) != 1 || s.PromptTokens != 3 || s.OutputTokens != 2 || s.UsageMissing {
		t.Errorf("%+v", s)
	}
	if s := stream("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]"); !errors.Is(s.Err, errNoDone) {
		t.Errorf("a stream cut off before [DONE] ended: %v", s.Err)
	}
	if s := stream("data: {\"error\":{\"message\":\"boom\"}}\n\n"); s.Err == nil || s.Err.Error() != "error event in the stream: boom" {
		t.Errorf("error event: %v", s.Err)
	}
}
