package integration

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// TestLatencyMetrics: one completion through the OpenAI SDK moves each
// latency histogram of the server's default policy (elastic) by exactly one,
// and a request that asks for another policy is counted under that one. A
// server of its own, so no other test's requests are counted.
func TestLatencyMetrics(t *testing.T) {
	s := launch(t, serverSpec{flags: []string{"--parallel", "2", "--ctx-size", "8192"}})
	c := sdkClient(s, "")
	model := servedModel(t, c)
	histograms := []string{
		"elasticserve_time_to_first_token_seconds", "elasticserve_inter_token_latency_seconds",
		"elasticserve_e2e_request_latency_seconds", "elasticserve_queue_time_seconds", "elasticserve_prompt_encode_seconds",
	}
	count := func(m map[string]float64, name, policy string) float64 {
		t.Helper()
		v, ok := m[name+`_count{policy="`+policy+`"}`]
		if !ok {
			t.Fatalf("no %s series for policy %s", name, policy)
		}
		return v
	}

	before := metrics(t, s, nil)
	resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: model, Messages: userText("Tell me about squares."), MaxTokens: openai.Int(6), Temperature: openai.Float(0),
	})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Usage.CompletionTokens < 2 || resp.Choices[0].Message.Content == "" {
		t.Fatalf("the test needs content of at least 2 tokens: %+v", resp.Usage)
	}
	after := metrics(t, s, nil)
	for _, name := range histograms {
		if d := count(after, name, "elastic") - count(before, name, "elastic"); d != 1 {
			t.Errorf("%s_count{policy=elastic} moved by %v, want 1", name, d)
		}
		if d := count(after, name, "full") - count(before, name, "full"); d != 0 {
			t.Errorf("%s_count{policy=full} moved by %v, want 0", name, d)
		}
	}
	// Prefill really takes time; so does the whole request, and it is never
	// shorter than its first token.
	sum := func(m map[string]float64, name string) float64 { return m[name+`_sum{policy="elastic"}`] }
	if d := sum(after, "elasticserve_prompt_encode_seconds") - sum(before, "elasticserve_prompt_encode_seconds"); d <= 0 {
		t.Errorf("prompt encode time %v, want > 0", d)
	}
	ttft := sum(after, "elasticserve_time_to_first_token_seconds") - sum(before, "elasticserve_time_to_first_token_seconds")
	e2e := sum(after, "elasticserve_e2e_request_latency_seconds") - sum(before, "elasticserve_e2e_request_latency_seconds")
	if ttft <= 0 || e2e < ttft {
		t.Errorf("ttft %v e2e %v: want 0 < ttft <= e2e", ttft, e2e)
	}

	_, err = c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: model, Messages: userText("And circles?"), MaxTokens: openai.Int(3), Temperature: openai.Float(0),
	}, option.WithJSONSet("elastic_cache", map[string]any{"policy": "full"}))
	if err != nil {
		t.Fatal(err)
	}
	full := metrics(t, s, nil)
	for _, name := range []string{"elasticserve_time_to_first_token_seconds", "elasticserve_e2e_request_latency_seconds"} {
		if d := count(full, name, "full") - count(after, name, "full"); d != 1 {
			t.Errorf("%s_count{policy=full} moved by %v after a full request, want 1", name, d)
		}
		if d := count(full, name, "elastic") - count(after, name, "elastic"); d != 0 {
			t.Errorf("%s_count{policy=elastic} moved by %v after a full request, want 0", name, d)
		}
	}

	// While a long request runs, the gauges routers read see it.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	long := mustJSON(t, textChat("please keep talking for a long time", 4000, nil))
	go func() {
		defer close(done)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.URL+"/v1/chat/completions", bytes.NewReader(long))
		if err != nil {
			return
		}
		req.Header.Set("Content-Type", "application/json")
		if resp, err := httpClient.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		m := metrics(t, s, nil)
		used := m[`elasticserve_kv_cells_used_by_policy{policy="elastic"}`]
		if m["elasticserve_requests_running"] == 1 && used > 0 {
			if r := m["elasticserve_kv_cache_usage_ratio"]; r <= 0 || r > 1 {
				t.Errorf("kv_cache_usage_ratio %v while a request holds %v cells", r, used)
			}
			if m["elasticserve_slots_busy"] != 1 {
				t.Errorf("requests_running 1 but slots_busy %v", m["elasticserve_slots_busy"])
			}
			if f := m[`elasticserve_kv_cells_used_by_policy{policy="full"}`]; f != 0 {
				t.Errorf("full holds %v cells while only an elastic request runs", f)
			}
			break
		}
		select {
		case <-done:
			t.Fatal("the long request ended before the gauges saw it")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the long request never showed in the gauges: %v", m)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done

	// Idle: the gauges routers read say so.
	idle := waitIdle(t, s, nil, 5*time.Second)
	for k, want := range map[string]float64{
		"elasticserve_requests_running":                          0,
		"elasticserve_kv_cache_usage_ratio":                      0,
		`elasticserve_kv_cells_used_by_policy{policy="elastic"}`: 0,
		`elasticserve_kv_cells_used_by_policy{policy="full"}`:    0,
	} {
		if got, ok := idle[k]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, want)
		}
	}
}
