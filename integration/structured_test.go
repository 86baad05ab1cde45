package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	oaishared "github.com/openai/openai-go/v3/shared"
)

// The demo model has never seen JSON or tools: whatever it says under these
// requests is shaped only by the grammar, so a valid answer is the server's doing.

var colors = []string{"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}

// pictureQuestion is the README's question about models/demo/example.png (a red
// circle), text first as the SDKs send it.
func pictureQuestion(tb testing.TB, question string) []openai.ChatCompletionMessageParamUnion {
	tb.Helper()
	img, err := os.ReadFile(filepath.Join(repoRoot, "models", "demo", "example.png"))
	if err != nil {
		tb.Fatal(err)
	}
	return []openai.ChatCompletionMessageParamUnion{openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
		openai.TextContentPart(question),
		openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURL(img)}),
	})}
}

// streamAll runs params as a stream and returns the accumulated completion.
func streamAll(tb testing.TB, c openai.Client, params openai.ChatCompletionNewParams) (openai.ChatCompletion, []openai.ChatCompletionChunk) {
	tb.Helper()
	st := c.Chat.Completions.NewStreaming(context.Background(), params)
	var acc openai.ChatCompletionAccumulator
	var chunks []openai.ChatCompletionChunk
	for st.Next() {
		ch := st.Current()
		chunks = append(chunks, ch)
		if !acc.AddChunk(ch) {
			tb.Fatalf("the SDK's accumulator refused chunk %s", ch.RawJSON())
		}
	}
	if err := st.Err(); err != nil {
		tb.Fatal(err)
	}
	return acc.ChatCompletion, chunks
}

func TestStructuredOutputMatchesSchema(t *testing.T) {
	s := sharedServer(t, "demo", demoSpec())
	c := sdkClient(s, "")
	model := servedModel(t, c)
	schema := map[string]any{
		"type": "object",
		"properties": map[string]any{
			"color": map[string]any{"type": "string", "enum": colors},
			"count": map[string]any{"type": "integer", "minimum": 0, "maximum": 9},
		},
		"required":             []string{"color", "count"},
		"additionalProperties": false,
	}
	params := openai.ChatCompletionNewParams{
		Model:       model,
		Messages:    pictureQuestion(t, "What color is the circle?"),
		MaxTokens:   openai.Int(40),
		Temperature: openai.Float(0),
		ResponseFormat: openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONSchema: &oaishared.ResponseFormatJSONSchemaParam{
			JSONSchema: oaishared.ResponseFormatJSONSchemaJSONSchemaParam{Name: "circle", Schema: schema, Strict: openai.Bool(true)},
		}},
	}
	check := func(how, content string) {
		t.Helper()
		dec := json.NewDecoder(strings.NewReader(content))
		dec.DisallowUnknownFields()
		var got struct {
			Color *string `json:"color"`
			Count *int    `json:"count"`
		}
		if err := dec.Decode(&got); err != nil || got.Color == nil || got.Count == nil {
			t.Fatalf("%s: %q does not match the schema: %v", how, content, err)
		}
		if !slices.Contains(colors, *got.Color) || *got.Count < 0 || *got.Count > 9 {
			t.Fatalf("%s: %q breaks the schema", how, content)
		}
	}
	resp, err := c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Choices[0].FinishReason != "stop" {
		t.Fatalf("finish %q: %q", resp.Choices[0].FinishReason, resp.Choices[0].Message.Content)
	}
	check("response", resp.Choices[0].Message.Content)

	streamed, _ := streamAll(t, c, params)
	check("stream", streamed.Choices[0].Message.Content)
	if streamed.Choices[0].Message.Content != resp.Choices[0].Message.Content {
		t.Fatalf("greedy stream %q differs from the response %q", streamed.Choices[0].Message.Content, resp.Choices[0].Message.Content)
	}

	// JSON mode: any JSON object.
	params.ResponseFormat = openai.ChatCompletionNewParamsResponseFormatUnion{OfJSONObject: &oaishared.ResponseFormatJSONObjectParam{}}
	params.MaxTokens = openai.Int(60)
	resp, err = c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	var obj map[string]any
	if ch := resp.Choices[0]; ch.FinishReason == "stop" && json.Unmarshal([]byte(ch.Message.Content), &obj) != nil {
		t.Fatalf("json_object answer %q is not an object", ch.Message.Content)
	} else if ch.FinishReason == "length" && !strings.HasPrefix(ch.Message.Content, "{") {
		t.Fatalf("json_object answer %q does not open an object", ch.Message.Content)
	}
}

var weatherTool = openai.ChatCompletionFunctionTool(oaishared.FunctionDefinitionParam{
	Name:        "get_weather",
	Description: openai.String("Current weather in a city"),
	Parameters: oaishared.FunctionParameters{
		"type":                 "object",
		"properties":           map[string]any{"city": map[string]any{"type": "string", "enum": []string{"Paris", "Rome", "Oslo"}}},
		"required":             []string{"city"},
		"additionalProperties": false,
	},
})

// A tool call round trip as agent frameworks do it: a call, its result sent back
// with the tool role, then a final answer; streamed and not, with the same call.
func TestToolCallRoundTrip(t *testing.T) {
	s := sharedServer(t, "demo", demoSpec())
	c := sdkClient(s, "")
	model := servedModel(t, c)
	msgs := userText("What is the weather in Paris?")
	params := openai.ChatCompletionNewParams{
		Model:       model,
		Messages:    msgs,
		MaxTokens:   openai.Int(160),
		Temperature: openai.Float(0),
		Tools:       []openai.ChatCompletionToolUnionParam{weatherTool},
		ToolChoice:  openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")},
		// One call: the demo model was never trained on tool calls, and with
		// parallel calls allowed the grammar lets it list calls until max_tokens
		// (it did under the elastic 0.8 default). The round trip is what is tested.
		ParallelToolCalls: openai.Bool(false),
	}
	resp, err := c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	ch := resp.Choices[0]
	if ch.FinishReason != "tool_calls" || len(ch.Message.ToolCalls) == 0 {
		t.Fatalf("finish %q, message %s", ch.FinishReason, ch.Message.RawJSON())
	}
	call := ch.Message.ToolCalls[0]
	var args struct {
		City string `json:"city"`
	}
	if call.Function.Name != "get_weather" || json.Unmarshal([]byte(call.Function.Arguments), &args) != nil ||
		!slices.Contains([]string{"Paris", "Rome", "Oslo"}, args.City) || !strings.HasPrefix(call.ID, "call_") {
		t.Fatalf("call %s", call.RawJSON())
	}

	streamed, chunks := streamAll(t, c, params)
	sc := streamed.Choices[0]
	if len(sc.Message.ToolCalls) != len(ch.Message.ToolCalls) || sc.FinishReason != "tool_calls" {
		t.Fatalf("stream: finish %q, calls %+v", sc.FinishReason, sc.Message.ToolCalls)
	}
	if got := sc.Message.ToolCalls[0].Function; got.Name != call.Function.Name || got.Arguments != call.Function.Arguments {
		t.Fatalf("streamed call %s(%s), response %s(%s)", got.Name, got.Arguments, call.Function.Name, call.Function.Arguments)
	}
	argChunks := 0
	for _, chk := range chunks {
		if len(chk.Choices) > 0 && len(chk.Choices[0].Delta.ToolCalls) > 0 && chk.Choices[0].Delta.ToolCalls[0].Function.Arguments != "" {
			argChunks++
		}
	}
	if argChunks < 2 {
		t.Fatalf("the arguments came in %d chunks: not streamed", argChunks)
	}

	// The result goes back; with tool_choice none the model answers in text.
	params.Messages = append(msgs, ch.Message.ToParam(), openai.ToolMessage(`{"temperature_c":21,"sky":"clear"}`, call.ID))
	params.ToolChoice = openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("none")}
	params.MaxTokens = openai.Int(8)
	final, err := c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	if fc := final.Choices[0]; len(fc.Message.ToolCalls) != 0 || fc.Message.Content == "" || fc.FinishReason == "tool_calls" {
		t.Fatalf("final answer %s", fc.RawJSON())
	}
	// The history (call and result) reached the prompt.
	base := params
	base.Messages = msgs
	without, err := c.Chat.Completions.New(context.Background(), base)
	if err != nil {
		t.Fatal(err)
	}
	if grown := final.Usage.PromptTokens - without.Usage.PromptTokens; grown < int64(len(call.Function.Arguments)) {
		t.Fatalf("the call and its result added %d prompt tokens", grown)
	}
	streamedFinal, _ := streamAll(t, c, params)
	if streamedFinal.Choices[0].Message.Content != final.Choices[0].Message.Content {
		t.Fatalf("streamed final %q, response %q", streamedFinal.Choices[0].Message.Content, final.Choices[0].Message.Content)
	}

	// A named function: the server writes the call, the model only the arguments.
	params.Messages = msgs
	params.MaxTokens = openai.Int(160)
	params.ToolChoice = openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "get_weather"})
	named, err := c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	if nc := named.Choices[0]; nc.FinishReason != "tool_calls" || len(nc.Message.ToolCalls) != 1 ||
		json.Unmarshal([]byte(nc.Message.ToolCalls[0].Function.Arguments), &args) != nil {
		t.Fatalf("named call %s", nc.RawJSON())
	}
}

func TestLogprobs(t *testing.T) {
	s := sharedServer(t, "demo", demoSpec())
	c := sdkClient(s, "")
	model := servedModel(t, c)
	params := openai.ChatCompletionNewParams{
		Model:       model,
		Messages:    pictureQuestion(t, "What color is the circle?"),
		MaxTokens:   openai.Int(8),
		Temperature: openai.Float(0),
		Logprobs:    openai.Bool(true),
		TopLogprobs: openai.Int(3),
	}
	resp, err := c.Chat.Completions.New(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	ch := resp.Choices[0]
	lps := ch.Logprobs.Content
	if len(lps) != int(resp.Usage.CompletionTokens) || len(lps) == 0 {
		t.Fatalf("%d entries for %d tokens: %s", len(lps), resp.Usage.CompletionTokens, ch.RawJSON())
	}
	var spelled strings.Builder
	for i, lp := range lps {
		spelled.WriteString(lp.Token)
		// Greedy: the token is the most likely one.
		if lp.Logprob > 0 || len(lp.TopLogprobs) != 3 || lp.TopLogprobs[0].Token != lp.Token || lp.TopLogprobs[0].Logprob != lp.Logprob {
			t.Fatalf("entry %d: %s", i, lp.RawJSON())
		}
	}
	if spelled.String() != ch.Message.Content {
		t.Fatalf("the entries spell %q, the answer is %q", spelled.String(), ch.Message.Content)
	}
	if resp.Usage.PromptTokensDetails.CachedTokens != 0 || !resp.Usage.PromptTokensDetails.JSON.CachedTokens.Valid() {
		t.Fatalf("usage %s", resp.Usage.RawJSON())
	}

	streamed, _ := streamAll(t, c, params)
	var got []string
	for _, lp := range streamed.Choices[0].Logprobs.Content {
		got = append(got, lp.Token)
	}
	var want []string
	for _, lp := range lps {
		want = append(want, lp.Token)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("streamed logprob tokens %q, response %q", got, want)
	}
}
