package integration

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// The default engine shape through the real binary: streams of 256 cells and a
// prefill context with streams of 1,024 (as many as the start-up log says it
// chose, --prefill-streams 0). A prompt about twice a stream is served under a
// compressing policy (encoded in the prefill context, its compressed cells moved
// into a stream) and refused under full with the OpenAI error; the start-up log
// and /metrics name both contexts and their KV memory.
func TestPromptLongerThanAStreamThroughThePrefillContext(t *testing.T) {
	s := launch(t, serverSpec{flags: []string{"--parallel", "4", "--ctx-size", "1024", "--prefill-ctx-size", "1024"}})
	prompt := strings.Repeat("Describe every shape in the picture, its color and where it is. ", 9)

	r := request(t, http.MethodPost, s.URL+"/v1/chat/completions",
		mustJSON(t, textChat(prompt, 8, map[string]any{"elastic_cache": map[string]any{"policy": "elastic", "budget": 0.3}})), nil)
	if r.Status != http.StatusOK {
		t.Fatalf("elastic 0.3: %d %s", r.Status, r.Body)
	}
	var out struct {
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		} `json:"usage"`
		KVCache struct {
			FinalCells int `json:"final_cells"`
		} `json:"kv_cache"`
	}
	if err := json.Unmarshal(r.Body, &out); err != nil {
		t.Fatal(err)
	}
	if out.Usage.PromptTokens <= 256 || out.KVCache.FinalCells == 0 || out.KVCache.FinalCells > 256 {
		t.Fatalf("prompt %d tokens, %d cells at the end: want a prompt longer than a 256-cell stream held in one",
			out.Usage.PromptTokens, out.KVCache.FinalCells)
	}

	r = request(t, http.MethodPost, s.URL+"/v1/chat/completions",
		mustJSON(t, textChat(prompt, 8, map[string]any{"elastic_cache": map[string]any{"policy": "full"}})), nil)
	if e := parseError(t, r.Body); r.Status != http.StatusBadRequest || e.code() != "context_length_exceeded" || !strings.Contains(e.Message, "at most 255") {
		t.Fatalf("full: %d %+v", r.Status, e)
	}

	logs := s.log.String()
	var chose struct {
		Streams int    `json:"prefill_streams"`
		Why     string `json:"why"`
	}
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, `"prefill_streams"`) {
			if err := json.Unmarshal([]byte(line), &chose); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Beside 1,024 decode cells of this tiny model, half of any test machine's free
	// memory holds one prefill stream per slot.
	if chose.Streams != 4 || chose.Why == "" {
		t.Fatalf("prefill streams chosen: %+v, want 4 (one per slot) and why", chose)
	}
	m := metrics(t, s, nil)
	dec, pre := m[`elasticserve_kv_cache_bytes{context="decode"}`], m[`elasticserve_kv_cache_bytes{context="prefill"}`]
	if dec <= 0 || pre != 4*dec { // 1,024 cells against 4 x 1,024, the same row types
		t.Errorf("kv cache bytes: decode %v, prefill %v", dec, pre)
	}
	if m["elasticserve_kv_cells_total"] != 1024 {
		t.Errorf("kv cells total %v, want the decode context's 1024", m["elasticserve_kv_cells_total"])
	}
	for _, want := range []string{`"context":"decode","cells":1024,"streams":4,"cells_per_stream":256`, `"context":"prefill","cells":4096,"streams":4,"cells_per_stream":1024`} {
		if !strings.Contains(logs, want) {
			t.Errorf("start-up log lacks %s", want)
		}
	}
}
