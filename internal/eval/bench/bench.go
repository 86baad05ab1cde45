// Package bench is a serving benchmark for OpenAI-compatible chat endpoints
// (elasticserve, Ollama, llama-server, vLLM, ...): a fixed, seeded set of
// prompts is streamed at each concurrency level, and time to first token,
// inter-token latency, end-to-end latency and throughput are measured on the
// client. When the server is elasticserve, the kv_cache extension of the final
// usage chunk (peak and final cells, bytes saved) is reported too.
//
// It is pure Go (net/http and its own SSE reader): no cgo, no model.
package bench

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/openai/openai-go/v3/packages/ssestream"
)

// Options say which server to load and how.
type Options struct {
	// URL is the API base, e.g. http://127.0.0.1:8080/v1; requests go to
	// URL + "/chat/completions".
	URL    string
	Model  string // the request's model field (Ollama needs it; elasticserve ignores it)
	APIKey string // sent as "Authorization: Bearer KEY" when not empty
	// Label names the server in the table's first column (default: the URL's host).
	Label string

	Concurrency []int // requests in flight at each level, run in this order
	Requests    int   // requests per level
	MaxTokens   int   // max_tokens of every request
	PromptWords int   // words of filler text in each prompt (about 1.3 tokens each)
	Seed        int64 // the prompt set is a function of Seed only

	// Image, when not empty, is sent with every prompt as a data URL of type
	// ImageType (detected from the bytes when empty).
	Image     []byte
	ImageType string

	// Extra fields merged into every request body (e.g. elasticserve's
	// elastic_cache); they override the benchmark's own fields.
	Extra map[string]any

	Warmup  int           // requests sent (one at a time) before the first level, not measured
	Timeout time.Duration // per request; 0: none
	Client  *http.Client  // nil: a client without a timeout
	// Progress, when set, receives a line per finished level.
	Progress io.Writer
}

// Defaults of the fields Run fills in when they are zero.
const (
	DefaultRequests    = 16
	DefaultMaxTokens   = 64
	DefaultPromptWords = 48
)

// DefaultConcurrency is used when Options.Concurrency is empty.
var DefaultConcurrency = []int{1, 4, 16}

// KVCache is elasticserve's kv_cache extension (the fields the benchmark reads).
type KVCache struct {
	Policy     string  `json:"policy"`
	Budget     float64 `json:"budget"`
	PeakCells  int     `json:"peak_cells"`
	FinalCells int     `json:"final_cells"`
	BytesSaved int64   `json:"bytes_saved"`
}

// Sample is what one request measured.
type Sample struct {
	TTFT time.Duration // request sent to first content delta
	E2E  time.Duration // request sent to end of stream
	// Gaps between consecutive content deltas.
	Gaps []time.Duration
	// PromptTokens and OutputTokens come from the usage chunk; without one,
	// OutputTokens is the number of content deltas and UsageMissing is set.
	PromptTokens, OutputTokens int
	UsageMissing               bool
	Deltas                     int      // chunks with content (TTFT is 0 when none came)
	KV                         *KVCache // nil unless the server sent kv_cache
	Err                        error    // nil when the request succeeded
}

// Dist is the distribution of a latency in milliseconds (nearest-rank percentiles).
type Dist struct {
	N                  int
	P50, P90, P99, Avg float64
}

// Level is the result of one concurrency level.
type Level struct {
	Concurrency int
	Requests    int // sent
	OK, Failed  int
	// Errors counts the failed requests by kind ("http 429", "stream error",
	// "disconnected", ...); FirstError is one full message.
	Errors     map[string]int
	FirstError string
	Wall       time.Duration // first request sent to last request finished
	TTFT, ITL  Dist
	// TPOT is each request's time per output token after the first:
	// (E2E - TTFT) / (output tokens - 1), from the usage count, so it does not
	// depend on how many tokens a server puts in one chunk (ITL does).
	TPOT Dist
	E2E  Dist
	// Throughput over Wall, successful requests only.
	ReqPerSec, OutTokPerSec    float64
	PromptTokens, OutputTokens int // totals of the successful requests
	UsageMissing               int // successful requests without a usage chunk
	// KV averages the kv_cache reports of the successful requests; nil when none
	// had one (a server other than elasticserve).
	KV *KVSummary
}

// KVSummary averages kv_cache over the requests that reported it.
type KVSummary struct {
	Reports                           int
	Policy                            string // the first report's policy and budget
	Budget                            float64
	PeakCells, FinalCells, BytesSaved float64 // means
}

// Result is the whole run.
type Result struct {
	Label, URL, Model string
	Levels            []Level
}

// Prompts returns the benchmark's n prompts for seed: a fixed question
// followed by words of filler drawn with seed, each prompt different from the
// others from its first word, so no two requests share a prompt prefix that a
// server could reuse.
func Prompts(seed int64, n, words int) []string {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x62656e6368)) // "bench"
	out := make([]string, n)
	for i := range out {
		var b strings.Builder
		fmt.Fprintf(&b, "%s %s", topics[rng.IntN(len(topics))], fillerWords[rng.IntN(len(fillerWords))])
		for range max(words, 1) - 1 {
			b.WriteByte(' ')
			b.WriteString(fillerWords[rng.IntN(len(fillerWords))])
		}
		b.WriteString(". ")
		b.WriteString(questions[i%len(questions)])
		out[i] = b.String()
	}
	return out
}

var topics = []string{"Notes:", "Report:", "Observation:", "Log:", "Summary:", "Draft:", "Memo:", "Entry:"}

var fillerWords = strings.Fields(`the a red blue green yellow circle square triangle shape picture left right top
bottom middle large small next to above below near far one two three four color size
place every each there is are with and of in on at field river house tree road cloud
bright dark light shadow corner edge center line point area part side front back`)

var questions = []string{
	"Describe the picture in one sentence.",
	"What color is the largest shape?",
	"How many shapes are there, and where are they?",
	"Which shape is closest to the top left corner?",
	"Summarise the notes above.",
	"What is in the middle of the picture?",
}

// Run measures each concurrency level in turn. It fails only when the
// options are wrong or the warmup fails; failed requests during a level are
// counted in that level.
func Run(ctx context.Context, o Options) (*Result, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	endpoint := strings.TrimRight(o.URL, "/") + "/chat/completions"
	imageURL := ""
	if len(o.Image) > 0 {
		typ := o.ImageType
		if typ == "" {
			typ = http.DetectContentType(o.Image)
		}
		imageURL = "data:" + typ + ";base64," + base64.StdEncoding.EncodeToString(o.Image)
	}
	// Each level sends prompts of its own: a server that keeps finished
	// conversations (prompt caching, a host-memory tier) would otherwise answer a
	// later level from what an earlier one left, and the levels would measure
	// different things. Level 0's prompts are those of the seed alone.
	levelBodies := make([][][]byte, len(o.Concurrency))
	for l := range levelBodies {
		if levelBodies[l], err = requestBodies(o, Prompts(o.Seed+int64(l)*levelSeedStride, o.Requests, o.PromptWords), imageURL); err != nil {
			return nil, err
		}
	}
	if o.Warmup > 0 { // a seed no level uses
		warm, err := requestBodies(o, Prompts(o.Seed+1_000_003, o.Warmup, o.PromptWords), imageURL)
		if err != nil {
			return nil, err
		}
		for i, b := range warm {
			if s := do(ctx, o, endpoint, b); s.Err != nil {
				return nil, fmt.Errorf("bench: warmup request %d: %w", i+1, s.Err)
			}
		}
	}
	res := &Result{Label: o.Label, URL: o.URL, Model: o.Model}
	if res.Label == "" {
		if u, err := url.Parse(o.URL); err == nil && u.Host != "" {
			res.Label = u.Host
		} else {
			res.Label = o.URL
		}
	}
	for l, c := range o.Concurrency {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		samples, wall := runLevel(ctx, o, endpoint, levelBodies[l], c)
		lv := summarize(c, samples, wall)
		res.Levels = append(res.Levels, lv)
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "bench: concurrency %d: %d/%d ok, %.2f req/s, %.1f output tok/s\n",
				c, lv.OK, lv.Requests, lv.ReqPerSec, lv.OutTokPerSec)
			if lv.FirstError != "" {
				fmt.Fprintf(o.Progress, "bench: concurrency %d: %d failed (%s); first: %s\n", c, lv.Failed, errorKinds(lv.Errors), lv.FirstError)
			}
		}
	}
	return res, nil
}

// withDefaults checks o and fills in what it leaves unset.
func (o Options) withDefaults() (Options, error) {
	if o.URL == "" {
		return o, errors.New("bench: no URL")
	}
	if o.Requests <= 0 {
		o.Requests = DefaultRequests
	}
	if o.MaxTokens <= 0 {
		o.MaxTokens = DefaultMaxTokens
	}
	if o.PromptWords <= 0 {
		o.PromptWords = DefaultPromptWords
	}
	if len(o.Concurrency) == 0 {
		o.Concurrency = DefaultConcurrency
	}
	for _, c := range o.Concurrency {
		if c <= 0 {
			return o, fmt.Errorf("bench: concurrency %d is not positive", c)
		}
	}
	if o.Client == nil {
		o.Client = &http.Client{}
	}
	return o, nil
}

// requestBodies are the request bodies of prompts.
func requestBodies(o Options, prompts []string, imageURL string) ([][]byte, error) {
	out := make([][]byte, len(prompts))
	for i, p := range prompts {
		b, err := requestBody(o, p, imageURL)
		if err != nil {
			return nil, err
		}
		out[i] = b
	}
	return out, nil
}

// levelSeedStride separates the prompt seeds of the levels (and of the warmup,
// which uses Seed+1_000_003) for any realistic number of levels.
const levelSeedStride = 7_919

// requestBody is the JSON of one streaming chat request.
func requestBody(o Options, prompt, imageURL string) ([]byte, error) {
	var content any = prompt
	if imageURL != "" {
		content = []any{
			map[string]any{"type": "text", "text": prompt},
			map[string]any{"type": "image_url", "image_url": map[string]any{"url": imageURL}},
		}
	}
	body := map[string]any{
		"messages":       []any{map[string]any{"role": "user", "content": content}},
		"max_tokens":     o.MaxTokens,
		"temperature":    0,
		"seed":           o.Seed,
		"stream":         true,
		"stream_options": map[string]any{"include_usage": true},
	}
	if o.Model != "" {
		body["model"] = o.Model
	}
	for k, v := range o.Extra {
		body[k] = v
	}
	return json.Marshal(body)
}

// runLevel sends the requests with c in flight and returns their samples in
// request order and the wall time from the first send to the last finish.
func runLevel(ctx context.Context, o Options, endpoint string, bodies [][]byte, c int) ([]Sample, time.Duration) {
	samples := make([]Sample, len(bodies))
	next := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	for range min(c, len(bodies)) {
		wg.Go(func() {
			for i := range next {
				samples[i] = do(ctx, o, endpoint, bodies[i])
			}
		})
	}
	for i := range bodies {
		next <- i
	}
	close(next)
	wg.Wait()
	return samples, time.Since(start)
}

// HTTPError is a non-200 answer.
type HTTPError struct {
	Status     int
	Message    string // the OpenAI error message, or the start of the body
	RetryAfter string
}

func (e *HTTPError) Error() string {
	s := fmt.Sprintf("HTTP %d", e.Status)
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.RetryAfter != "" {
		s += " (Retry-After " + e.RetryAfter + ")"
	}
	return s
}

// StreamError is an error event in the stream ({"error": {...}} as data).
type StreamError struct{ Message string }

func (e *StreamError) Error() string { return "error event in the stream: " + e.Message }

// errNoDone is a stream that ended without "data: [DONE]".
var errNoDone = errors.New("the stream ended before data: [DONE] (disconnected)")

// chunk is the part of a chat.completion.chunk the benchmark reads.
type chunk struct {
	Choices []struct {
		Delta struct {
			Content          string `json:"content"`
			ReasoningContent string `json:"reasoning_content"` // llama-server, vLLM
			Reasoning        string `json:"reasoning"`         // Ollama
		} `json:"delta"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	KVCache *KVCache `json:"kv_cache"`
	Error   *struct {
		Message string `json:"message"`
	} `json:"error"`
}

// do sends one request and reads its stream.
func do(ctx context.Context, o Options, endpoint string, body []byte) (s Sample) {
	if o.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.Timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		s.Err = err
		return s
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	if o.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+o.APIKey)
	}
	start := time.Now()
	defer func() { s.E2E = time.Since(start) }()
	resp, err := o.Client.Do(req)
	if err != nil {
		s.Err = err
		return s
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		s.Err = &HTTPError{Status: resp.StatusCode, Message: errorMessage(b), RetryAfter: resp.Header.Get("Retry-After")}
		return s
	}
	readStream(ssestream.NewDecoder(resp), start, &s)
	return s
}

// readStream reads a chat-completion stream's events (openai-go's SSE
// decoder) until data: [DONE], timing each chunk that carries answer text.
func readStream(events ssestream.Decoder, start time.Time, s *Sample) {
	var last time.Time
	deltas := 0
	for {
		if !events.Next() {
			s.Err = events.Err()
			if s.Err == nil {
				s.Err = errNoDone
			}
			return
		}
		data := strings.TrimSuffix(string(events.Event().Data), "\n") // the decoder ends each data line with "\n"
		if strings.TrimSpace(data) == "[DONE]" {
			break
		}
		var c chunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			s.Err = fmt.Errorf("bad chunk %.200q: %w", data, err)
			return
		}
		if c.Error != nil {
			s.Err = &StreamError{Message: c.Error.Message}
			return
		}
		now := time.Now()
		if c.hasText() {
			if deltas == 0 {
				s.TTFT = now.Sub(start)
			} else {
				s.Gaps = append(s.Gaps, now.Sub(last))
			}
			last = now
			deltas++
		}
		if c.Usage != nil {
			s.PromptTokens, s.OutputTokens = c.Usage.PromptTokens, c.Usage.CompletionTokens
		}
		if c.KVCache != nil {
			s.KV = c.KVCache
		}
	}
	if s.OutputTokens == 0 && s.PromptTokens == 0 {
		s.UsageMissing = true
		s.OutputTokens = deltas
	}
	s.Deltas = deltas
}

// hasText reports whether a choice of c carries answer (or reasoning) text:
// one arrival per chunk.
func (c *chunk) hasText() bool {
	for _, ch := range c.Choices {
		if ch.Delta.Content != "" || ch.Delta.ReasoningContent != "" || ch.Delta.Reasoning != "" {
			return true
		}
	}
	return false
}

// errorMessage is the message of an OpenAI error body, or the body's start.
func errorMessage(b []byte) string {
	var e struct {
		Error json.RawMessage `json:"error"`
	}
	if json.Unmarshal(b, &e) == nil && len(e.Error) > 0 {
		var obj struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(e.Error, &obj) == nil && obj.Message != "" {
			return obj.Message
		}
		var str string // Ollama's native errors: {"error": "text"}
		if json.Unmarshal(e.Error, &str) == nil && str != "" {
			return str
		}
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// errorKind names a failure for Level.Errors.
func errorKind(err error) string {
	var he *HTTPError
	var se *StreamError
	switch {
	case errors.As(err, &he):
		return fmt.Sprintf("http %d", he.Status)
	case errors.As(err, &se):
		return "stream error"
	case errors.Is(err, errNoDone), errors.Is(err, io.ErrUnexpectedEOF):
		return "disconnected"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	default:
		return "other"
	}
}

// errorKinds renders Level.Errors as "http 429: 2; stream error: 1", sorted.
func errorKinds(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s: %d", k, m[k])
	}
	return strings.Join(parts, "; ")
}

func summarize(c int, samples []Sample, wall time.Duration) Level {
	lv := Level{Concurrency: c, Requests: len(samples), Wall: wall, Errors: map[string]int{}}
	var ttft, itl, tpot, e2e []time.Duration
	var kv KVSummary
	for _, s := range samples {
		if s.Err != nil {
			lv.Failed++
			lv.Errors[errorKind(s.Err)]++
			if lv.FirstError == "" {
				lv.FirstError = s.Err.Error()
			}
			continue
		}
		lv.OK++
		lv.PromptTokens += s.PromptTokens
		lv.OutputTokens += s.OutputTokens
		if s.UsageMissing {
			lv.UsageMissing++
		}
		if s.Deltas > 0 {
			ttft = append(ttft, s.TTFT)
			if s.OutputTokens > 1 {
				tpot = append(tpot, (s.E2E-s.TTFT)/time.Duration(s.OutputTokens-1))
			}
		}
		itl = append(itl, s.Gaps...)
		e2e = append(e2e, s.E2E)
		if s.KV != nil {
			if kv.Reports == 0 {
				kv.Policy, kv.Budget = s.KV.Policy, s.KV.Budget
			}
			kv.Reports++
			kv.PeakCells += float64(s.KV.PeakCells)
			kv.FinalCells += float64(s.KV.FinalCells)
			kv.BytesSaved += float64(s.KV.BytesSaved)
		}
	}
	lv.TTFT, lv.ITL, lv.TPOT, lv.E2E = dist(ttft), dist(itl), dist(tpot), dist(e2e)
	if secs := wall.Seconds(); secs > 0 {
		lv.ReqPerSec = float64(lv.OK) / secs
		lv.OutTokPerSec = float64(lv.OutputTokens) / secs
	}
	if kv.Reports > 0 {
		n := float64(kv.Reports)
		kv.PeakCells, kv.FinalCells, kv.BytesSaved = kv.PeakCells/n, kv.FinalCells/n, kv.BytesSaved/n
		lv.KV = &kv
	}
	return lv
}

func dist(d []time.Duration) Dist {
	if len(d) == 0 {
		return Dist{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	var sum time.Duration
	for _, x := range s {
		sum += x
	}
	return Dist{N: len(s), P50: ms(percentile(s, 0.5)), P90: ms(percentile(s, 0.9)), P99: ms(percentile(s, 0.99)),
		Avg: ms(sum) / float64(len(s))}
}

// percentile is the nearest-rank percentile of sorted (not empty).
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
