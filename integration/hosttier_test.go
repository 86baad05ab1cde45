package integration

import (
	"context"
	"encoding/json"
	"image/color"
	"slices"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// The host tier through the real binary (--parallel 2, --cache-ram-mb): a picture
// conversation's first turn, then four other picture conversations (which take
// both slots, so the first one leaves for host memory), then its second turn: it
// is restored (cached_tokens at least the first turn's prompt, kv_cache.reused_from
// "host", the tier's metrics), and under full answers as the same request with
// reuse off.
func TestConversationRestoredFromHostMemory(t *testing.T) {
	spec := demoSpec()
	spec.flags = append(slices.Clone(spec.flags), "--cache-ram-mb", "256")
	s := launch(t, spec)
	c := sdkClient(s, "")
	model := servedModel(t, c)
	ask := func(msgs []openai.ChatCompletionMessageParamUnion, cache map[string]any) *openai.ChatCompletion {
		t.Helper()
		resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model: model, Messages: msgs, MaxTokens: openai.Int(8), Temperature: openai.Float(0),
		}, option.WithJSONSet("elastic_cache", cache))
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	full := map[string]any{"policy": "full"}
	first := pictureQuestion(t, "What color is the circle?")
	r1 := ask(first, full)
	for _, fg := range []color.Color{color.RGBA{B: 200, A: 255}, color.RGBA{G: 180, A: 255}, color.RGBA{R: 230, G: 220, A: 255}, color.Black} {
		ask([]openai.ChatCompletionMessageParamUnion{openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
			openai.TextContentPart("What color is the circle?"), // the same text up to the picture as the first
			openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURL(makePNG(t, 48, 48, color.White, fg))}),
		})}, full)
	}
	if m := metrics(t, s, nil); m[`elasticserve_kv_tier_stored_total{tier="host"}`] < 1 {
		t.Fatalf("no conversation went to host memory: %v", m[`elasticserve_kv_tier_stored_total{tier="host"}`])
	}
	second := append(slices.Clone(first), r1.Choices[0].Message.ToParam(), openai.UserMessage("How many shapes are there?"))
	r2 := ask(second, full)
	var kv struct {
		Reused     int64  `json:"reused"`
		ReusedFrom string `json:"reused_from"`
	}
	if err := json.Unmarshal([]byte(r2.JSON.ExtraFields["kv_cache"].Raw()), &kv); err != nil {
		t.Fatal(err)
	}
	cached := r2.Usage.PromptTokensDetails.CachedTokens
	if cached < r1.Usage.PromptTokens || kv.Reused != cached || kv.ReusedFrom != "host" {
		t.Fatalf("second turn: cached %d (kv_cache.reused %d from %q), the first turn's prompt is %d tokens",
			cached, kv.Reused, kv.ReusedFrom, r1.Usage.PromptTokens)
	}
	m := metrics(t, s, nil)
	if m[`elasticserve_kv_tier_hits_total{tier="host"}`] != 1 || m[`elasticserve_kv_tier_restored_tokens_total{tier="host"}`] != float64(cached) ||
		m[`elasticserve_kv_tier_bytes{tier="host"}`] <= 0 {
		t.Fatalf("host tier metrics: hits %v, restored tokens %v, bytes %v", m[`elasticserve_kv_tier_hits_total{tier="host"}`],
			m[`elasticserve_kv_tier_restored_tokens_total{tier="host"}`], m[`elasticserve_kv_tier_bytes{tier="host"}`])
	}
	again := ask(second, map[string]any{"policy": "full", "reuse": false})
	if again.Usage.PromptTokensDetails.CachedTokens != 0 || again.Choices[0].Message.Content != r2.Choices[0].Message.Content {
		t.Fatalf("restored %q, encoded again %q (cached %d)", r2.Choices[0].Message.Content, again.Choices[0].Message.Content,
			again.Usage.PromptTokensDetails.CachedTokens)
	}
}
