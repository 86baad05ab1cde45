package api

import (
	"fmt"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// pinRender writes an engine request as the engine renders it (parts joined
// by "\n", an image as the media marker, a past answer without its leading
// spaces, then the answer prefix) under a stand-in chat template that writes
// each message as "<|role|>\n" + content + "\n", and each part's field in
// brackets after the prompt.
func pinRender(req *completion.Request) string {
	var b strings.Builder
	for _, m := range req.Messages {
		pieces := make([]string, len(m.Parts))
		for j, p := range m.Parts {
			pieces[j] = p.Text
			if p.Kind == completion.PartImage {
				pieces[j] = testMarker
			} else if m.Role == "assistant" && j == 0 {
				pieces[j] = strings.TrimLeft(p.Text, " ")
			}
		}
		fmt.Fprintf(&b, "<|%s|>\n%s\n", m.Role, strings.Join(pieces, "\n"))
	}
	b.WriteString("<|assistant|>\n")
	b.WriteString(req.AnswerPrefix)
	return b.String()
}

// partFields names, for every part of the engine request, the field an
// engine error about it (marker in text, undecodable image) points at.
func partFields(t *testing.T, body string, req *completion.Request) []string {
	t.Helper()
	var out []string
	img := 0
	for i, m := range req.Messages {
		for j, p := range m.Parts {
			err := error(&completion.MarkerInTextError{Message: i, Part: j, Marker: testMarker})
			if p.Kind == completion.PartImage {
				err = &completion.ImageError{Index: img}
				img++
			}
			fb := newFake()
			fb.events = []completion.Event{{Done: true, Err: err}}
			w := postChat(newHandler(t, testOptions(), fb), body)
			out = append(out, fmt.Sprintf("%d.%d %s", i, j, str(decodeError(t, w).Param)))
		}
	}
	return out
}

// The prompt of a request with tools, a tool call and its result, and images
// around them, pinned: what the engine gets (rendered under a stand-in
// template), and which request field each of its parts is named by.
func TestToolPromptIsPinned(t *testing.T) {
	png := dataURLOf("image/png", pngBytes(t, 4, 4))
	history := []any{
		map[string]any{"role": "user", "content": []any{textPart("What is this, and the weather in Paris?"), imagePart(png)}},
		map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{"id": "call_1", "type": "function",
			"function": map[string]any{"name": "get_weather", "arguments": `{ "city": "Paris" }`}}}},
		map[string]any{"role": "tool", "tool_call_id": "call_1", "content": `{"temp":21}`},
		map[string]any{"role": "user", "content": []any{imagePart(png), textPart("And here?")}},
	}
	const toolsText = "You can call these tools (one JSON line per tool: name, description, JSON schema of the arguments):\n" +
		`{"name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}}` + "\n" +
		`{"name":"noop","parameters":{"type":"object","properties":{}}}` + "\n" +
		`To call tools, answer with only this JSON, nothing else: {"tool_calls":[{"name":"TOOL_NAME","arguments":{...}}]}` + "\n" +
		"Each result comes back in the next message."
	tests := []struct {
		name   string
		fields map[string]any
		prompt string
		parts  []string
	}{
		{"auto, no system message", map[string]any{"tools": []any{weatherTool(), tool("noop", nil)}, "messages": history},
			"<|system|>\n" + toolsText + " When no tool is needed, answer in plain text.\n" +
				"<|user|>\nWhat is this, and the weather in Paris?\n" + testMarker + "\n" +
				"<|assistant|>\n" + `{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}` + "\n" +
				"<|user|>\nResult of tool call call_1 (get_weather):\n" + `{"temp":21}` + "\n" +
				"<|user|>\n" + testMarker + "\nAnd here?\n" +
				"<|assistant|>\n",
			[]string{"0.0 tools", "1.0 messages[0].content[0].text", "1.1 messages[0].content[1].image_url",
				"2.0 messages[1].tool_calls", "3.0 messages[2].tool_call_id", "3.1 messages[2].content",
				"4.0 messages[3].content[0].image_url", "4.1 messages[3].content[1].text"}},
		{"named function after a system message", map[string]any{"tools": []any{weatherTool(), tool("noop", nil)},
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}},
			"messages":    append([]any{map[string]any{"role": "developer", "content": "Be brief."}}, history...)},
			"<|system|>\nBe brief.\n" + toolsText + "\n" +
				"<|user|>\nWhat is this, and the weather in Paris?\n" + testMarker + "\n" +
				"<|assistant|>\n" + `{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}` + "\n" +
				"<|user|>\nResult of tool call call_1 (get_weather):\n" + `{"temp":21}` + "\n" +
				"<|user|>\n" + testMarker + "\nAnd here?\n" +
				"<|assistant|>\n" + `{"tool_calls":[{"name":"get_weather","arguments":`,
			[]string{"0.0 messages[0].content", "0.1 tools", "1.0 messages[1].content[0].text", "1.1 messages[1].content[1].image_url",
				"2.0 messages[2].tool_calls", "3.0 messages[3].tool_call_id", "3.1 messages[3].content",
				"4.0 messages[4].content[0].image_url", "4.1 messages[4].content[1].text"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := chatBody(t, tt.fields)
			fb := newFake()
			if w := postChat(newHandler(t, testOptions(), fb), body); w.Code != 200 {
				t.Fatalf("status %d: %s", w.Code, w.Body)
			}
			req := fb.lastRequest(t)
			if got := pinRender(req); got != tt.prompt {
				t.Errorf("prompt:\n%q\nwant:\n%q", got, tt.prompt)
			}
			if got := partFields(t, body, req); strings.Join(got, "\n") != strings.Join(tt.parts, "\n") {
				t.Errorf("fields:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.parts, "\n"))
			}
			if imgs := req.Images(); len(imgs) != 2 || len(imgs[0]) == 0 || len(imgs[1]) == 0 {
				t.Errorf("images %d", len(imgs))
			}
		})
	}
}
