package integration

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// sdkClient talks to s through the official OpenAI Go SDK.
func sdkClient(s *server, apiKey string) openai.Client {
	if apiKey == "" {
		apiKey = "unused"
	}
	return openai.NewClient(
		option.WithBaseURL(s.URL+"/v1"),
		option.WithAPIKey(apiKey),
		option.WithMaxRetries(0),
		option.WithRequestTimeout(2*time.Minute),
	)
}

// servedModel asks the server for its model id.
func servedModel(tb testing.TB, c openai.Client) string {
	tb.Helper()
	page, err := c.Models.List(context.Background())
	if err != nil {
		tb.Fatalf("models.list: %v", err)
	}
	if len(page.Data) != 1 {
		tb.Fatalf("models.list: want 1 model, got %d", len(page.Data))
	}
	return page.Data[0].ID
}

func dataURL(png []byte) string {
	return "data:image/png;base64," + base64.StdEncoding.EncodeToString(png)
}

func userText(text string) []openai.ChatCompletionMessageParamUnion {
	return []openai.ChatCompletionMessageParamUnion{openai.UserMessage(text)}
}

func TestModels(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	page, err := c.Models.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Data) != 1 {
		t.Fatalf("want one model, got %+v", page.Data)
	}
	m := page.Data[0]
	if m.ID != "model" || m.Object != "model" || m.OwnedBy == "" || m.Created == 0 {
		t.Errorf("unexpected model entry %+v (raw %s)", m, m.RawJSON())
	}
	got, err := c.Models.Get(context.Background(), m.ID)
	if err != nil {
		t.Fatalf("models.get(%q): %v", m.ID, err)
	}
	if got.ID != m.ID {
		t.Errorf("models.get: id %q, want %q", got.ID, m.ID)
	}
	_, err = c.Models.Get(context.Background(), "no-such-model")
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound || apiErr.Code != "model_not_found" {
		t.Errorf("models.get(unknown): want 404 model_not_found, got %v", err)
	}
}

func TestChatNonStream(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model:       model,
		Messages:    userText("Say something about circles."),
		MaxTokens:   openai.Int(12),
		Temperature: openai.Float(0),
	})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Object != "chat.completion" || !strings.HasPrefix(resp.ID, "chatcmpl-") || resp.Model != model || resp.Created == 0 {
		t.Errorf("unexpected envelope: object=%q id=%q model=%q created=%d", resp.Object, resp.ID, resp.Model, resp.Created)
	}
	if len(resp.Choices) != 1 {
		t.Fatalf("want 1 choice, got %d", len(resp.Choices))
	}
	ch := resp.Choices[0]
	if ch.Message.Role != "assistant" || ch.Message.Content == "" {
		t.Errorf("message: role %q content %q", ch.Message.Role, ch.Message.Content)
	}
	// Random weights never produce EOS: the limit ends generation.
	if ch.FinishReason != "length" {
		t.Errorf("finish_reason %q, want length", ch.FinishReason)
	}
	u := resp.Usage
	if u.CompletionTokens != 12 || u.PromptTokens <= 0 || u.TotalTokens != u.PromptTokens+u.CompletionTokens {
		t.Errorf("usage %+v", u)
	}
	if _, ok := resp.JSON.ExtraFields["kv_cache"]; !ok {
		t.Errorf("response lacks the kv_cache extension: %s", resp.RawJSON())
	}
}

func TestChatStream(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	params := openai.ChatCompletionNewParams{
		Model:         model,
		Messages:      userText("Tell me a story."),
		MaxTokens:     openai.Int(10),
		Temperature:   openai.Float(0),
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	}
	st := c.Chat.Completions.NewStreaming(context.Background(), params)
	var (
		n         int
		text      strings.Builder
		finish    string
		usage     *openai.CompletionUsage
		contentOK int
		id        string
	)
	for st.Next() {
		ch := st.Current()
		if id == "" {
			id = ch.ID
		} else if ch.ID != id {
			t.Errorf("chunk %d: id %q differs from %q", n, ch.ID, id)
		}
		if ch.Object != "chat.completion.chunk" {
			t.Errorf("chunk %d: object %q", n, ch.Object)
		}
		switch {
		case n == 0:
			if len(ch.Choices) != 1 || ch.Choices[0].Delta.Role != "assistant" {
				t.Errorf("first chunk must carry the assistant role: %s", ch.RawJSON())
			}
		case len(ch.Choices) == 0:
			if usage != nil {
				t.Errorf("second usage chunk: %s", ch.RawJSON())
			}
			if finish == "" {
				t.Errorf("usage chunk before the finish_reason chunk")
			}
			u := ch.Usage
			usage = &u
		default:
			if finish != "" {
				t.Errorf("chunk after finish_reason: %s", ch.RawJSON())
			}
			if d := ch.Choices[0].Delta.Content; d != "" {
				contentOK++
				text.WriteString(d)
			}
			if fr := ch.Choices[0].FinishReason; fr != "" {
				finish = fr
			}
		}
		n++
	}
	if err := st.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if contentOK == 0 || text.Len() == 0 {
		t.Errorf("no content deltas")
	}
	if finish != "length" {
		t.Errorf("finish_reason %q, want length", finish)
	}
	if usage == nil {
		t.Fatalf("no usage chunk although stream_options.include_usage was set")
	}
	if usage.CompletionTokens != 10 || usage.TotalTokens != usage.PromptTokens+usage.CompletionTokens {
		t.Errorf("usage %+v", *usage)
	}

	// The same greedy request without streaming gives the same text.
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{}
	resp, err := c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Choices[0].Message.Content; got != text.String() {
		t.Errorf("streamed text %q differs from non-streamed %q", text.String(), got)
	}
}

func TestStreamRawFraming(t *testing.T) {
	// What the SDK hides: the content type and the final data: [DONE].
	s := sharedServer(t, "main", mainSpec)
	res := stream(t, httpClient, s.URL, textChat("hello", 4, nil), nil)
	if res.Status != http.StatusOK || res.ReadErr != nil {
		t.Fatalf("status %d err %v body %s", res.Status, res.ReadErr, res.Body)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Errorf("Content-Type %q", ct)
	}
	if !res.Done || res.Events[len(res.Events)-1] != "[DONE]" {
		t.Errorf("stream must end with data: [DONE]; events %q", res.Events)
	}
	if res.Usage != nil {
		t.Errorf("usage chunk sent without stream_options.include_usage")
	}
}

func TestImages(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	ctx := context.Background()
	ask := func(images ...[]byte) *openai.ChatCompletion {
		t.Helper()
		parts := []openai.ChatCompletionContentPartUnionParam{openai.TextContentPart("What color is the circle?")}
		for _, img := range images {
			parts = append(parts, openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURL(img)}))
		}
		resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model:       model,
			Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage(parts)},
			MaxTokens:   openai.Int(6),
			Temperature: openai.Float(0),
		})
		if err != nil {
			t.Fatalf("%d image(s): %v", len(images), err)
		}
		return resp
	}
	none := ask()
	one := ask(redCircle(t))
	two := ask(redCircle(t), blueCircle(t))
	// The tiny model turns every 48x48 image into 144 embeddings.
	const perImage = 144
	if d := one.Usage.PromptTokens - none.Usage.PromptTokens; d < perImage {
		t.Errorf("one image added %d prompt tokens, want at least %d", d, perImage)
	}
	if d := two.Usage.PromptTokens - one.Usage.PromptTokens; d < perImage {
		t.Errorf("a second image added %d prompt tokens, want at least %d", d, perImage)
	}
	for _, r := range []*openai.ChatCompletion{one, two} {
		if r.Choices[0].FinishReason != "length" || r.Usage.CompletionTokens != 6 {
			t.Errorf("finish %q usage %+v", r.Choices[0].FinishReason, r.Usage)
		}
	}
	// Whether the answer depends on the picture is TestAnswerDependsOnImage's
	// question: this random-weight model's answers mean nothing.
}

// TestAnswerDependsOnImage: the image really reaches the model. The demo
// model is asked the same question, text first as the SDKs send it, about
// the README's picture (a red circle) and about a held-out picture whose
// circle is blue, and must give each picture's answer.
func TestAnswerDependsOnImage(t *testing.T) {
	s := sharedServer(t, "demo", demoSpec())
	c := sdkClient(s, "")
	model := servedModel(t, c)
	const question = "What color is the circle?"
	red, err := os.ReadFile(filepath.Join(repoRoot, "models", "demo", "example.png"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		picture string
		image   []byte
		want    string
	}{
		{"models/demo/example.png", red, " red"},
		{"a held-out picture with a blue circle", heldoutPicture(t, question, "blue"), " blue"},
	} {
		resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model: model,
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
				openai.TextContentPart(question),
				openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURL(tc.image)}),
			})},
			MaxTokens:   openai.Int(8),
			Temperature: openai.Float(0),
		}, option.WithJSONSet("elastic_cache", map[string]any{"policy": "full"}))
		if err != nil {
			t.Fatalf("%s: %v", tc.picture, err)
		}
		if got := resp.Choices[0].Message.Content; got != tc.want {
			t.Errorf("%s: %q answered %q, want %q", tc.picture, question, got, tc.want)
		}
	}
}

// heldoutPicture returns a held-out picture of the demo model
// (models/demo/heldout.json) for which question, asked text first, has the
// reference answer want, and which the trained model answered correctly.
func heldoutPicture(tb testing.TB, question, want string) []byte {
	tb.Helper()
	path := filepath.Join(repoRoot, "models", "demo", "heldout.json")
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var file struct {
		Questions []struct {
			Image     string `json:"image"`
			Question  string `json:"question"`
			TextFirst bool   `json:"text_first"`
			Reference string `json:"reference"`
			Torch     string `json:"torch"`
		} `json:"questions"`
	}
	if err := json.Unmarshal(b, &file); err != nil {
		tb.Fatalf("%s: %v", path, err)
	}
	for _, q := range file.Questions {
		if q.Question == question && q.TextFirst && q.Reference == want && q.Torch == want {
			img, err := os.ReadFile(filepath.Join(filepath.Dir(path), q.Image))
			if err != nil {
				tb.Fatal(err)
			}
			return img
		}
	}
	tb.Fatalf("%s has no text-first %q question answered %q", path, question, want)
	return nil
}

func TestMultiTurn(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	ctx := context.Background()
	first := []openai.ChatCompletionMessageParamUnion{
		openai.SystemMessage("You are a terse assistant."),
		openai.UserMessage("Name a shape."),
	}
	r1, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: model, Messages: first, MaxTokens: openai.Int(5), Temperature: openai.Float(0),
	})
	if err != nil {
		t.Fatal(err)
	}
	second := append(first, r1.Choices[0].Message.ToParam(), openai.UserMessage("And a color?"))
	r2, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: model, Messages: second, MaxTokens: openai.Int(5), Temperature: openai.Float(0),
	})
	if err != nil {
		t.Fatal(err)
	}
	// The second prompt holds the first (system + user), the answer and the
	// new question, so it is strictly longer.
	if r2.Usage.PromptTokens <= r1.Usage.PromptTokens+r1.Usage.CompletionTokens {
		t.Errorf("turn 2 prompt has %d tokens; turn 1 had %d prompt + %d completion",
			r2.Usage.PromptTokens, r1.Usage.PromptTokens, r1.Usage.CompletionTokens)
	}
	// developer is accepted as a system message.
	_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:     model,
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.DeveloperMessage("Be brief."), openai.UserMessage("Hi")},
		MaxTokens: openai.Int(2),
	})
	if err != nil {
		t.Errorf("developer message: %v", err)
	}
}

func TestStopAndLength(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	ctx := context.Background()
	base := openai.ChatCompletionNewParams{
		Model: model, Messages: userText("Write a long sentence."), MaxTokens: openai.Int(24), Temperature: openai.Float(0),
	}
	full, err := c.Chat.Completions.New(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	text := full.Choices[0].Message.Content
	if full.Choices[0].FinishReason != "length" || full.Usage.CompletionTokens != 24 {
		t.Fatalf("max_tokens 24: finish %q, %d tokens", full.Choices[0].FinishReason, full.Usage.CompletionTokens)
	}
	// Pick a stop string from the middle of the greedy answer: the same
	// request with it must end right before it, with finish_reason stop.
	runes := []rune(text)
	if len(runes) < 8 {
		t.Fatalf("answer too short to pick a stop string: %q", text)
	}
	stop := string(runes[len(runes)/2 : len(runes)/2+2])
	want := text[:strings.Index(text, stop)]
	for _, form := range []openai.ChatCompletionNewParamsStopUnion{
		{OfString: openai.String(stop)},
		{OfStringArray: []string{"\x01never", stop}},
	} {
		p := base
		p.Stop = form
		r, err := c.Chat.Completions.New(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Choices[0].Message.Content; got != want || r.Choices[0].FinishReason != "stop" {
			t.Errorf("stop %q: got %q finish %q, want %q finish stop", stop, got, r.Choices[0].FinishReason, want)
		}
	}
	// max_completion_tokens is honoured like max_tokens.
	p := base
	p.MaxTokens = openai.Int(24)
	p.MaxCompletionTokens = openai.Int(3)
	r, err := c.Chat.Completions.New(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if r.Usage.CompletionTokens != 3 || r.Choices[0].FinishReason != "length" {
		t.Errorf("max_completion_tokens 3: %d tokens, finish %q", r.Usage.CompletionTokens, r.Choices[0].FinishReason)
	}
}

func TestParallelStreamsMatchSequential(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	const n = 8
	params := func(i int) openai.ChatCompletionNewParams {
		return openai.ChatCompletionNewParams{
			Model:       model,
			Messages:    userText(fmt.Sprintf("Request number %d: describe shape %c.", i, 'A'+i)),
			MaxTokens:   openai.Int(int64(48 + 4*i)),
			Temperature: openai.Float(0),
		}
	}
	// run streams request i; first and last are when its first content
	// delta and its finish_reason arrived.
	run := func(i int) (text string, first, last time.Time, err error) {
		st := c.Chat.Completions.NewStreaming(context.Background(), params(i))
		var b strings.Builder
		for st.Next() {
			if ch := st.Current(); len(ch.Choices) > 0 {
				if ch.Choices[0].Delta.Content != "" && first.IsZero() {
					first = time.Now()
				}
				b.WriteString(ch.Choices[0].Delta.Content)
				if ch.Choices[0].FinishReason != "" {
					last = time.Now()
				}
			}
		}
		return b.String(), first, last, st.Err()
	}
	want := make([]string, n)
	for i := range n {
		var err error
		if want[i], _, _, err = run(i); err != nil {
			t.Fatalf("sequential %d: %v", i, err)
		}
	}
	got := make([]string, n)
	errs := make([]error, n)
	firsts := make([]time.Time, n)
	lasts := make([]time.Time, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			got[i], firsts[i], lasts[i], errs[i] = run(i)
		}()
	}
	close(start)
	wg.Wait()
	// How many streams were generating at the same moment (seen by the client)?
	overlap := 0
	for i := range n {
		k := 0
		for j := range n {
			if !firsts[j].After(firsts[i]) && lasts[j].After(firsts[i]) {
				k++
			}
		}
		overlap = max(overlap, k)
	}
	t.Logf("at most %d of %d streams were generating at the same time", overlap, n)
	if overlap < 2 {
		t.Errorf("the parallel streams never overlapped; the test did not exercise batched decoding")
	}
	for i := range n {
		if errs[i] != nil {
			t.Errorf("parallel %d: %v", i, errs[i])
		} else if got[i] != want[i] {
			t.Errorf("request %d: parallel output differs from sequential\n parallel:   %q\n sequential: %q", i, got[i], want[i])
		}
	}
}

func TestKVCacheExtension(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: model, Messages: userText("Compress me, please: a fairly long prompt about circles and squares."),
		MaxTokens: openai.Int(4), Temperature: openai.Float(0),
	}, option.WithJSONSet("elastic_cache", map[string]any{"policy": "elastic", "budget": 0.5}))
	if err != nil {
		t.Fatal(err)
	}
	raw, ok := resp.JSON.ExtraFields["kv_cache"]
	if !ok {
		t.Fatalf("no kv_cache in %s", resp.RawJSON())
	}
	var kv struct {
		Policy        string  `json:"policy"`
		Budget        float64 `json:"budget"`
		PromptEntries int     `json:"prompt_entries"`
		Kept          int     `json:"kept"`
		Merged        int     `json:"merged"`
	}
	if err := json.Unmarshal([]byte(raw.Raw()), &kv); err != nil {
		t.Fatalf("kv_cache %s: %v", raw.Raw(), err)
	}
	p := int(resp.Usage.PromptTokens)
	if kv.Policy != "elastic" || kv.Budget != 0.5 || kv.PromptEntries != p {
		t.Errorf("kv_cache %s; prompt_tokens %d", raw.Raw(), p)
	}
	if want := int(math.Ceil(0.5 * float64(p))); kv.Kept != want {
		t.Errorf("kept %d, want ceil(0.5*%d) = %d", kv.Kept, p, want)
	}
	if kv.Kept+kv.Merged != p {
		t.Errorf("kept %d + merged %d != prompt %d", kv.Kept, kv.Merged, p)
	}

	// The full policy keeps everything.
	resp, err = c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: model, Messages: userText("Keep it all."), MaxTokens: openai.Int(2),
	}, option.WithJSONSet("elastic_cache", map[string]any{"policy": "full"}))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(resp.JSON.ExtraFields["kv_cache"].Raw()), &kv); err != nil {
		t.Fatal(err)
	}
	if kv.Policy != "full" || kv.Kept != int(resp.Usage.PromptTokens) || kv.Merged != 0 {
		t.Errorf("full policy: %+v, prompt %d", kv, resp.Usage.PromptTokens)
	}
}

func TestSDKErrors(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	ctx := context.Background()
	check := func(name string, err error, status int, param, code string) {
		t.Helper()
		var e *openai.Error
		if !errors.As(err, &e) {
			t.Errorf("%s: want *openai.Error, got %T %v", name, err, err)
			return
		}
		if e.StatusCode != status || e.Param != param || e.Code != code || e.Type == "" || e.Message == "" {
			t.Errorf("%s: got %d type=%q param=%q code=%q message=%q; want %d param=%q code=%q",
				name, e.StatusCode, e.Type, e.Param, e.Code, e.Message, status, param, code)
		}
	}
	_, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: model, MaxTokens: openai.Int(2),
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
			openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: "data:image/png;base64,@@not*base64@@"}),
		})},
	})
	check("bad base64", err, 400, "messages[0].content[0].image_url.url", "invalid_image_url")

	_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: model, Messages: userText("hi"), MaxTokens: openai.Int(2), N: openai.Int(2),
	})
	check("n=2", err, 400, "n", "invalid_value")

	_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: "gpt-nonexistent", Messages: userText("hi"), MaxTokens: openai.Int(2),
	})
	check("unknown model", err, 404, "model", "model_not_found")

	// An error before streaming starts is a plain HTTP error for the SDK too.
	st := c.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model: model, Messages: userText("hi"), MaxTokens: openai.Int(2), Temperature: openai.Float(-1),
	})
	for st.Next() {
	}
	check("stream temperature -1", st.Err(), 400, "temperature", "invalid_value")
}

func TestMetrics(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	// Make sure there is at least one completion and one error to count.
	r := request(t, http.MethodPost, s.URL+"/v1/chat/completions", mustJSON(t, textChat("count me", 3, nil)), nil)
	if r.Status != 200 {
		t.Fatalf("chat: %d %s", r.Status, r.Body)
	}
	request(t, http.MethodPost, s.URL+"/v1/chat/completions", []byte("{"), nil)
	resp := request(t, http.MethodGet, s.URL+"/metrics", nil, nil)
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("Content-Type %q", ct)
	}
	m := parseMetrics(t, resp.Body)
	for _, name := range []string{
		"elasticserve_request_errors_total", "elasticserve_prompt_tokens_total", "elasticserve_completion_tokens_total",
		"elasticserve_tokens_per_second", "elasticserve_queue_depth", "elasticserve_slots_busy", "elasticserve_slots_total",
		"elasticserve_kv_cells_used", "elasticserve_kv_cells_total",
	} {
		if _, ok := m[name]; !ok {
			t.Errorf("missing series %s", name)
		}
	}
	positive := []string{
		`elasticserve_requests_total{endpoint="/v1/chat/completions",status="200"}`,
		`elasticserve_requests_total{endpoint="/v1/chat/completions",status="400"}`,
		"elasticserve_request_errors_total", "elasticserve_prompt_tokens_total", "elasticserve_completion_tokens_total",
	}
	for _, name := range positive {
		if m[name] <= 0 {
			t.Errorf("%s = %v, want > 0", name, m[name])
		}
	}
	if m["elasticserve_slots_total"] != 8 || m["elasticserve_kv_cells_total"] != 4096 {
		t.Errorf("slots_total %v kv_cells_total %v, want 8 and 4096", m["elasticserve_slots_total"], m["elasticserve_kv_cells_total"])
	}
	if !strings.Contains(string(resp.Body), "# TYPE elasticserve_requests_total counter") {
		t.Errorf("missing TYPE line for elasticserve_requests_total")
	}
	waitIdle(t, s, nil, 5*time.Second)
}

func TestHealthAndReady(t *testing.T) {
	s := sharedServer(t, "restricted", restrictedSpec)
	// Probes stay open on a server with an API key.
	for _, p := range []string{"/health", "/ready"} {
		if r := request(t, http.MethodGet, s.URL+p, nil, nil); r.Status != 200 {
			t.Errorf("GET %s: %d %s", p, r.Status, r.Body)
		}
	}
}

func TestAPIKey(t *testing.T) {
	s := sharedServer(t, "restricted", restrictedSpec)
	ctx := context.Background()
	good := sdkClient(s, testAPIKey)
	resp, err := good.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: "model", Messages: userText("hello"), MaxTokens: openai.Int(2),
	})
	if err != nil {
		t.Fatalf("with the right key: %v", err)
	}
	if resp.Usage.CompletionTokens != 2 {
		t.Errorf("usage %+v", resp.Usage)
	}
	bad := sdkClient(s, "sk-wrong")
	_, err = bad.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: "model", Messages: userText("hello"), MaxTokens: openai.Int(2),
	})
	var e *openai.Error
	if !errors.As(err, &e) || e.StatusCode != 401 || e.Type != "authentication_error" || e.Code != "invalid_api_key" {
		t.Errorf("wrong key: want 401 authentication_error invalid_api_key, got %v", err)
	}
	if _, err := bad.Models.List(ctx); err == nil {
		t.Errorf("models.list with a wrong key succeeded")
	}
	if r := request(t, http.MethodGet, s.URL+"/metrics", nil, nil); r.Status != 401 {
		t.Errorf("/metrics without a key: %d", r.Status)
	}
	// Neither the key nor a bearer token appears in the server's log.
	if strings.Contains(s.log.String(), testAPIKey) || strings.Contains(s.log.String(), "sk-wrong") {
		t.Errorf("the server log contains an API key")
	}
}
