package integration

import (
	"context"
	"encoding/json"
	"image/color"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// The tiers through the real binary (--parallel 2, --cache-ram-mb, --cache-dir): a
// picture conversation's first turn, then four other picture conversations (which
// take both slots, so the first one leaves for host memory), then its second turn:
// it is restored (cached_tokens at least the first turn's prompt,
// kv_cache.reused_from "host", the tier's metrics), and under full answers as the
// same request with reuse off. Then SIGTERM, a restart on the same directory, and
// its third turn is restored from disk; then every file in the directory
// corrupted, a restart, and the third turn again is a 200 encoded afresh
// (cached_tokens 0).
func TestConversationRestoredFromHostMemory(t *testing.T) {
	spec := demoSpec()
	dir := t.TempDir()
	spec.flags = append(slices.Clone(spec.flags), "--cache-ram-mb", "256", "--cache-dir", dir)
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

	// SIGTERM: the held conversations are written to the directory.
	if code := s.stop(30 * time.Second); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	restart := func() {
		t.Helper()
		s = launch(t, spec)
		c = sdkClient(s, "")
	}
	restart()
	third := append(slices.Clone(second), r2.Choices[0].Message.ToParam(), openai.UserMessage("Where is the circle?"))
	r3 := ask(third, full)
	kvOf := func(r *openai.ChatCompletion) (k struct {
		Reused     int64  `json:"reused"`
		ReusedFrom string `json:"reused_from"`
	}) {
		if err := json.Unmarshal([]byte(r.JSON.ExtraFields["kv_cache"].Raw()), &k); err != nil {
			t.Fatal(err)
		}
		return k
	}
	if k := kvOf(r3); k.ReusedFrom != "disk" || r3.Usage.PromptTokensDetails.CachedTokens < r2.Usage.PromptTokens {
		t.Fatalf("third turn after a restart: cached %d from %q, the second turn's prompt is %d tokens",
			r3.Usage.PromptTokensDetails.CachedTokens, k.ReusedFrom, r2.Usage.PromptTokens)
	}
	t.Logf("after a restart: third turn cached %d of %d prompt tokens from %q", r3.Usage.PromptTokensDetails.CachedTokens, r3.Usage.PromptTokens, kvOf(r3).ReusedFrom)
	if m := metrics(t, s, nil); m[`elasticserve_kv_tier_hits_total{tier="disk"}`] != 1 {
		t.Fatalf("disk hits %v", m[`elasticserve_kv_tier_hits_total{tier="disk"}`])
	}
	s.stop(30 * time.Second)
	files, err := filepath.Glob(filepath.Join(dir, "*.eskv"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no conversation files (%v)", err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(b); i += 97 {
			b[i] ^= 0x5a
		}
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	restart()
	r3again := ask(third, full)
	if r3again.Usage.PromptTokensDetails.CachedTokens != 0 || r3again.Choices[0].Message.Content != r3.Choices[0].Message.Content {
		t.Fatalf("third turn over corrupted files: cached %d, %q (restored: %q)", r3again.Usage.PromptTokensDetails.CachedTokens,
			r3again.Choices[0].Message.Content, r3.Choices[0].Message.Content)
	}
	if m := metrics(t, s, nil); m[`elasticserve_kv_tier_failures_total{tier="disk"}`] < 1 {
		t.Fatalf("corrupted files were not counted: %v", m[`elasticserve_kv_tier_failures_total{tier="disk"}`])
	}
}
