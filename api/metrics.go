package api

import (
	"bytes"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// metrics is the server's counters, owned by one handler (no globals).
type metrics struct {
	mu       sync.Mutex
	requests map[requestKey]*atomic.Uint64

	requestErrors    atomic.Uint64
	promptTokens     atomic.Uint64
	completionTokens atomic.Uint64
	kvKept           atomic.Uint64
	kvMerged         atomic.Uint64
	kvEvicted        atomic.Uint64
	kvBytesSaved     atomic.Uint64
	tokensPerSecond  atomic.Uint64 // float64 bits: decode rate of the last completed request
}

type requestKey struct {
	endpoint string
	status   int
}

func newMetrics() *metrics {
	return &metrics{requests: make(map[requestKey]*atomic.Uint64)}
}

// middleware counts every response by route pattern and status.
func (m *metrics) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rw := wrapWriter(w, r)
		next.ServeHTTP(rw, r)
		endpoint := "unmatched"
		if rc := chi.RouteContext(r.Context()); rc != nil && rc.RoutePattern() != "" {
			endpoint = rc.RoutePattern()
		}
		status := statusOf(rw)
		m.request(endpoint, status)
		if status >= 400 && status != statusClientClosed {
			m.requestErrors.Add(1)
		}
	})
}

func (m *metrics) request(endpoint string, status int) {
	k := requestKey{endpoint, status}
	m.mu.Lock()
	c, ok := m.requests[k]
	if !ok {
		c = new(atomic.Uint64)
		m.requests[k] = c
	}
	m.mu.Unlock()
	c.Add(1)
}

// requestFailed counts an error that happened after a 200 was sent (a
// failure in the middle of a stream) or that the middleware cannot see.
func (m *metrics) requestFailed() { m.requestErrors.Add(1) }

// completed accounts a finished request and returns its decode rate
// (tokens/s after the first token; 0 when it cannot be measured).
func (m *metrics) completed(ev completion.Event, firstTok time.Time) float64 {
	m.promptTokens.Add(uint64(max(ev.Usage.PromptTokens, 0)))
	m.completionTokens.Add(uint64(max(ev.Usage.CompletionTokens, 0)))
	if kv := ev.KV; kv != nil {
		m.kvKept.Add(uint64(max(kv.Kept, 0)))
		m.kvMerged.Add(uint64(max(kv.Merged, 0)))
		m.kvEvicted.Add(uint64(max(kv.Evicted, 0)))
		m.kvBytesSaved.Add(uint64(max(kv.BytesSaved, 0)))
	}
	if firstTok.IsZero() || ev.Usage.CompletionTokens < 2 {
		return 0
	}
	d := time.Since(firstTok).Seconds()
	if d <= 0 {
		return 0
	}
	rate := float64(ev.Usage.CompletionTokens-1) / d
	m.tokensPerSecond.Store(math.Float64bits(rate))
	return rate
}

// handleMetrics writes the Prometheus text exposition format (0.0.4).
func (s *server) handleMetrics(w http.ResponseWriter, _ *http.Request) {
	var b bytes.Buffer
	s.metrics.write(&b, s.backend.Stats(), s.backend.Info())
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b.Bytes())
}

func (m *metrics) write(b *bytes.Buffer, st BackendStats, info BackendInfo) {
	header := func(name, typ, help string) {
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	single := func(name, typ, help string, v float64) {
		header(name, typ, help)
		fmt.Fprintf(b, "%s %s\n", name, formatValue(v))
	}

	header("elasticserve_requests_total", "counter", "HTTP requests by route and status.")
	m.mu.Lock()
	keys := make([]requestKey, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	m.mu.Unlock()
	slices.SortFunc(keys, func(a, b requestKey) int {
		if c := strings.Compare(a.endpoint, b.endpoint); c != 0 {
			return c
		}
		return a.status - b.status
	})
	for _, k := range keys {
		m.mu.Lock()
		v := m.requests[k].Load()
		m.mu.Unlock()
		fmt.Fprintf(b, "elasticserve_requests_total{endpoint=\"%s\",status=\"%d\"} %d\n", escapeLabel(k.endpoint), k.status, v)
	}

	counter := func(name, help string, v *atomic.Uint64) { single(name, "counter", help, float64(v.Load())) }
	counter("elasticserve_request_errors_total", "Requests that failed: 4xx/5xx responses and errors during a stream.", &m.requestErrors)
	counter("elasticserve_prompt_tokens_total", "Prompt tokens of completed requests.", &m.promptTokens)
	counter("elasticserve_completion_tokens_total", "Generated tokens of completed requests.", &m.completionTokens)
	single("elasticserve_tokens_per_second", "gauge", "Decode rate of the most recently completed request (tokens/s after its first token).",
		math.Float64frombits(m.tokensPerSecond.Load()))
	single("elasticserve_queue_depth", "gauge", "Requests waiting for a slot.", float64(st.QueueDepth))
	single("elasticserve_slots_busy", "gauge", "Slots running a request.", float64(st.SlotsBusy))
	slots := st.SlotsTotal
	if slots == 0 {
		slots = info.Slots
	}
	single("elasticserve_slots_total", "gauge", "Slots (parallel sequences).", float64(slots))
	single("elasticserve_kv_cells_used", "gauge", "KV cache cells holding entries.", float64(st.KVCellsUsed))
	single("elasticserve_kv_cells_total", "gauge", "KV cache cells in total.", float64(st.KVCellsTotal))
	counter("elasticserve_kv_entries_kept_total", "KV entries kept by the cache policy.", &m.kvKept)
	counter("elasticserve_kv_entries_merged_total", "KV entries merged by the cache policy.", &m.kvMerged)
	counter("elasticserve_kv_entries_evicted_total", "KV entries evicted by the cache policy.", &m.kvEvicted)
	counter("elasticserve_kv_bytes_saved_total", "KV cache bytes saved by the cache policy.", &m.kvBytesSaved)
	single("elasticserve_kv_invariant_failures_total", "counter",
		"Requests failed because a runtime invariant of the KV hook broke (captured attention, cells read back).", float64(st.KVInvariantFailures))
}

func formatValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func escapeLabel(s string) string { return labelEscaper.Replace(s) }
