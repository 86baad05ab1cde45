package api

import (
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// scrape GETs /metrics from h and parses the exposition.
func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	w := do(h, "GET", "/metrics", "")
	if w.Code != 200 {
		t.Fatalf("/metrics: %d %s", w.Code, w.Body)
	}
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Fatalf("/metrics Content-Type %q", ct)
	}
	return parseFamilies(t, w.Body.String())
}

func parseFamilies(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("exposition does not parse: %v\n%s", err, text)
	}
	return fams
}

// parseMetrics parses the exposition into "name{labels}" -> value, labels in
// the order the text format writes them (sorted by name; a histogram's le
// last), with a histogram's _bucket, _sum and _count series.
func parseMetrics(t *testing.T, text string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for name, f := range parseFamilies(t, text) {
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+`="`+l.GetValue()+`"`)
			}
			sort.Strings(labels)
			key := func(suffix string, extra ...string) string {
				ls := append(slices.Clone(labels), extra...)
				if len(ls) == 0 {
					return name + suffix
				}
				return name + suffix + "{" + strings.Join(ls, ",") + "}"
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out[key("")] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[key("")] = m.GetGauge().GetValue()
			case dto.MetricType_UNTYPED:
				out[key("")] = m.GetUntyped().GetValue()
			case dto.MetricType_HISTOGRAM:
				h := m.GetHistogram()
				out[key("_count")] = float64(h.GetSampleCount())
				out[key("_sum")] = h.GetSampleSum()
				for _, b := range h.GetBucket() {
					out[key("_bucket", `le="`+strconv.FormatFloat(b.GetUpperBound(), 'g', -1, 64)+`"`)] = float64(b.GetCumulativeCount())
				}
			case dto.MetricType_SUMMARY:
				out[key("_count")] = float64(m.GetSummary().GetSampleCount())
				out[key("_sum")] = m.GetSummary().GetSampleSum()
			}
		}
	}
	return out
}

func TestMetrics(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	postChat(h, chatBody(t, map[string]any{}))
	postChat(h, chatBody(t, map[string]any{"stream": true}))
	postChat(h, chatBody(t, map[string]any{"temperature": 9}))
	do(h, "GET", "/nope", "")

	w := do(h, "GET", "/metrics", "")
	if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("%d %q", w.Code, w.Header().Get("Content-Type"))
	}
	m := parseMetrics(t, w.Body.String())
	want := map[string]float64{
		`elasticserve_requests_total{endpoint="/v1/chat/completions",status="200"}`: 2,
		`elasticserve_requests_total{endpoint="/v1/chat/completions",status="400"}`: 1,
		`elasticserve_requests_total{endpoint="unmatched",status="404"}`:            1,
		"elasticserve_request_errors_total":                                         2,
		"elasticserve_prompt_tokens_total":                                          22,
		"elasticserve_completion_tokens_total":                                      4,
		"elasticserve_queue_depth":                                                  2,
		"elasticserve_slots_busy":                                                   1,
		"elasticserve_requests_running":                                             1,
		"elasticserve_slots_total":                                                  4,
		"elasticserve_kv_cells_used":                                                300,
		"elasticserve_kv_cells_total":                                               4096,
		"elasticserve_kv_cache_usage_ratio":                                         300.0 / 4096,
		"elasticserve_kv_entries_kept_total":                                        18,
		"elasticserve_kv_entries_merged_total":                                      2,
		"elasticserve_kv_entries_evicted_total":                                     2,
		"elasticserve_kv_bytes_saved_total":                                         8192,
		`elasticserve_kv_cache_bytes{context="decode"}`:                             4096 * 1536,
		`elasticserve_kv_cache_bytes{context="prefill"}`:                            1536 * 1536,
		"elasticserve_kv_invariant_failures_total":                                  1,
		// Both completions ran under the fake's "elastic" policy.
		`elasticserve_time_to_first_token_seconds_count{policy="elastic"}`: 2,
		`elasticserve_e2e_request_latency_seconds_count{policy="elastic"}`: 2,
		`elasticserve_queue_time_seconds_count{policy="elastic"}`:          2,
		`elasticserve_prompt_encode_seconds_count{policy="elastic"}`:       2,
		`elasticserve_inter_token_latency_seconds_count{policy="elastic"}`: 2,
		`elasticserve_time_to_first_token_seconds_count{policy="full"}`:    0,
		`elasticserve_e2e_request_latency_seconds_count{policy="h2o"}`:     0,
	}
	for k, v := range want {
		if got, ok := m[k]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}
	if _, ok := m["elasticserve_tokens_per_second"]; !ok {
		t.Error("no tokens_per_second")
	}
	// The fake's Stats has no per-policy split: the series is left out rather
	// than reported as zeros.
	for k := range m {
		if strings.HasPrefix(k, "elasticserve_kv_cells_used_by_policy") {
			t.Errorf("%s reported for a backend without a per-policy split", k)
		}
	}
	// Metrics state is per handler (and building a second one must not panic
	// on a duplicate registration, as it would on a global registry).
	m2 := parseMetrics(t, do(newHandler(t, testOptions(), fb), "GET", "/metrics", "").Body.String())
	if m2["elasticserve_prompt_tokens_total"] != 0 || m2[`elasticserve_e2e_request_latency_seconds_count{policy="elastic"}`] != 0 {
		t.Fatal("metrics shared between handlers")
	}
}

// Each histogram is a histogram with a policy label, its documented buckets,
// and help text that lists them.
func TestMetricsHistogramShapes(t *testing.T) {
	fams := scrape(t, newHandler(t, testOptions(), newFake()))
	for _, c := range []struct {
		name    string
		buckets []float64
	}{
		{"elasticserve_time_to_first_token_seconds", ttftBuckets},
		{"elasticserve_inter_token_latency_seconds", itlBuckets},
		{"elasticserve_e2e_request_latency_seconds", e2eBuckets},
		{"elasticserve_queue_time_seconds", queueBuckets},
		{"elasticserve_prompt_encode_seconds", encodeBuckets},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, ok := fams[c.name]
			if !ok {
				t.Fatal("missing")
			}
			if f.GetType() != dto.MetricType_HISTOGRAM {
				t.Fatalf("type %v", f.GetType())
			}
			if !strings.Contains(f.GetHelp(), "Buckets (s): "+formatBuckets(c.buckets)+".") {
				t.Errorf("help does not list the buckets: %q", f.GetHelp())
			}
			if !slices.IsSorted(c.buckets) || c.buckets[0] <= 0 {
				t.Errorf("buckets not increasing and positive: %v", c.buckets)
			}
			var policies []string
			for _, m := range f.GetMetric() {
				if len(m.GetLabel()) != 1 || m.GetLabel()[0].GetName() != "policy" {
					t.Fatalf("labels %v", m.GetLabel())
				}
				policies = append(policies, m.GetLabel()[0].GetValue())
				var got []float64
				for _, b := range m.GetHistogram().GetBucket() {
					got = append(got, b.GetUpperBound())
				}
				// The text format always ends with the +Inf bucket.
				if !slices.Equal(got, append(slices.Clone(c.buckets), math.Inf(1))) {
					t.Errorf("buckets %v, want %v", got, c.buckets)
				}
			}
			slices.Sort(policies)
			if want := []string{"elastic", "full", "h2o", "local"}; !slices.Equal(policies, want) {
				t.Errorf("pre-created policies %v, want %v", policies, want)
			}
		})
	}
}

// completed observes each request once, under the final event's policy, with
// the latencies its times give.
func TestMetricsCompleted(t *testing.T) {
	const (
		ttft = "elasticserve_time_to_first_token_seconds"
		itl  = "elasticserve_inter_token_latency_seconds"
		e2e  = "elasticserve_e2e_request_latency_seconds"
		qt   = "elasticserve_queue_time_seconds"
		enc  = "elasticserve_prompt_encode_seconds"
	)
	type obs struct {
		count float64
		sum   float64 // checked within 0.25 s (the test's own run time)
	}
	// Times are set back from the moment each case runs: a slow machine (the race
	// detector, other jobs) must not age them.
	cases := []struct {
		name string
		ev   completion.Event
		// how long ago the request started and its first token came (0: none)
		startAgo, tokAgo time.Duration
		policy           string
		want             map[string]obs // absent: no observation for policy
		rate             bool           // a decode rate is returned
	}{
		{
			name: "elastic, 5 tokens",
			ev: completion.Event{Done: true, Usage: completion.Usage{PromptTokens: 7, CompletionTokens: 5}, QueueMs: 1500,
				KV: &completion.KVReport{Policy: "elastic", PrefillMs: 300, CompressMs: 200}},
			startAgo: 3 * time.Second, tokAgo: 2 * time.Second, policy: "elastic",
			// 4 gaps over the last 2 s
			want: map[string]obs{ttft: {1, 1}, itl: {1, 0.5}, e2e: {1, 3}, qt: {1, 1.5}, enc: {1, 0.5}},
			rate: true,
		},
		{
			name:     "no KV report counts as full; one token has no gap",
			ev:       completion.Event{Done: true, Usage: completion.Usage{PromptTokens: 3, CompletionTokens: 1}, QueueMs: 20},
			startAgo: time.Second, tokAgo: time.Second / 2, policy: "full",
			want: map[string]obs{ttft: {1, 0.5}, e2e: {1, 1}, qt: {1, 0.02}},
		},
		{
			name: "no content: first token time is the end",
			ev: completion.Event{Done: true, Usage: completion.Usage{PromptTokens: 3, CompletionTokens: 2},
				KV: &completion.KVReport{Policy: "h2o", PrefillMs: 40}},
			startAgo: 2 * time.Second, policy: "h2o",
			want: map[string]obs{ttft: {1, 2}, e2e: {1, 2}, qt: {1, 0}, enc: {1, 0.04}},
		},
		{
			name:     "empty policy name is full",
			ev:       completion.Event{Done: true, Usage: completion.Usage{CompletionTokens: 3}, KV: &completion.KVReport{}},
			startAgo: time.Second, tokAgo: time.Second, policy: "full",
			want: map[string]obs{ttft: {1, 0}, itl: {1, 0.5}, e2e: {1, 1}, qt: {1, 0}, enc: {1, 0}},
			rate: true,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mt := newMetrics(newFake())
			now := time.Now()
			var firstTok time.Time
			if c.tokAgo > 0 {
				firstTok = now.Add(-c.tokAgo)
			}
			rate := mt.completed(c.ev, now.Add(-c.startAgo), firstTok)
			if (rate > 0) != c.rate {
				t.Errorf("rate %v, want > 0: %v", rate, c.rate)
			}
			w := httptest.NewRecorder()
			mt.handler.ServeHTTP(w, httptest.NewRequest("GET", "/metrics", nil))
			m := parseMetrics(t, w.Body.String())
			for _, name := range []string{ttft, itl, e2e, qt, enc} {
				for _, p := range knownPolicies {
					k := name + `_count{policy="` + p + `"}`
					w, ok := c.want[name]
					if p != c.policy || !ok {
						if m[k] != 0 {
							t.Errorf("%s = %v, want 0", k, m[k])
						}
						continue
					}
					if m[k] != w.count {
						t.Errorf("%s = %v, want %v", k, m[k], w.count)
					}
					sum := m[name+`_sum{policy="`+p+`"}`]
					if math.Abs(sum-w.sum) > 0.25 {
						t.Errorf("%s_sum = %v, want about %v", name, sum, w.sum)
					}
				}
			}
			if tok := m["elasticserve_completion_tokens_total"]; tok != float64(c.ev.Usage.CompletionTokens) {
				t.Errorf("completion tokens %v", tok)
			}
		})
	}
}

// An observation lands in the right bucket: 1.5 s of queueing is above the
// 1 s bucket and within the 2.5 s one.
func TestMetricsQueueBucket(t *testing.T) {
	fb := newFake()
	fb.events = okEvents("a", "b")
	fb.events[len(fb.events)-1].QueueMs = 1500
	h := newHandler(t, testOptions(), fb)
	if w := postChat(h, chatBody(t, map[string]any{})); w.Code != 200 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	m := parseMetrics(t, do(h, "GET", "/metrics", "").Body.String())
	for le, want := range map[string]float64{"1": 0, "2.5": 1, "+Inf": 1} {
		k := `elasticserve_queue_time_seconds_bucket{policy="elastic",le="` + le + `"}`
		if got, ok := m[k]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, want)
		}
	}
}

// A failed request is not observed in the latency histograms.
func TestMetricsFailedRequestNotObserved(t *testing.T) {
	for _, stream := range []bool{false, true} {
		fb := newFake()
		fb.events = []completion.Event{{Text: "x"}, {Done: true, Err: completion.ErrShuttingDown,
			KV: &completion.KVReport{Policy: "elastic"}}}
		h := newHandler(t, testOptions(), fb)
		postChat(h, chatBody(t, map[string]any{"stream": stream}))
		m := parseMetrics(t, do(h, "GET", "/metrics", "").Body.String())
		if n := m[`elasticserve_e2e_request_latency_seconds_count{policy="elastic"}`]; n != 0 {
			t.Errorf("stream %v: e2e count %v after a failure", stream, n)
		}
		if m["elasticserve_request_errors_total"] != 1 {
			t.Errorf("stream %v: errors %v", stream, m["elasticserve_request_errors_total"])
		}
	}
}

// Engine gauges are read from Backend.Stats at each scrape.
func TestMetricsEngineGauges(t *testing.T) {
	cases := []struct {
		name  string
		stats completion.Stats
		slots int // BackendInfo.Slots
		want  map[string]float64
		// absent: series that must not be reported
		absent []string
	}{
		{
			name:  "busy",
			stats: completion.Stats{QueueDepth: 3, SlotsBusy: 2, SlotsTotal: 8, KVCellsUsed: 1024, KVCellsTotal: 4096, KVInvariantFailures: 2},
			want: map[string]float64{"elasticserve_queue_depth": 3, "elasticserve_slots_busy": 2, "elasticserve_requests_running": 2,
				"elasticserve_slots_total": 8, "elasticserve_kv_cells_used": 1024, "elasticserve_kv_cells_total": 4096,
				"elasticserve_kv_cache_usage_ratio": 0.25, "elasticserve_kv_invariant_failures_total": 2},
			absent: []string{`elasticserve_kv_cells_used_by_policy{policy="full"}`},
		},
		{
			name:  "no total: ratio 0, slots from Info",
			stats: completion.Stats{KVCellsUsed: 5},
			slots: 6,
			want:  map[string]float64{"elasticserve_kv_cache_usage_ratio": 0, "elasticserve_slots_total": 6, "elasticserve_requests_running": 0},
		},
		{
			name:  "full pool",
			stats: completion.Stats{KVCellsUsed: 4096, KVCellsTotal: 4096},
			want:  map[string]float64{"elasticserve_kv_cache_usage_ratio": 1},
		},
		{
			name: "per policy",
			stats: completion.Stats{KVCellsUsed: 70, KVCellsTotal: 100,
				KVCellsByPolicy: map[string]int{"elastic": 40, "full": 30, "h2o": 0, "local": 0}},
			want: map[string]float64{
				`elasticserve_kv_cells_used_by_policy{policy="elastic"}`: 40,
				`elasticserve_kv_cells_used_by_policy{policy="full"}`:    30,
				`elasticserve_kv_cells_used_by_policy{policy="h2o"}`:     0,
				`elasticserve_kv_cells_used_by_policy{policy="local"}`:   0,
				"elasticserve_kv_cache_usage_ratio":                      0.7,
			},
		},
		{
			name: "host tier",
			stats: completion.Stats{HostCache: completion.TierStats{Bytes: 1 << 20, Entries: 3, Stored: 5, Hits: 2, Misses: 1,
				Evictions: 2, Failures: 0, RestoredTokens: 700}},
			want: map[string]float64{
				`elasticserve_kv_tier_bytes{tier="host"}`:                 1 << 20,
				`elasticserve_kv_tier_conversations{tier="host"}`:         3,
				`elasticserve_kv_tier_stored_total{tier="host"}`:          5,
				`elasticserve_kv_tier_hits_total{tier="host"}`:            2,
				`elasticserve_kv_tier_misses_total{tier="host"}`:          1,
				`elasticserve_kv_tier_evictions_total{tier="host"}`:       2,
				`elasticserve_kv_tier_failures_total{tier="host"}`:        0,
				`elasticserve_kv_tier_restored_tokens_total{tier="host"}`: 700,
				`elasticserve_kv_tier_bytes{tier="disk"}`:                 0,
			},
		},
		{
			name:  "disk tier",
			stats: completion.Stats{DiskCache: completion.TierStats{Bytes: 5 << 20, Entries: 2, Hits: 1, Failures: 3}},
			want: map[string]float64{
				`elasticserve_kv_tier_bytes{tier="disk"}`:          5 << 20,
				`elasticserve_kv_tier_conversations{tier="disk"}`:  2,
				`elasticserve_kv_tier_hits_total{tier="disk"}`:     1,
				`elasticserve_kv_tier_failures_total{tier="disk"}`: 3,
			},
		},
		{
			name:  "per policy, only some reported",
			stats: completion.Stats{KVCellsByPolicy: map[string]int{"local": 9}},
			want: map[string]float64{
				`elasticserve_kv_cells_used_by_policy{policy="local"}`:   9,
				`elasticserve_kv_cells_used_by_policy{policy="elastic"}`: 0,
			},
		},
	}
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fb.mu.Lock()
			fb.stats, fb.info.Slots = c.stats, c.slots
			fb.mu.Unlock()
			// The same handler follows the backend from scrape to scrape.
			m := parseMetrics(t, do(h, "GET", "/metrics", "").Body.String())
			for k, v := range c.want {
				if got, ok := m[k]; !ok || math.Abs(got-v) > 1e-12 {
					t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
				}
			}
			for _, k := range c.absent {
				if _, ok := m[k]; ok {
					t.Errorf("%s reported", k)
				}
			}
		})
	}
}

func TestUsageRatio(t *testing.T) {
	for _, c := range []struct {
		used, total int
		want        float64
	}{{0, 0, 0}, {5, 0, 0}, {0, 10, 0}, {5, 10, 0.5}, {10, 10, 1}, {12, 10, 1}, {-1, 10, 0}} {
		if got := usageRatio(c.used, c.total); got != c.want {
			t.Errorf("usageRatio(%d, %d) = %v, want %v", c.used, c.total, got, c.want)
		}
	}
}

// The metrics handler is the one behind the API key.
func TestMetricsServedByHandler(t *testing.T) {
	opts := testOptions()
	opts.APIKey = "sk-k"
	h := newHandler(t, opts, newFake())
	if w := do(h, "GET", "/metrics", ""); w.Code != http.StatusUnauthorized {
		t.Fatalf("no key: %d", w.Code)
	}
	r := httptest.NewRequest("GET", "/metrics", nil)
	r.Header.Set("Authorization", "Bearer sk-k")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != 200 || !strings.Contains(w.Body.String(), "# TYPE elasticserve_time_to_first_token_seconds histogram") {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}
