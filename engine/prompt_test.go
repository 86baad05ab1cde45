package engine

import (
	"errors"
	"testing"

	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// The text RenderPrompt makes of a conversation with tool descriptions, a past
// tool call, its result and images (the messages the API builds for such a
// request), under the test model's chat template, pinned.
func TestRenderPromptPinsToolTurns(t *testing.T) {
	img := []byte{1, 2, 3}
	msgs := []completion.Message{
		{Role: "system", Parts: []completion.Part{completion.Text("Be brief."), completion.Text("You can call these tools:\n{\"name\":\"noop\"}")}},
		{Role: "user", Parts: []completion.Part{completion.Text("What is this?"), completion.Image(img)}},
		{Role: "assistant", Parts: []completion.Part{completion.Text(`  {"tool_calls":[{"name":"noop","arguments":{}}]}`)}},
		{Role: "user", Parts: []completion.Part{completion.Text("Result of tool call call_1 (noop):"), completion.Text(`{"ok":true}`)}},
		{Role: "user", Parts: []completion.Part{completion.Image(img), completion.Text("And here?")}},
	}
	text, images, err := RenderPrompt(tmModel, msgs)
	if err != nil {
		t.Fatal(err)
	}
	const want = "Be brief.\nYou can call these tools:\n{\"name\":\"noop\"}\n\nUSER: What is this?\n<__media__>\n" +
		"ASSISTANT: {\"tool_calls\":[{\"name\":\"noop\",\"arguments\":{}}]}</s>\n" +
		"USER: Result of tool call call_1 (noop):\n{\"ok\":true}\nUSER: <__media__>\nAnd here?\nASSISTANT:"
	if text != want {
		t.Errorf("prompt:\n%q\nwant:\n%q", text, want)
	}
	if len(images) != 2 {
		t.Errorf("%d images", len(images))
	}
	msgs[3].Parts[1] = completion.Text("a " + llama.MediaMarker())
	var me *completion.MarkerInTextError
	if _, _, err := RenderPrompt(tmModel, msgs); !errors.As(err, &me) || me.Message != 3 || me.Part != 1 {
		t.Errorf("a marker in a tool result: %v", err)
	}
}
