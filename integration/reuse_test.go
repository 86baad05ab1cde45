package integration

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// A picture conversation through the official SDK, the whole history sent on every
// turn as chat clients do: the second turn continues from the first turn's cells
// (usage.prompt_tokens_details.cached_tokens, kv_cache.reused, the reuse metrics),
// answers as encoding everything again does under full, and the picture is not
// encoded twice.
func TestConversationReuse(t *testing.T) {
	s := sharedServer(t, "demo", demoSpec())
	c := sdkClient(s, "")
	model := servedModel(t, c)
	ctx := context.Background()
	ask := func(msgs []openai.ChatCompletionMessageParamUnion, cache map[string]any) *openai.ChatCompletion {
		t.Helper()
		resp, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model: model, Messages: msgs, MaxTokens: openai.Int(8), Temperature: openai.Float(0),
		}, option.WithJSONSet("elastic_cache", cache))
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	cachedOf := func(r *openai.ChatCompletion) int64 { return r.Usage.PromptTokensDetails.CachedTokens }

	for _, tc := range []struct {
		name  string
		cache map[string]any
		// exact: the second turn continues the whole held history (compressed
		// memory); otherwise the shared prefix (full).
		exact bool
	}{
		{"full", map[string]any{"policy": "full"}, false},
		{"elastic with compressed memory", map[string]any{"policy": "elastic", "budget": 0.5, "reuse": true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := metrics(t, s, nil)
			// Other tests asked the demo server about this picture: a system line
			// of this conversation's own keeps their held cells out of its first turn.
			first := append([]openai.ChatCompletionMessageParamUnion{openai.SystemMessage("Conversation " + tc.name + ".")},
				pictureQuestion(t, "What color is the circle?")...)
			r1 := ask(first, tc.cache)
			// Only the template's first tokens can be shared with another conversation.
			if cachedOf(r1) > 4 {
				t.Fatalf("a first turn reused %d tokens", cachedOf(r1))
			}
			second := append(first, r1.Choices[0].Message.ToParam(), openai.UserMessage("How many shapes are there?"))
			r2 := ask(second, tc.cache)
			history := r1.Usage.PromptTokens + r1.Usage.CompletionTokens
			if r1.Choices[0].FinishReason == "length" {
				history-- // the last token was sampled, never encoded
			}
			switch got := cachedOf(r2); {
			case tc.exact && got != history:
				t.Fatalf("cached %d, the held conversation is %d tokens", got, history)
			case !tc.exact && got < r1.Usage.PromptTokens:
				t.Fatalf("cached %d of a history whose first prompt is %d tokens", got, r1.Usage.PromptTokens)
			}
			var kv struct {
				Reused int64 `json:"reused"`
			}
			if err := json.Unmarshal([]byte(r2.JSON.ExtraFields["kv_cache"].Raw()), &kv); err != nil || kv.Reused != cachedOf(r2) {
				t.Fatalf("kv_cache.reused %d (%v), cached_tokens %d", kv.Reused, err, cachedOf(r2))
			}
			after := metrics(t, s, nil)
			hits := 1.0
			if cachedOf(r1) > 0 {
				hits++
			}
			if d := after["elasticserve_prefix_cache_hits_total"] - before["elasticserve_prefix_cache_hits_total"]; d != hits {
				t.Fatalf("prefix cache hits moved by %v, want %v", d, hits)
			}
			if d := after["elasticserve_prefix_cache_reused_tokens_total"] - before["elasticserve_prefix_cache_reused_tokens_total"]; d != float64(cachedOf(r1)+cachedOf(r2)) {
				t.Fatalf("reused tokens moved by %v, cached_tokens %d + %d", d, cachedOf(r1), cachedOf(r2))
			}
			if !tc.exact {
				// Encoding everything again gives the same answer.
				again := ask(second, map[string]any{"policy": "full", "reuse": false})
				if cachedOf(again) != 0 || again.Choices[0].Message.Content != r2.Choices[0].Message.Content {
					t.Fatalf("without reuse %q (cached %d), with %q", again.Choices[0].Message.Content, cachedOf(again), r2.Choices[0].Message.Content)
				}
			}
		})
	}

	// The same picture in a new conversation comes from the image cache.
	before := metrics(t, s, nil)
	ask(pictureQuestion(t, "Where is the circle?"), map[string]any{"policy": "full", "reuse": false})
	after := metrics(t, s, nil)
	if after["elasticserve_image_cache_hits_total"] <= before["elasticserve_image_cache_hits_total"] ||
		after["elasticserve_image_encodes_total"] != before["elasticserve_image_encodes_total"] {
		t.Fatalf("image cache hits %v -> %v, encodes %v -> %v", before["elasticserve_image_cache_hits_total"], after["elasticserve_image_cache_hits_total"],
			before["elasticserve_image_encodes_total"], after["elasticserve_image_encodes_total"])
	}
}
