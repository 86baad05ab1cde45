package api

import (
	"context"
	"errors"
	"net/http/httptest"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// The official Go SDK talks to this server: plain, streaming (with the
// accumulator), images, models and errors.
func TestOpenAIGoSDK(t *testing.T) {
	fb := newFake()
	opts := testOptions()
	opts.APIKey = "sk-test"
	srv := httptest.NewServer(newHandler(t, opts, fb))
	defer srv.Close()
	client := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("sk-test"), option.WithMaxRetries(0))
	ctx := context.Background()

	params := openai.ChatCompletionNewParams{
		Model: "test-vlm",
		Messages: []openai.ChatCompletionMessageParamUnion{
			openai.SystemMessage("Be terse."),
			openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
				openai.TextContentPart("What is this?"),
				openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURLOf("image/png", pngBytes(t, 5, 5))}),
			}),
		},
		MaxCompletionTokens: openai.Int(8),
		Temperature:         openai.Float(0),
	}
	resp, err := client.Chat.Completions.New(ctx, params)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Choices[0].Message.Content != "Hello world" || resp.Choices[0].FinishReason != "stop" || resp.Usage.TotalTokens != 13 || resp.Model != "test-vlm" {
		t.Fatalf("%+v", resp)
	}
	if r := fb.lastRequest(t); len(r.Images()) != 1 || r.MaxTokens != 8 || r.Sampling.Temperature != 0 {
		t.Fatalf("engine request %+v", r)
	}

	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	stream := client.Chat.Completions.NewStreaming(ctx, params)
	acc := openai.ChatCompletionAccumulator{}
	for stream.Next() {
		acc.AddChunk(stream.Current())
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if acc.Choices[0].Message.Content != "Hello world" || acc.Choices[0].FinishReason != "stop" || acc.Usage.CompletionTokens != 2 {
		t.Fatalf("accumulated %+v", acc.ChatCompletion)
	}

	models, err := client.Models.List(ctx)
	if err != nil || len(models.Data) != 1 || models.Data[0].ID != "test-vlm" {
		t.Fatalf("models %+v %v", models, err)
	}

	params.Temperature = openai.Float(5)
	_, err = client.Chat.Completions.New(ctx, params)
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 || apiErr.Param != "temperature" || apiErr.Type != "invalid_request_error" {
		t.Fatalf("error %v", err)
	}

	bad := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("nope"), option.WithMaxRetries(0))
	_, err = bad.Models.List(ctx)
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 401 || apiErr.Code != "invalid_api_key" {
		t.Fatalf("auth error %v", err)
	}
}
