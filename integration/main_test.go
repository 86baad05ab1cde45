package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// Set by TestMain.
var (
	repoRoot   string // folder holding go.mod
	binPath    string // the freshly built server
	modelPath  string // tiny generated GGUF model
	mmprojPath string // its vision projector
)

const modulePath = "github.com/elasticserve/elasticserve"

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	root, err := findRepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	repoRoot = root
	dir, err := os.MkdirTemp("", "elasticserve-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	defer os.RemoveAll(dir)

	// Build the real binary once. The environment is inherited, so the cgo
	// flags (eval "$(make -s env)") and the build cache are the caller's.
	binPath = filepath.Join(dir, "elasticserve")
	goCmd, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: the go command is not on PATH:", err)
		return 1
	}
	build := exec.Command(goCmd, "build", "-o", binPath, "./cmd/elasticserve")
	build.Dir = root
	build.Env = os.Environ()
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: building the server failed: %v\n%s", err, out)
		return 1
	}

	modelPath, mmprojPath, err = testmodel.Ensure(testmodel.DefaultOptions())
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: test model:", err)
		return 1
	}

	code := m.Run()
	stopSharedServers()
	return code
}

// findRepoRoot walks up from the working directory to this module's go.mod.
func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module "+modulePath+"\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("cannot find the repository root (go.mod of " + modulePath + ")")
		}
		dir = parent
	}
}

// ---- the server process ----

// server is one running elasticserve process.
type server struct {
	name string
	URL  string // http://127.0.0.1:PORT
	cmd  *exec.Cmd
	log  *tailBuffer

	exited   chan struct{} // closed when the process has exited
	exitCode int           // valid once exited is closed
	stopOnce sync.Once
}

// serverSpec says how to start a server: with or without the vision
// projector, and extra flags.
type serverSpec struct {
	vision bool
	flags  []string
	model  string // GGUF to serve; default the tiny test model (modelPath)
	mmproj string // projector loaded with vision; default the test model's (mmprojPath)
}

// startServer launches the binary on a free loopback port (--addr
// 127.0.0.1:0; the URL is read from the "elasticserve listening" log line)
// and waits until GET /ready answers 200. The log level must stay at info
// or below, or the URL line is not printed.
func startServer(name string, spec serverSpec) (*server, error) {
	model := spec.model
	if model == "" {
		model = modelPath
	}
	args := []string{"--model", model, "--addr", "127.0.0.1:0", "--threads", "1", "--log-format", "json"}
	if spec.vision {
		mmproj := spec.mmproj
		if mmproj == "" {
			mmproj = mmprojPath
		}
		args = append(args, "--mmproj", mmproj)
	}
	args = append(args, spec.flags...)
	cmd := exec.Command(binPath, args...)
	cmd.Dir = repoRoot
	for _, kv := range os.Environ() { // settings for the server come from flags only
		if !strings.HasPrefix(kv, "ELASTICSERVE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{name: name, cmd: cmd, log: newTailBuffer(1 << 20), exited: make(chan struct{})}
	urlCh := make(chan string, 1)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			line := sc.Text()
			s.log.WriteLine(line)
			if strings.HasPrefix(line, "{") && strings.Contains(line, "elasticserve listening") {
				var rec struct {
					URL string `json:"url"`
				}
				if json.Unmarshal([]byte(line), &rec) == nil && rec.URL != "" {
					select {
					case urlCh <- rec.URL:
					default:
					}
				}
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	go func() {
		<-readerDone // Wait closes the pipe; read everything first
		err := cmd.Wait()
		s.exitCode = 0
		if err != nil {
			s.exitCode = -1
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				s.exitCode = ee.ExitCode()
			}
		}
		close(s.exited)
	}()

	select {
	case s.URL = <-urlCh:
	case <-s.exited:
		return nil, fmt.Errorf("server %s exited (code %d) before listening:\n%s", name, s.exitCode, s.log.Tail(8<<10))
	case <-time.After(2 * time.Minute):
		s.kill()
		return nil, fmt.Errorf("server %s did not log its URL within 2 minutes:\n%s", name, s.log.Tail(8<<10))
	}
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get(s.URL + "/ready")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s, nil
			}
		}
		if time.Now().After(deadline) {
			s.kill()
			return nil, fmt.Errorf("server %s never became ready:\n%s", name, s.log.Tail(8<<10))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// launch starts a server owned by one test; it is stopped (SIGTERM) when
// the test ends.
func launch(tb testing.TB, spec serverSpec) *server {
	tb.Helper()
	s, err := startServer(tb.Name(), spec)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.stop(30 * time.Second) })
	s.watch(tb)
	return s
}

// Servers shared by several tests, keyed by name; stopped after all tests.
var (
	sharedMu sync.Mutex
	shared   = map[string]*server{}
)

// Flag sets of the shared servers.
var (
	// mainSpec serves the SDK tests and most of the catalogue: 8 slots of 512
	// cells, small image and body limits so the 413 cases stay cheap, and no
	// playground page (TestPlaygroundOff).
	mainSpec = serverSpec{vision: true, flags: []string{
		"--parallel", "8", "--ctx-size", "4096", "--max-image-bytes", "65536", "--max-body-bytes", "1048576", "--ui=false",
	}}
	// restrictedSpec has no vision projector and requires an API key.
	restrictedSpec = serverSpec{vision: false, flags: []string{
		"--parallel", "1", "--ctx-size", "1024", "--api-key", testAPIKey,
	}}
)

const testAPIKey = "sk-integration-test-key-0123456789"

// demoSpec serves the bundled demo model (models/demo, in the repository),
// whose answers are known: the tests that need a model that really reads
// the picture ask it. Its slots have the cells of the default flags.
func demoSpec() serverSpec {
	dir := filepath.Join(repoRoot, "models", "demo")
	return serverSpec{vision: true, model: filepath.Join(dir, "model.gguf"), mmproj: filepath.Join(dir, "mmproj.gguf"),
		flags: []string{"--parallel", "2", "--ctx-size", "2048"}}
}

func sharedServer(tb testing.TB, name string, spec serverSpec) *server {
	tb.Helper()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	s := shared[name]
	if s != nil && s.hasExited() {
		tb.Fatalf("shared server %q exited earlier (code %d):\n%s", name, s.exitCode, s.log.Tail(8<<10))
	}
	if s == nil {
		var err error
		if s, err = startServer(name, spec); err != nil {
			tb.Fatal(err)
		}
		shared[name] = s
	}
	s.watch(tb)
	return s
}

func stopSharedServers() {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	for name, s := range shared {
		if code := s.stop(30 * time.Second); code != 0 {
			fmt.Fprintf(os.Stderr, "integration: shared server %q exited with code %d:\n%s\n", name, code, s.log.Tail(8<<10))
		}
	}
}

// watch makes the test fail if the server died during it, and shows the
// server's log when the test failed.
func (s *server) watch(tb testing.TB) {
	mark := s.log.Len()
	tb.Cleanup(func() {
		if s.hasExited() && !s.stopping() {
			tb.Errorf("server %q exited during the test (code %d)", s.name, s.exitCode)
		}
		if tb.Failed() {
			tb.Logf("server %q log during the test (tail):\n%s", s.name, s.log.Since(mark, 12<<10))
		}
	})
}

func (s *server) hasExited() bool {
	select {
	case <-s.exited:
		return true
	default:
		return false
	}
}

func (s *server) pid() int { return s.cmd.Process.Pid }

var stoppingMu sync.Mutex
var stoppingSet = map[*server]bool{}

func (s *server) stopping() bool {
	stoppingMu.Lock()
	defer stoppingMu.Unlock()
	return stoppingSet[s]
}

func (s *server) markStopping() {
	stoppingMu.Lock()
	stoppingSet[s] = true
	stoppingMu.Unlock()
}

// signal sends sig to the server (and marks it as expected to exit).
func (s *server) signal(sig os.Signal) error {
	s.markStopping()
	return s.cmd.Process.Signal(sig)
}

// wait waits up to d for the process to exit and returns its exit code, or
// false when it is still running.
func (s *server) wait(d time.Duration) (int, bool) {
	select {
	case <-s.exited:
		return s.exitCode, true
	case <-time.After(d):
		return 0, false
	}
}

// stop sends SIGTERM, waits up to grace, then kills; it returns the exit code.
func (s *server) stop(grace time.Duration) int {
	s.stopOnce.Do(func() {
		if s.hasExited() {
			return
		}
		_ = s.signal(syscall.SIGTERM)
		if _, ok := s.wait(grace); !ok {
			s.kill()
		}
	})
	<-s.exited
	return s.exitCode
}

func (s *server) kill() {
	s.markStopping()
	_ = s.cmd.Process.Kill()
}

// tailBuffer keeps the last max bytes of a log, line by line.
type tailBuffer struct {
	mu      sync.Mutex
	buf     []byte
	dropped int // bytes discarded from the front
	max     int
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (b *tailBuffer) WriteLine(line string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, line...)
	b.buf = append(b.buf, '\n')
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0:0], b.buf[over:]...)
		b.dropped += over
	}
}

// Len is the total number of bytes ever written (a mark for Since).
func (b *tailBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.dropped + len(b.buf)
}

// Since returns what was written after mark, at most the last n bytes.
func (b *tailBuffer) Since(mark, n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	start := max(mark-b.dropped, 0, len(b.buf)-n)
	return string(b.buf[min(start, len(b.buf)):])
}

func (b *tailBuffer) Tail(n int) string { return b.Since(0, n) }

func (b *tailBuffer) String() string { return b.Since(0, 1<<30) }

// ---- HTTP helpers ----

var httpClient = &http.Client{Timeout: 2 * time.Minute}

type response struct {
	Status int
	Header http.Header
	Body   []byte
}

// request sends one request and reads the whole answer. headers may set
// Content-Type (default application/json when body is non-nil).
func request(tb testing.TB, method, url string, body []byte, headers map[string]string) response {
	tb.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	return send(tb, method, url, rd, headers)
}

// send is request with any body reader (nil: no body); an empty header value deletes it.
func send(tb testing.TB, method, url string, rd io.Reader, headers map[string]string) response {
	tb.Helper()
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		tb.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		if v == "" {
			req.Header.Del(k)
		} else {
			req.Header.Set(k, v)
		}
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: reading the body: %v", method, url, err)
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b}
}

func mustJSON(tb testing.TB, v any) []byte {
	tb.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// textChat is the body of a small text-only chat request.
func textChat(text string, maxTokens int, extra map[string]any) map[string]any {
	m := map[string]any{
		"messages":    []any{map[string]any{"role": "user", "content": text}},
		"max_tokens":  maxTokens,
		"temperature": 0,
	}
	for k, v := range extra {
		m[k] = v
	}
	return m
}

// apiError is the OpenAI error object.
type apiError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func (e apiError) param() string { return deref(e.Param) }
func (e apiError) code() string  { return deref(e.Code) }

func deref(p *string) string {
	if p == nil {
		return "<null>"
	}
	return *p
}

// parseError checks that body is exactly {"error":{"message","type","param","code"}}.
func parseError(tb testing.TB, body []byte) apiError {
	tb.Helper()
	var outer map[string]json.RawMessage
	if err := json.Unmarshal(body, &outer); err != nil {
		tb.Fatalf("error body is not JSON: %v: %q", err, body)
	}
	inner, ok := outer["error"]
	if !ok || len(outer) != 1 {
		tb.Fatalf("error body must be {\"error\": {...}} only, got %s", body)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(inner, &fields); err != nil {
		tb.Fatalf("error object is not a JSON object: %s", body)
	}
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := fields[k]; !ok {
			tb.Errorf("error object lacks %q: %s", k, body)
		}
	}
	var e apiError
	if err := json.Unmarshal(inner, &e); err != nil {
		tb.Fatalf("error object has wrong field types: %v: %s", err, body)
	}
	if e.Message == "" || e.Type == "" {
		tb.Errorf("error message and type must be non-empty: %s", body)
	}
	return e
}

// ---- SSE ----

// chunk is one streamed chat.completion.chunk (or an error event).
type chunk struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Role    string  `json:"role"`
			Content *string `json:"content"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
		TotalTokens      int `json:"total_tokens"`
	} `json:"usage"`
	KVCache map[string]any `json:"kv_cache"`
	Error   *apiError      `json:"error"`
}

// streamResult summarises one SSE response.
type streamResult struct {
	Status       int
	Header       http.Header
	Body         []byte // the whole body for non-200 answers
	Events       []string
	Text         string
	FinishReason string
	Usage        *struct{ Prompt, Completion int }
	Err          *apiError
	Done         bool // "data: [DONE]" seen
	ReadErr      error
}

// readSSE reads data: events from r. onEvent (optional) sees every parsed
// chunk; returning false stops reading early.
func readSSE(r io.Reader, res *streamResult, onEvent func(c *chunk) bool) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	var text strings.Builder
	defer func() { res.Text += text.String() }()
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, ":") {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			res.ReadErr = fmt.Errorf("unexpected SSE line %q", line)
			return
		}
		res.Events = append(res.Events, data)
		if data == "[DONE]" {
			res.Done = true
			continue
		}
		var c chunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			res.ReadErr = fmt.Errorf("bad chunk %q: %v", data, err)
			return
		}
		if c.Error != nil {
			res.Err = c.Error
		}
		for _, ch := range c.Choices {
			if ch.Delta.Content != nil {
				text.WriteString(*ch.Delta.Content)
			}
			if ch.FinishReason != nil {
				res.FinishReason = *ch.FinishReason
			}
		}
		if c.Usage != nil {
			res.Usage = &struct{ Prompt, Completion int }{c.Usage.PromptTokens, c.Usage.CompletionTokens}
		}
		if onEvent != nil && !onEvent(&c) {
			return
		}
	}
	res.ReadErr = sc.Err()
}

// stream posts a streaming chat request and reads the whole answer.
func stream(tb testing.TB, client *http.Client, url string, body map[string]any, headers map[string]string) streamResult {
	tb.Helper()
	body["stream"] = true
	req, err := http.NewRequest(http.MethodPost, url+"/v1/chat/completions", bytes.NewReader(mustJSON(tb, body)))
	if err != nil {
		tb.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		return streamResult{ReadErr: err}
	}
	defer resp.Body.Close()
	res := streamResult{Status: resp.StatusCode, Header: resp.Header}
	if resp.StatusCode != http.StatusOK {
		res.Body, res.ReadErr = io.ReadAll(resp.Body)
		return res
	}
	readSSE(resp.Body, &res, nil)
	return res
}

// ---- metrics ----

// metrics reads /metrics into "name{labels}" -> value.
func metrics(tb testing.TB, s *server, headers map[string]string) map[string]float64 {
	tb.Helper()
	r := request(tb, http.MethodGet, s.URL+"/metrics", nil, headers)
	if r.Status != http.StatusOK {
		tb.Fatalf("GET /metrics: %d %s", r.Status, r.Body)
	}
	return parseMetrics(tb, r.Body)
}

func parseMetrics(tb testing.TB, body []byte) map[string]float64 {
	tb.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			tb.Fatalf("bad metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			tb.Fatalf("bad metrics value in %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// waitIdle polls /metrics until no slot is busy, no request waits and no KV
// cell is in use, or fails after timeout.
func waitIdle(tb testing.TB, s *server, headers map[string]string, timeout time.Duration) map[string]float64 {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m := metrics(tb, s, headers)
		if m["elasticserve_slots_busy"] == 0 && m["elasticserve_kv_cells_used"] == 0 && m["elasticserve_queue_depth"] == 0 {
			return m
		}
		if time.Now().After(deadline) {
			tb.Fatalf("server not idle after %s: slots_busy=%v kv_cells_used=%v queue_depth=%v",
				timeout, m["elasticserve_slots_busy"], m["elasticserve_kv_cells_used"], m["elasticserve_queue_depth"])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ---- images ----

// makePNG draws a w x h image: background bg with a filled circle fg.
func makePNG(tb testing.TB, w, h int, bg, fg color.Color) []byte {
	tb.Helper()
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	cx, cy, r := w/2, h/2, min(w, h)/3
	for y := range h {
		for x := range w {
			c := bg
			if (x-cx)*(x-cx)+(y-cy)*(y-cy) <= r*r {
				c = fg
			}
			img.Set(x, y, c)
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func redCircle(tb testing.TB) []byte {
	return makePNG(tb, 48, 48, color.White, color.RGBA{R: 220, A: 255})
}

func blueCircle(tb testing.TB) []byte {
	return makePNG(tb, 48, 48, color.Black, color.RGBA{B: 220, G: 40, A: 255})
}

// percentile of sorted durations (nearest rank).
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func sortDurations(d []time.Duration) { sort.Slice(d, func(i, j int) bool { return d[i] < d[j] }) }
