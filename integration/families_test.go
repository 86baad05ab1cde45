package integration

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// Every model family's tiny random model served by the real binary: it starts,
// says which policies the model supports, answers text, one picture and two
// pictures (streamed), and compresses a picture's prompt under elastic 0.5
// (Qwen-VL's M-RoPE included: the KV hook names cells by index and carries their
// extra position components).
func TestFamiliesServed(t *testing.T) {
	for _, arch := range testmodel.Families() {
		t.Run(arch, func(t *testing.T) {
			opt, err := testmodel.FamilyOptions(arch)
			if err != nil {
				t.Fatal(err)
			}
			mp, vp, err := testmodel.Ensure(opt)
			if err != nil {
				t.Fatal(err)
			}
			s := launch(t, serverSpec{vision: true, model: mp, mmproj: vp, flags: []string{"--parallel", "1", "--ctx-size", "4096"}})
			c := sdkClient(s, "")
			model := servedModel(t, c)
			page, err := c.Models.List(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(page.Data[0].RawJSON(), `"supported":false`) {
				t.Fatalf("/v1/models refuses a policy: %s", page.Data[0].RawJSON())
			}
			ask := func(cache map[string]any, images int) (*openai.ChatCompletion, error) {
				parts := []openai.ChatCompletionContentPartUnionParam{openai.TextContentPart("What color is the circle?")}
				for i := range images {
					img := redCircle(t)
					if i == 1 {
						img = blueCircle(t)
					}
					parts = append(parts, openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURL(img)}))
				}
				params := openai.ChatCompletionNewParams{Model: model, MaxTokens: openai.Int(4), Temperature: openai.Float(0),
					Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(parts)}}
				st := c.Chat.Completions.NewStreaming(context.Background(), params, option.WithJSONSet("elastic_cache", cache),
					option.WithJSONSet("stream_options", map[string]any{"include_usage": true}))
				var acc openai.ChatCompletionAccumulator
				for st.Next() {
					acc.AddChunk(st.Current())
				}
				return &acc.ChatCompletion, st.Err()
			}
			full := map[string]any{"policy": "full"}
			for images := range 3 {
				r, err := ask(full, images)
				if err != nil {
					t.Fatalf("%d images: %v", images, err)
				}
				if r.Usage.CompletionTokens == 0 || r.Usage.PromptTokens == 0 {
					t.Fatalf("%d images: usage %+v", images, r.Usage)
				}
			}
			resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
				Model: model, MaxTokens: openai.Int(4), Temperature: openai.Float(0),
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
					openai.TextContentPart("What color is the circle?"),
					openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{URL: dataURL(redCircle(t))}),
				})},
			}, option.WithJSONSet("elastic_cache", map[string]any{"policy": "elastic", "budget": 0.5}))
			if err != nil {
				t.Fatalf("elastic 0.5: %v", err)
			}
			var kv struct {
				PromptEntries int `json:"prompt_entries"`
				Kept          int `json:"kept"`
			}
			if err := json.Unmarshal([]byte(resp.JSON.ExtraFields["kv_cache"].Raw()), &kv); err != nil || kv.Kept >= kv.PromptEntries || kv.Kept == 0 {
				t.Fatalf("elastic 0.5 kept %d of %d (%v)", kv.Kept, kv.PromptEntries, err)
			}
		})
	}
}
