package api

import (
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// Latency buckets, in seconds. They follow what LLM servers (vLLM among them)
// export, so that dashboards and autoscaling rules written for those read these
// histograms the same way, widened at the low end where a small model on one
// GPU answers in milliseconds.
var (
	// Time to first token: a cached short prompt answers in ms; a long
	// multimodal prompt behind a queue can take minutes.
	ttftBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
		1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640}
	// Mean gap between generated tokens: about 1-100 ms in practice; the tail
	// catches a server that is swapping or badly overloaded.
	itlBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
		0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20}
	// Whole request: bounded by generation length, so up to tens of minutes.
	e2eBuckets = []float64{0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60,
		120, 240, 480, 960, 1920}
	// Waiting for a slot: 0 on an idle server, so the low buckets matter most.
	queueBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
		10, 20, 30, 60, 120, 300, 600}
	// Prompt prefill (text, image encoding, cache compression).
	encodeBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1,
		2.5, 5, 10, 20, 40, 80, 160}
)

// knownPolicies (elasticcache.Policies) get their histogram series and
// per-policy gauge from the first scrape, so that rate() over them works before
// each policy has served a request.
var knownPolicies = func() []string {
	names := make([]string, len(elasticcache.Policies))
	for i, p := range elasticcache.Policies {
		names[i] = string(p)
	}
	return names
}()

// metrics is the server's Prometheus registry and the collectors the HTTP
// layer updates; one per New, so handlers built in the same process (tests)
// never share series.
type metrics struct {
	reg     *prometheus.Registry
	handler http.Handler

	requests         *prometheus.CounterVec
	requestErrors    prometheus.Counter
	promptTokens     prometheus.Counter
	completionTokens prometheus.Counter
	kvKept           prometheus.Counter
	kvMerged         prometheus.Counter
	kvEvicted        prometheus.Counter
	kvBytesSaved     prometheus.Counter
	tokensPerSecond  prometheus.Gauge

	ttft   *prometheus.HistogramVec
	itl    *prometheus.HistogramVec
	e2e    *prometheus.HistogramVec
	queue  *prometheus.HistogramVec
	encode *prometheus.HistogramVec
}

func newMetrics(backend Backend) *metrics {
	reg := prometheus.NewRegistry()
	f := factory{reg}
	m := &metrics{
		reg: reg,
		requests: f.counterVec("elasticserve_requests_total",
			"HTTP requests by route and status.", "endpoint", "status"),
		requestErrors: f.counter("elasticserve_request_errors_total",
			"Requests that failed: 4xx/5xx responses and errors during a stream."),
		promptTokens: f.counter("elasticserve_prompt_tokens_total",
			"Prompt tokens of completed requests."),
		completionTokens: f.counter("elasticserve_completion_tokens_total",
			"Generated tokens of completed requests."),
		kvKept: f.counter("elasticserve_kv_entries_kept_total",
			"KV entries kept by the cache policy."),
		kvMerged: f.counter("elasticserve_kv_entries_merged_total",
			"KV entries merged by the cache policy."),
		kvEvicted: f.counter("elasticserve_kv_entries_evicted_total",
			"KV entries evicted by the cache policy."),
		kvBytesSaved: f.counter("elasticserve_kv_bytes_saved_total",
			"KV cache bytes saved by the cache policy."),
		tokensPerSecond: f.gauge("elasticserve_tokens_per_second",
			"Decode rate of the most recently completed request (tokens/s after its first token)."),

		ttft: f.histogram("elasticserve_time_to_first_token_seconds",
			"Time from the engine accepting a completed request (after body decoding, image loading and tokenization) "+
				"to its first content, or to its end when it produced none, by cache policy.", ttftBuckets),
		itl: f.histogram("elasticserve_inter_token_latency_seconds",
			"Mean gap between generated tokens after the first, one observation per completed request with at least 2 tokens, "+
				"by cache policy.", itlBuckets),
		e2e: f.histogram("elasticserve_e2e_request_latency_seconds",
			"Time from the engine accepting a completed request to its last event, by cache policy.", e2eBuckets),
		queue: f.histogram("elasticserve_queue_time_seconds",
			"Time a completed request waited for a slot (from being queued to admission), by cache policy.", queueBuckets),
		encode: f.histogram("elasticserve_prompt_encode_seconds",
			"Prompt prefill of a completed request: text and image encoding plus the cache policy's compression, "+
				"by cache policy.", encodeBuckets),
	}
	for _, p := range knownPolicies {
		for _, h := range []*prometheus.HistogramVec{m.ttft, m.itl, m.e2e, m.queue, m.encode} {
			h.WithLabelValues(p)
		}
	}
	reg.MustRegister(
		newEngineCollector(backend),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m.handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	return m
}

// factory registers each collector as it is built, so a metric cannot be
// created and then forgotten.
type factory struct{ reg *prometheus.Registry }

func (f factory) counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	f.reg.MustRegister(c)
	return c
}

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	f.reg.MustRegister(c)
	return c
}

func (f factory) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	f.reg.MustRegister(g)
	return g
}

// histogram is labelled by policy; its help text lists its buckets, which a
// reader of the exposition otherwise sees only as le labels.
func (f factory) histogram(name, help string, buckets []float64) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    name,
		Help:    help + " Buckets (s): " + formatBuckets(buckets) + ".",
		Buckets: buckets,
	}, []string{"policy"})
	f.reg.MustRegister(h)
	return h
}

func formatBuckets(b []float64) string {
	s := make([]string, len(b))
	for i, v := range b {
		s[i] = strconv.FormatFloat(v, 'g', -1, 64)
	}
	return strings.Join(s, ", ")
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
		m.requests.WithLabelValues(endpoint, strconv.Itoa(status)).Inc()
		if status >= 400 && status != statusClientClosed {
			m.requestErrors.Inc()
		}
	})
}

// requestFailed counts an error that happened after a 200 was sent (a
// failure in the middle of a stream) or that the middleware cannot see.
func (m *metrics) requestFailed() { m.requestErrors.Inc() }

// completed accounts a finished request whose engine work began at start and
// whose first content arrived at firstTok (zero: none did). It returns the
// request's decode rate (tokens/s after the first token; 0 when it cannot be
// measured).
func (m *metrics) completed(ev completion.Event, start, firstTok time.Time) float64 {
	now := time.Now()
	m.promptTokens.Add(float64(max(ev.Usage.PromptTokens, 0)))
	m.completionTokens.Add(float64(max(ev.Usage.CompletionTokens, 0)))
	policy := string(elasticcache.Full)
	if kv := ev.KV; kv != nil {
		m.kvKept.Add(float64(max(kv.Kept, 0)))
		m.kvMerged.Add(float64(max(kv.Merged, 0)))
		m.kvEvicted.Add(float64(max(kv.Evicted, 0)))
		m.kvBytesSaved.Add(float64(max(kv.BytesSaved, 0)))
		if kv.Policy != "" {
			policy = kv.Policy
		}
		m.encode.WithLabelValues(policy).Observe(max(kv.PrefillMs+kv.CompressMs, 0) / 1000)
	}
	m.queue.WithLabelValues(policy).Observe(max(ev.QueueMs, 0) / 1000)
	if !start.IsZero() {
		// A request that produced no content reaches its client first with its
		// final event; counting it there keeps TTFT's count equal to e2e's.
		first := firstTok
		if first.IsZero() {
			first = now
		}
		m.ttft.WithLabelValues(policy).Observe(max(first.Sub(start).Seconds(), 0))
		m.e2e.WithLabelValues(policy).Observe(max(now.Sub(start).Seconds(), 0))
	}
	n := ev.Usage.CompletionTokens
	if firstTok.IsZero() || n < 2 {
		return 0
	}
	d := now.Sub(firstTok).Seconds()
	if d <= 0 {
		return 0
	}
	m.itl.WithLabelValues(policy).Observe(d / float64(n-1))
	rate := float64(n-1) / d
	m.tokensPerSecond.Set(rate)
	return rate
}

// handleMetrics serves the registry in whichever exposition format the
// scraper negotiates (Prometheus text 0.0.4 by default).
func (s *server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	s.metrics.handler.ServeHTTP(w, r)
}

// engineCollector reads the engine's state at scrape time, so a scrape never
// sees a value older than itself and idle servers cost nothing between scrapes.
type engineCollector struct {
	backend Backend

	queueDepth, slotsBusy, requestsRunning, slotsTotal *prometheus.Desc
	cellsUsed, cellsTotal, cacheUsage, cellsByPolicy   *prometheus.Desc
	invariantFailures, contextBytes                    *prometheus.Desc
	// conversation memory
	cellsHeld, reuseHits, reuseMisses, reusedTokens, reclaimed, imageHits, imageEncodes *prometheus.Desc
	// conversation tiers, labelled tier ("host")
	tierBytes, tierEntries, tierStored, tierHits, tierMisses, tierEvictions, tierFailures, tierRestored *prometheus.Desc
}

func newEngineCollector(b Backend) *engineCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &engineCollector{
		backend:         b,
		queueDepth:      d("elasticserve_queue_depth", "Requests waiting for a slot."),
		slotsBusy:       d("elasticserve_slots_busy", "Slots running a request."),
		requestsRunning: d("elasticserve_requests_running", "Requests holding a slot (the same value as elasticserve_slots_busy, under the name routers look for)."),
		slotsTotal:      d("elasticserve_slots_total", "Slots (parallel sequences)."),
		cellsUsed:       d("elasticserve_kv_cells_used", "KV cache cells holding entries."),
		cellsTotal:      d("elasticserve_kv_cells_total", "KV cache cells in total."),
		cacheUsage: d("elasticserve_kv_cache_usage_ratio",
			"KV cache cells used / total, 0 to 1 (0 when the total is unknown): the KV pressure signal for routers."),
		cellsByPolicy: d("elasticserve_kv_cells_used_by_policy",
			"KV cache cells held by the running sequences of each cache policy.", "policy"),
		contextBytes: d("elasticserve_kv_cache_bytes",
			"KV cache memory of each llama context, in its own row types: decode (the streams conversations live in) and prefill.", "context"),
		invariantFailures: d("elasticserve_kv_invariant_failures_total",
			"Requests failed because a runtime invariant of the KV hook broke (captured attention, cells read back)."),
		cellsHeld: d("elasticserve_kv_cells_held",
			"KV cache cells of finished conversations kept for their next turn (reclaimable; not in elasticserve_kv_cells_used)."),
		reuseHits:    d("elasticserve_prefix_cache_hits_total", "Requests that continued from a held conversation's cells."),
		reuseMisses:  d("elasticserve_prefix_cache_misses_total", "Requests that could reuse cells but found no held conversation to continue."),
		reusedTokens: d("elasticserve_prefix_cache_reused_tokens_total", "Prompt tokens served from held cells instead of being encoded."),
		reclaimed:    d("elasticserve_kv_cells_reclaimed_total", "Held cells dropped to make room for other requests."),
		imageHits:    d("elasticserve_image_cache_hits_total", "Images whose embeddings came from the image cache."),
		imageEncodes: d("elasticserve_image_encodes_total", "Images encoded by the vision encoder."),
		tierBytes:    d("elasticserve_kv_tier_bytes", "Bytes of held conversations kept out of their slots, per tier (host: host memory, bounded by --cache-ram-mb; disk: files under --cache-dir, bounded by --cache-dir-mb).", "tier"),
		tierEntries:  d("elasticserve_kv_tier_conversations", "Held conversations kept out of their slots, per tier.", "tier"),
		tierStored:   d("elasticserve_kv_tier_stored_total", "Held conversations copied into the tier when they lost their slot.", "tier"),
		tierHits:     d("elasticserve_kv_tier_hits_total", "Requests whose conversation was restored from the tier instead of encoded again.", "tier"),
		tierMisses:   d("elasticserve_kv_tier_misses_total", "Requests that could reuse a conversation but found none to continue, in a slot or the tier, while the tier held some.", "tier"),
		tierEvictions: d("elasticserve_kv_tier_evictions_total",
			"Conversations dropped from the tier, least recently used first, to stay within its bound.", "tier"),
		tierFailures: d("elasticserve_kv_tier_failures_total", "Copies into or restores from the tier that failed (the conversation is encoded again).", "tier"),
		tierRestored: d("elasticserve_kv_tier_restored_tokens_total", "Prompt tokens restored from the tier instead of encoded.", "tier"),
	}
}

func (c *engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.queueDepth, c.slotsBusy, c.requestsRunning, c.slotsTotal,
		c.cellsUsed, c.cellsTotal, c.cacheUsage, c.cellsByPolicy, c.invariantFailures, c.contextBytes,
		c.cellsHeld, c.reuseHits, c.reuseMisses, c.reusedTokens, c.reclaimed, c.imageHits, c.imageEncodes,
		c.tierBytes, c.tierEntries, c.tierStored, c.tierHits, c.tierMisses, c.tierEvictions, c.tierFailures, c.tierRestored} {
		ch <- d
	}
}

func (c *engineCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.backend.Stats()
	gauge := func(d *prometheus.Desc, v int) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	gauge(c.queueDepth, st.QueueDepth)
	gauge(c.slotsBusy, st.SlotsBusy)
	gauge(c.requestsRunning, st.SlotsBusy)
	slots := st.SlotsTotal
	if slots == 0 {
		slots = c.backend.Info().Slots
	}
	gauge(c.slotsTotal, slots)
	gauge(c.cellsUsed, st.KVCellsUsed)
	gauge(c.cellsTotal, st.KVCellsTotal)
	ch <- prometheus.MustNewConstMetric(c.cacheUsage, prometheus.GaugeValue, usageRatio(st.KVCellsUsed, st.KVCellsTotal))
	if st.KVCellsByPolicy != nil { // nil: the backend does not split its use
		policies := slices.Clone(knownPolicies)
		for p := range st.KVCellsByPolicy {
			if !slices.Contains(policies, p) {
				policies = append(policies, p)
			}
		}
		for _, p := range policies {
			ch <- prometheus.MustNewConstMetric(c.cellsByPolicy, prometheus.GaugeValue, float64(st.KVCellsByPolicy[p]), p)
		}
	}
	ch <- prometheus.MustNewConstMetric(c.invariantFailures, prometheus.CounterValue, float64(st.KVInvariantFailures))
	for _, kc := range c.backend.Info().KVContexts {
		ch <- prometheus.MustNewConstMetric(c.contextBytes, prometheus.GaugeValue, float64(kc.Bytes), kc.Role)
	}
	gauge(c.cellsHeld, st.KVCellsHeld)
	for _, m := range []struct {
		d *prometheus.Desc
		v int
	}{{c.reuseHits, st.ReuseHits}, {c.reuseMisses, st.ReuseMisses}, {c.reusedTokens, st.ReusedTokens},
		{c.reclaimed, st.ReclaimedCells}, {c.imageHits, st.ImageCacheHits}, {c.imageEncodes, st.ImageEncodes}} {
		ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v))
	}
	for _, tier := range []struct {
		name string
		completion.TierStats
	}{{"host", st.HostCache}, {"disk", st.DiskCache}} {
		for _, m := range []struct {
			d *prometheus.Desc
			t prometheus.ValueType
			v int64
		}{{c.tierBytes, prometheus.GaugeValue, tier.Bytes}, {c.tierEntries, prometheus.GaugeValue, tier.Entries},
			{c.tierStored, prometheus.CounterValue, tier.Stored}, {c.tierHits, prometheus.CounterValue, tier.Hits},
			{c.tierMisses, prometheus.CounterValue, tier.Misses}, {c.tierEvictions, prometheus.CounterValue, tier.Evictions},
			{c.tierFailures, prometheus.CounterValue, tier.Failures}, {c.tierRestored, prometheus.CounterValue, tier.RestoredTokens}} {
			ch <- prometheus.MustNewConstMetric(m.d, m.t, float64(m.v), tier.name)
		}
	}
}

// usageRatio is used/total, clamped so that a router never reads a value
// outside the documented 0..1 even from a backend whose counts disagree.
func usageRatio(used, total int) float64 {
	if total <= 0 {
		return 0
	}
	return min(max(float64(used)/float64(total), 0), 1)
}
