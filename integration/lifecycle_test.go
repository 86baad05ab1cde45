package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// openFDs counts the server process's open file descriptors (its listener,
// connections, model files...); -1 where /proc is not available.
func openFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(ents)
}

// TestLoad sends 64 concurrent streaming requests to a server with 4 slots
// and a queue of 32: every request must either complete or be refused with
// 429 and Retry-After, and afterwards the server must be idle again.
func TestLoad(t *testing.T) {
	const (
		clients   = 64
		slots     = 4
		queueSize = 32
	)
	s := launch(t, serverSpec{flags: []string{
		"--parallel", strconv.Itoa(slots), "--queue-size", strconv.Itoa(queueSize), "--ctx-size", "4096",
	}})
	tr := &http.Transport{MaxIdleConnsPerHost: clients, MaxConnsPerHost: 0}
	client := &http.Client{Transport: tr, Timeout: 2 * time.Minute}

	baseGoroutines := runtime.NumGoroutine()
	baseFDs := openFDs(s.pid())

	type result struct {
		res     streamResult
		latency time.Duration
	}
	results := make([]result, clients)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := textChat(fmt.Sprintf("client %d asks about shape %d", i, i%7), 16,
				map[string]any{"stream_options": map[string]any{"include_usage": true}})
			<-start
			t0 := time.Now()
			res := stream(t, client, s.URL, body, nil)
			results[i] = result{res, time.Since(t0)}
		}()
	}
	close(start)
	wg.Wait()

	var completed, rejected int
	var lat []time.Duration
	for i, r := range results {
		switch r.res.Status {
		case http.StatusOK:
			if r.res.ReadErr != nil || r.res.Err != nil || !r.res.Done || r.res.FinishReason != "length" ||
				r.res.Usage == nil || r.res.Usage.Completion != 16 {
				t.Errorf("client %d: incomplete stream: read error %v, error event %+v, done %v, finish %q, usage %+v",
					i, r.res.ReadErr, r.res.Err, r.res.Done, r.res.FinishReason, r.res.Usage)
				continue
			}
			completed++
			lat = append(lat, r.latency)
		case http.StatusTooManyRequests:
			rejected++
			ra, err := strconv.Atoi(r.res.Header.Get("Retry-After"))
			if err != nil || ra < 1 {
				t.Errorf("client %d: 429 without a valid Retry-After (%q)", i, r.res.Header.Get("Retry-After"))
			}
			e := parseError(t, r.res.Body)
			if e.Type != "rate_limit_error" || e.code() != "queue_full" {
				t.Errorf("client %d: 429 error %+v", i, e)
			}
		default:
			t.Errorf("client %d: status %d, read error %v, body %s", i, r.res.Status, r.res.ReadErr, clip(r.res.Body))
		}
	}
	sortDurations(lat)
	t.Logf("load: %d clients, %d slots, queue %d: %d completed, %d rejected (429); latency p50 %v, p99 %v",
		clients, slots, queueSize, completed, rejected, percentile(lat, 0.50).Round(time.Millisecond), percentile(lat, 0.99).Round(time.Millisecond))
	if completed+rejected != clients {
		t.Errorf("%d completed + %d rejected != %d clients", completed, rejected, clients)
	}
	// A 429 means the queue was full at that moment; every queued request
	// then completes, so at least queueSize requests complete.
	if rejected > 0 && completed < queueSize {
		t.Errorf("%d requests were rejected but only %d completed (queue size %d)", rejected, completed, queueSize)
	}

	m := waitIdle(t, s, nil, 5*time.Second)
	if got := m["elasticserve_completion_tokens_total"]; got != float64(16*completed) {
		t.Errorf("completion_tokens_total %v, want %d", got, 16*completed)
	}
	if got := m[`elasticserve_requests_total{endpoint="/v1/chat/completions",status="429"}`]; got != float64(rejected) {
		t.Errorf("requests_total{status=429} %v, want %d", got, rejected)
	}

	// The clients' goroutines and connections go away.
	tr.CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > baseGoroutines && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > baseGoroutines {
		buf := make([]byte, 1<<20)
		t.Errorf("test process: %d goroutines after the load, %d before\n%s", n, baseGoroutines, buf[:runtime.Stack(buf, true)])
	}
	// And so do the server's connections (each one holds a goroutine there).
	if baseFDs < 0 {
		t.Logf("no /proc: the server-side connection count is not checked")
	} else {
		deadline = time.Now().Add(5 * time.Second)
		for openFDs(s.pid()) > baseFDs && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if n := openFDs(s.pid()); n > baseFDs {
			t.Errorf("server: %d open file descriptors after the load, %d before", n, baseFDs)
		}
	}
}

// longSpec has room for long generations (the test model was trained on
// 4096 positions, the most a request may use), so requests can be
// interrupted while they run.
var longSpec = serverSpec{flags: []string{"--parallel", "2", "--ctx-size", "8192"}}

// TestClientDisconnect hangs up in the middle of a generation, streaming and
// not: the slot and its KV cells must be freed at once.
func TestClientDisconnect(t *testing.T) {
	s := launch(t, longSpec)
	for _, streaming := range []bool{true, false} {
		t.Run(fmt.Sprintf("stream=%v", streaming), func(t *testing.T) {
			before := metrics(t, s, nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			body := textChat("please keep talking for a long time", 4000, nil)
			body["stream"] = streaming
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.URL+"/v1/chat/completions", bytes.NewReader(mustJSON(t, body)))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/json")
			tr := &http.Transport{}
			defer tr.CloseIdleConnections()
			done := make(chan error, 1)
			firstContent := make(chan struct{})
			go func() {
				resp, err := (&http.Client{Transport: tr}).Do(req)
				if err != nil {
					done <- err
					return
				}
				defer resp.Body.Close()
				if streaming {
					var res streamResult
					var once sync.Once
					readSSE(resp.Body, &res, func(c *chunk) bool {
						if len(c.Choices) > 0 && c.Choices[0].Delta.Content != nil && *c.Choices[0].Delta.Content != "" {
							once.Do(func() { close(firstContent) })
						}
						return true
					})
					done <- res.ReadErr
					return
				}
				_, err = io.ReadAll(resp.Body)
				done <- err
			}()
			// Wait until the request is generating.
			if streaming {
				select {
				case <-firstContent:
				case err := <-done:
					t.Fatalf("the stream ended before any content: %v", err)
				case <-time.After(30 * time.Second):
					t.Fatal("no content within 30s")
				}
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				m := metrics(t, s, nil)
				if m["elasticserve_slots_busy"] == 1 && m["elasticserve_kv_cells_used"] > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the request never occupied a slot: %v", m)
				}
				time.Sleep(5 * time.Millisecond)
			}
			hangup := time.Now()
			cancel()
			if err := <-done; err == nil {
				t.Fatalf("the request completed instead of being interrupted")
			}
			after := waitIdle(t, s, nil, 5*time.Second)
			t.Logf("slot and cells freed %v after the client hung up", time.Since(hangup).Round(time.Millisecond))
			// The request did not run to its end: no tokens were accounted.
			if a, b := after["elasticserve_completion_tokens_total"], before["elasticserve_completion_tokens_total"]; a != b {
				t.Errorf("completion tokens went from %v to %v: the request was not interrupted", b, a)
			}
		})
	}
	// The server still serves.
	r := request(t, http.MethodPost, s.URL+"/v1/chat/completions", mustJSON(t, textChat("still there?", 2, nil)), nil)
	if r.Status != http.StatusOK {
		t.Fatalf("after the hang-ups: %d %s", r.Status, r.Body)
	}
}

// TestRequestDeadline: with --request-timeout, a generation that runs past
// it ends with an OpenAI-shaped error (504 before streaming starts, an error
// event inside a stream) and its slot is freed.
func TestRequestDeadline(t *testing.T) {
	s := launch(t, serverSpec{flags: []string{"--parallel", "1", "--ctx-size", "4096", "--request-timeout", "200ms"}})
	long := func() map[string]any { return textChat("a story that never ends", 4000, nil) }

	t0 := time.Now()
	r := request(t, http.MethodPost, s.URL+"/v1/chat/completions", mustJSON(t, long()), nil)
	t.Logf("non-streaming request ended after %v", time.Since(t0).Round(time.Millisecond))
	if r.Status != http.StatusGatewayTimeout {
		t.Errorf("status %d, want 504; body %s", r.Status, clip(r.Body))
	}
	if e := parseError(t, r.Body); e.Type != "server_error" || e.code() != "request_timeout" || !strings.Contains(e.Message, "request-timeout") {
		t.Errorf("error %+v", e)
	}
	waitIdle(t, s, nil, 5*time.Second)

	res := stream(t, httpClient, s.URL, long(), nil)
	if res.Status != http.StatusOK || res.ReadErr != nil {
		t.Fatalf("stream: status %d, read error %v", res.Status, res.ReadErr)
	}
	if res.Err == nil || res.Err.Type != "server_error" || res.Err.code() != "request_timeout" {
		t.Errorf("stream: want an error event with code request_timeout, got %+v", res.Err)
	}
	if res.FinishReason != "" {
		t.Errorf("stream: a timed-out stream reported finish_reason %q", res.FinishReason)
	}
	if !res.Done {
		t.Errorf("stream: no data: [DONE] after the error event")
	}
	waitIdle(t, s, nil, 5*time.Second)

	// A short request fits the deadline.
	r = request(t, http.MethodPost, s.URL+"/v1/chat/completions", mustJSON(t, textChat("hi", 1, nil)), nil)
	if r.Status != http.StatusOK {
		t.Errorf("short request: %d %s", r.Status, r.Body)
	}
}

// TestGracefulShutdown: SIGTERM during a stream stops accepting connections
// at once, lets the stream run to its end, and the process exits 0.
func TestGracefulShutdown(t *testing.T) {
	s := launch(t, serverSpec{flags: []string{"--parallel", "1", "--ctx-size", "4096", "--shutdown-grace", "60s"}})
	const maxTokens = 3000
	body := textChat("tell me everything", maxTokens, map[string]any{"stream": true, "stream_options": map[string]any{"include_usage": true}})
	resp := openStream(t, s, body)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d %s", resp.StatusCode, b)
	}
	firstContent := make(chan struct{})
	var streamDone sync.WaitGroup
	var res streamResult
	var finished bool
	var mu sync.Mutex
	streamDone.Add(1)
	go func() {
		defer streamDone.Done()
		var once sync.Once
		readSSE(resp.Body, &res, func(c *chunk) bool {
			if len(c.Choices) > 0 && c.Choices[0].Delta.Content != nil {
				once.Do(func() { close(firstContent) })
			}
			return true
		})
		mu.Lock()
		finished = true
		mu.Unlock()
	}()
	select {
	case <-firstContent:
	case <-time.After(30 * time.Second):
		t.Fatal("no content within 30s")
	}

	if err := s.signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// New connections are refused while the stream still runs. (A dial
	// racing with the listener's close may be reset instead; keep trying.)
	u, _ := url.Parse(s.URL)
	refused, streamRunning := false, false
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		conn, err := net.DialTimeout("tcp", u.Host, time.Second)
		if err == nil {
			conn.Close()
		} else if errors.Is(err, syscall.ECONNREFUSED) {
			mu.Lock()
			streamRunning = !finished
			mu.Unlock()
			refused = true
			break
		} else if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("dial after SIGTERM: %v (want connection refused)", err)
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if !refused {
		t.Errorf("the server still accepted connections after SIGTERM")
	} else if !streamRunning {
		t.Errorf("connections were refused only after the stream had ended; the test did not overlap them")
	}

	streamDone.Wait()
	if res.ReadErr != nil || res.Err != nil {
		t.Fatalf("stream broken by the shutdown: read error %v, error event %+v", res.ReadErr, res.Err)
	}
	if !res.Done || res.FinishReason != "length" || res.Usage == nil || res.Usage.Completion != maxTokens {
		t.Errorf("stream did not finish completely: done %v, finish %q, usage %+v", res.Done, res.FinishReason, res.Usage)
	}
	code, ok := s.wait(30 * time.Second)
	if !ok {
		t.Fatal("the server did not exit within 30s of the stream's end")
	}
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	if !strings.Contains(s.log.String(), `"message":"bye"`) {
		t.Errorf("no clean shutdown message in the log")
	}
}

// TestShutdownGraceExpires: a stream still running when the grace period
// ends is cut, but with an OpenAI-shaped error event and data: [DONE], not a
// silently truncated body; the process still exits 0.
func TestShutdownGraceExpires(t *testing.T) {
	s := launch(t, serverSpec{flags: []string{"--parallel", "1", "--ctx-size", "4096", "--shutdown-grace", "300ms"}})
	body := textChat("tell me everything", 4000, map[string]any{"stream": true})
	resp := openStream(t, s, body)
	defer resp.Body.Close()
	firstContent := make(chan struct{})
	result := make(chan streamResult, 1)
	go func() {
		var res streamResult
		var once sync.Once
		readSSE(resp.Body, &res, func(c *chunk) bool {
			if len(c.Choices) > 0 && c.Choices[0].Delta.Content != nil {
				once.Do(func() { close(firstContent) })
			}
			return true
		})
		result <- res
	}()
	select {
	case <-firstContent:
	case <-time.After(30 * time.Second):
		t.Fatal("no content within 30s")
	}
	if err := s.signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var res streamResult
	select {
	case res = <-result:
	case <-time.After(30 * time.Second):
		t.Fatal("the stream did not end within 30s of SIGTERM (grace 300ms)")
	}
	if res.FinishReason != "" {
		t.Fatalf("the stream finished (%q) within the grace period; make it longer", res.FinishReason)
	}
	if res.Err == nil || !res.Done {
		t.Errorf("a stream cut by the shutdown must end with an error event and [DONE]: error %+v, done %v, read error %v, %d events",
			res.Err, res.Done, res.ReadErr, len(res.Events))
	} else if res.Err.code() != "shutting_down" {
		t.Errorf("error event %+v, want code shutting_down", res.Err)
	}
	code, ok := s.wait(30 * time.Second)
	if !ok {
		t.Fatal("the server did not exit")
	}
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
}

// openStream posts a chat request on a connection of its own (closed with the test),
// so that the server's shutdown sees exactly this client.
func openStream(t *testing.T, s *server, body any) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.URL+"/v1/chat/completions", bytes.NewReader(mustJSON(t, body)))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}
