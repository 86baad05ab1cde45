package api

import (
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/engine/completion"
)

const twoCalls = `{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","days":[1,{"x":"}"}]}},{"name":"noop","arguments":{}}]}`

func TestScanCallsFollowsPartialAnswers(t *testing.T) {
	tests := []struct {
		text string
		want []partialCall
	}{
		{``, nil},
		{`{"tool_calls":[`, nil},
		{`{"tool_calls":[{"name":"get_w`, []partialCall{{}}},
		{`{"tool_calls":[{"name":"get_weather"`, []partialCall{{name: "get_weather", nameDone: true}}},
		{`{"tool_calls":[{"name":"get_weather","arguments":{"ci`, []partialCall{{name: "get_weather", nameDone: true, args: `{"ci`}}},
		// Braces inside strings and nested objects do not end the arguments.
		{twoCalls, []partialCall{
			{name: "get_weather", nameDone: true, args: `{"city":"Paris","days":[1,{"x":"}"}]}`},
			{name: "noop", nameDone: true, args: `{}`},
		}},
		{`{"tool_calls":[{"name":"a\"b","arguments":{"q":"\\"}}]}`, []partialCall{{name: `a"b`, nameDone: true, args: `{"q":"\\"}`}}},
	}
	for _, tt := range tests {
		got := scanCalls(tt.text)
		if len(got) != len(tt.want) {
			t.Fatalf("%s: got %+v, want %+v", tt.text, got, tt.want)
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Fatalf("%s: call %d: got %+v, want %+v", tt.text, i, got[i], tt.want[i])
			}
		}
	}
}

// Whatever way the answer is cut into events, the deltas put back together
// give the calls of the whole answer, each introduced once before its arguments.
func TestToolStreamerReassemblesAnyChunking(t *testing.T) {
	want, _ := (&toolPlan{mode: "auto"}).finalCalls(twoCalls)
	if len(want) != 2 {
		t.Fatalf("finalCalls: %+v", want)
	}
	for step := 1; step <= len(twoCalls); step += 3 {
		st := &toolStreamer{t: &toolPlan{mode: "required"}}
		type acc struct{ id, name, args string }
		var got []acc
		for i := 0; i < len(twoCalls); i += step {
			content, deltas := st.feed(twoCalls[i:min(i+step, len(twoCalls))])
			if content != "" {
				t.Fatalf("step %d: content %q from a call", step, content)
			}
			for _, d := range deltas {
				idx := *d.Index
				if d.ID != "" {
					if idx != len(got) || d.Type != "function" || d.Function.Name == "" || d.Function.Arguments != "" {
						t.Fatalf("step %d: bad first delta %+v", step, d)
					}
					got = append(got, acc{id: d.ID, name: d.Function.Name})
					continue
				}
				if idx >= len(got) || d.Function.Name != "" {
					t.Fatalf("step %d: argument delta %+v before its call", step, d)
				}
				got[idx].args += d.Function.Arguments
			}
		}
		if rest, called := st.end(); rest != "" || !called {
			t.Fatalf("step %d: end = %q, %v", step, rest, called)
		}
		if len(got) != 2 {
			t.Fatalf("step %d: %d calls", step, len(got))
		}
		for i, g := range got {
			if g.name != want[i].Function.Name || g.args != want[i].Function.Arguments || !strings.HasPrefix(g.id, "call_") {
				t.Fatalf("step %d: call %d = %+v, want %+v", step, i, g, want[i].Function)
			}
		}
	}
}

func TestToolStreamerTextAnswer(t *testing.T) {
	st := &toolStreamer{t: &toolPlan{mode: "auto"}}
	var out strings.Builder
	for _, piece := range []string{" ", " ", "It is", " sunny {ok}"} {
		c, d := st.feed(piece)
		if d != nil {
			t.Fatalf("deltas %+v for text", d)
		}
		out.WriteString(c)
	}
	rest, called := st.end()
	out.WriteString(rest)
	if called || out.String() != "  It is sunny {ok}" {
		t.Fatalf("got %q called=%v", out.String(), called)
	}
}

func TestFinalCalls(t *testing.T) {
	tests := []struct {
		name     string
		plan     *toolPlan
		text     string
		calls    []string // name + " " + arguments
		leftText string
	}{
		{"no tools", nil, "hello", nil, "hello"},
		{"auto text", &toolPlan{mode: "auto"}, "hello", nil, "hello"},
		{"auto call", &toolPlan{mode: "auto"}, twoCalls, []string{`get_weather {"city":"Paris","days":[1,{"x":"}"}]}`, "noop {}"}, ""},
		{"cut off call", &toolPlan{mode: "required"}, twoCalls[:30], nil, twoCalls[:30]},
		{"named", &toolPlan{mode: "function", name: "f"}, `{"a":1}`, []string{`f {"a":1}`}, ""},
		{"named cut off", &toolPlan{mode: "function", name: "f"}, `{"a":`, nil, `{"a":`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls, text := tt.plan.finalCalls(tt.text)
			if text != tt.leftText || len(calls) != len(tt.calls) {
				t.Fatalf("got %+v %q", calls, text)
			}
			for i, c := range calls {
				if got := c.Function.Name + " " + c.Function.Arguments; got != tt.calls[i] || c.Type != "function" || c.ID == "" {
					t.Fatalf("call %d = %+v", i, c)
				}
			}
		})
	}
}

func TestCheckSchema(t *testing.T) {
	tests := []struct {
		name   string
		schema string
		paths  []string // where the problems are; nil: accepted
	}{
		{"pydantic model", `{"title":"Shape","type":"object","properties":{"color":{"type":"string","enum":["red","green"]},` +
			`"count":{"type":"integer","minimum":0,"maximum":9},"when":{"type":"string","format":"date-time"},` +
			`"tags":{"type":"array","items":{"$ref":"#/$defs/Tag"},"maxItems":3}},"required":["color","count"],` +
			`"additionalProperties":false,"$defs":{"Tag":{"type":"string","maxLength":8}}}`, nil},
		{"any of with null", `{"anyOf":[{"type":"string"},{"type":"null"}]}`, nil},
		{"unknown keywords", `{"type":"object","properties":{"a":{"type":"number","multipleOf":2},"b":{"not":{}}},"uniqueItems":true}`,
			[]string{"/properties/a/multipleOf", "/properties/b/not", "/uniqueItems"}},
		{"number bound", `{"type":"number","exclusiveMinimum":0}`, []string{"/exclusiveMinimum"}},
		{"bad type", `{"type":"text"}`, []string{"/type"}},
		{"boolean schema", `{"properties":{"a":true}}`, []string{"/properties/a"}},
		{"remote ref", `{"$ref":"other.json#/x"}`, []string{"/$ref"}},
		{"negative count", `{"type":"string","maxLength":-1}`, []string{"/maxLength"}},
		{"not JSON", `{"type":`, []string{""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			problems := checkSchema(json.RawMessage(tt.schema))
			var paths []string
			for _, p := range problems {
				paths = append(paths, p.path)
			}
			if strings.Join(paths, ",") != strings.Join(tt.paths, ",") {
				t.Fatalf("problems %+v, want at %v", problems, tt.paths)
			}
		})
	}
}

func TestSchemaTooDeep(t *testing.T) {
	s := `{"type":"string"}`
	for range maxSchemaDepth + 2 {
		s = `{"type":"array","items":` + s + `}`
	}
	if p := checkSchema(json.RawMessage(s)); len(p) == 0 || !strings.Contains(p[0].msg, "deeper") {
		t.Fatalf("problems %+v", p)
	}
}

func weatherTool() map[string]any {
	return tool("get_weather", map[string]any{"type": "object",
		"properties": map[string]any{"city": map[string]any{"type": "string"}}, "required": []any{"city"}})
}

func TestToolsShapeTheEngineRequest(t *testing.T) {
	tests := []struct {
		name       string
		fields     map[string]any
		prefix     string
		orText     bool
		constraint bool
		described  bool
	}{
		{"auto", map[string]any{"tools": []any{weatherTool()}}, "", true, true, true},
		{"required", map[string]any{"tools": []any{weatherTool()}, "tool_choice": "required"}, "", false, true, true},
		{"named", map[string]any{"tools": []any{weatherTool(), tool("noop", nil)},
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}},
			`{"tool_calls":[{"name":"get_weather","arguments":`, false, true, true},
		{"none", map[string]any{"tools": []any{weatherTool()}, "tool_choice": "none"}, "", false, false, false},
		{"json_object", map[string]any{"response_format": map[string]any{"type": "json_object"}}, "", false, true, false},
		{"json_schema", map[string]any{"response_format": jsonSchema("s", map[string]any{"type": "object",
			"properties": map[string]any{"color": map[string]any{"enum": []any{"red"}}}})}, "", false, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fb := newFake()
			h := newHandler(t, testOptions(), fb)
			if w := postChat(h, chatBody(t, tt.fields)); w.Code != 200 {
				t.Fatalf("status %d: %s", w.Code, w.Body)
			}
			req := fb.lastRequest(t)
			if req.AnswerPrefix != tt.prefix {
				t.Fatalf("prefix %q", req.AnswerPrefix)
			}
			if (req.Constraint != nil) != tt.constraint {
				t.Fatalf("constraint %+v", req.Constraint)
			}
			if req.Constraint != nil {
				if req.Constraint.OrText != tt.orText || !json.Valid(req.Constraint.Schema) {
					t.Fatalf("constraint %+v", req.Constraint)
				}
			}
			first := req.Messages[0]
			described := first.Role == "system" && strings.Contains(first.Parts[0].Text, `"name":"get_weather"`)
			if described != tt.described {
				t.Fatalf("tools described=%v: %+v", described, req.Messages)
			}
		})
	}
}

func TestToolHistoryIsRendered(t *testing.T) {
	fb := newFake()
	h := newHandler(t, testOptions(), fb)
	body := chatBody(t, map[string]any{"tools": []any{weatherTool()}, "messages": []any{
		map[string]any{"role": "system", "content": "Be brief."},
		map[string]any{"role": "user", "content": "Weather in Paris?"},
		map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{"id": "call_1", "type": "function",
			"function": map[string]any{"name": "get_weather", "arguments": `{ "city": "Paris" }`}}}},
		map[string]any{"role": "tool", "tool_call_id": "call_1", "content": `{"temp":21}`},
	}})
	if w := postChat(h, body); w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	req := fb.lastRequest(t)
	if len(req.Messages) != 4 {
		t.Fatalf("%d messages", len(req.Messages))
	}
	sys, asst, result := req.Messages[0], req.Messages[2], req.Messages[3]
	if len(sys.Parts) != 2 || sys.Parts[0].Text != "Be brief." || !strings.Contains(sys.Parts[1].Text, "get_weather") {
		t.Fatalf("system %+v", sys)
	}
	if asst.Role != "assistant" || len(asst.Parts) != 1 || asst.Parts[0].Text != `{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}` {
		t.Fatalf("assistant %+v", asst)
	}
	if result.Role != "user" || result.Parts[0].Text != "Result of tool call call_1 (get_weather):" || result.Parts[1].Text != `{"temp":21}` {
		t.Fatalf("tool result %+v", result)
	}
}

func TestToolCallResponses(t *testing.T) {
	call := `{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}`
	pieces := []string{call[:5], call[5:27], call[27:50], call[50:]}

	t.Run("collected", func(t *testing.T) {
		fb := newFake()
		fb.events = okEvents(pieces...)
		h := newHandler(t, testOptions(), fb)
		w := postChat(h, chatBody(t, map[string]any{"tools": []any{weatherTool()}}))
		var resp struct {
			Choices []struct {
				Message struct {
					Content   *string    `json:"content"`
					ToolCalls []ToolCall `json:"tool_calls"`
				} `json:"message"`
				FinishReason string `json:"finish_reason"`
			} `json:"choices"`
		}
		if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil || len(resp.Choices) != 1 {
			t.Fatalf("%v: %s", err, w.Body)
		}
		ch := resp.Choices[0]
		if ch.FinishReason != "tool_calls" || ch.Message.Content != nil || len(ch.Message.ToolCalls) != 1 {
			t.Fatalf("%s", w.Body)
		}
		if f := ch.Message.ToolCalls[0].Function; f.Name != "get_weather" || f.Arguments != `{"city":"Paris"}` {
			t.Fatalf("call %+v", f)
		}
	})

	t.Run("streamed", func(t *testing.T) {
		fb := newFake()
		fb.events = okEvents(pieces...)
		h := newHandler(t, testOptions(), fb)
		w := postChat(h, chatBody(t, map[string]any{"tools": []any{weatherTool()}, "stream": true}))
		var name, args, finish string
		for _, ev := range sseEvents(t, w.Body.String()) {
			if ev == "[DONE]" {
				break
			}
			var c ChatCompletionChunk
			if err := json.Unmarshal([]byte(ev), &c); err != nil {
				t.Fatal(err)
			}
			d := c.Choices[0].Delta
			if d.Content != nil && *d.Content != "" {
				t.Fatalf("content %q in a call", *d.Content)
			}
			for _, tc := range d.ToolCalls {
				name += tc.Function.Name
				args += tc.Function.Arguments
			}
			if c.Choices[0].FinishReason != nil {
				finish = *c.Choices[0].FinishReason
			}
		}
		if name != "get_weather" || args != `{"city":"Paris"}` || finish != "tool_calls" {
			t.Fatalf("name %q args %q finish %q", name, args, finish)
		}
	})

	t.Run("named function", func(t *testing.T) {
		fb := newFake()
		fb.events = okEvents(`{"city":`, `"Rome"}`)
		h := newHandler(t, testOptions(), fb)
		w := postChat(h, chatBody(t, map[string]any{"tools": []any{weatherTool()},
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}}))
		if !strings.Contains(w.Body.String(), `"function":{"name":"get_weather","arguments":"{\"city\":\"Rome\"}"}`) ||
			!strings.Contains(w.Body.String(), `"finish_reason":"tool_calls"`) {
			t.Fatalf("%s", w.Body)
		}
	})
}

func TestLogprobsReachTheClient(t *testing.T) {
	lp := func(tok string, v float64) completion.TokenLogprob {
		return completion.TokenLogprob{Token: tok, Bytes: []byte(tok), Logprob: v,
			Top: []completion.TopLogprob{{Token: tok, Bytes: []byte(tok), Logprob: v}, {Token: "x", Bytes: []byte("x"), Logprob: -9}}}
	}
	events := []completion.Event{{Text: " red", Logprobs: []completion.TokenLogprob{lp(" red", -0.25)}}, {Logprobs: []completion.TokenLogprob{lp("\xe2", -1)}}}
	events = append(events, okEvents()...)

	fb := newFake()
	fb.events = events
	h := newHandler(t, testOptions(), fb)
	w := postChat(h, chatBody(t, map[string]any{"logprobs": true, "top_logprobs": 2}))
	var resp ChatCompletion
	if err := json.Unmarshal(w.Body.Bytes(), &resp); err != nil {
		t.Fatal(err)
	}
	if req := fb.lastRequest(t); !req.Logprobs || req.TopLogprobs != 2 {
		t.Fatalf("request %+v", req)
	}
	got := resp.Choices[0].Logprobs
	if got == nil || len(got.Content) != 2 || got.Content[0].Token != " red" || got.Content[0].Logprob != -0.25 ||
		len(got.Content[0].TopLogprobs) != 2 || got.Content[1].Bytes[0] != 0xe2 {
		t.Fatalf("logprobs %s", w.Body)
	}
	if !strings.Contains(w.Body.String(), `"bytes":[32,114,101,100]`) {
		t.Fatalf("bytes are not an integer array: %s", w.Body)
	}

	fb = newFake()
	fb.events = events
	h = newHandler(t, testOptions(), fb)
	w = postChat(h, chatBody(t, map[string]any{"logprobs": true, "stream": true}))
	n := 0
	for _, ev := range sseEvents(t, w.Body.String()) {
		var c ChatCompletionChunk
		if ev == "[DONE]" || json.Unmarshal([]byte(ev), &c) != nil || len(c.Choices) == 0 {
			continue
		}
		if c.Choices[0].Logprobs != nil {
			n += len(c.Choices[0].Logprobs.Content)
		}
	}
	if n != 2 {
		t.Fatalf("%d logprob entries streamed: %s", n, w.Body)
	}

	// Not asked for: null, as in OpenAI's responses.
	fb = newFake()
	h = newHandler(t, testOptions(), fb)
	if w := postChat(h, chatBody(t, map[string]any{})); !strings.Contains(w.Body.String(), `"logprobs":null`) {
		t.Fatalf("%s", w.Body)
	}
}

// slowBackend sends nothing for a while before its events, like a request
// waiting in the queue.
type slowBackend struct {
	*fakeBackend
	wait time.Duration
}

func (b slowBackend) Submit(ctx context.Context, req *completion.Request) (<-chan completion.Event, error) {
	in, err := b.fakeBackend.Submit(ctx, req)
	if err != nil {
		return nil, err
	}
	out := make(chan completion.Event)
	go func() {
		defer close(out)
		select {
		case <-time.After(b.wait):
		case <-ctx.Done():
			return
		}
		for ev := range in {
			out <- ev
		}
	}()
	return out, nil
}

func TestStreamSendsKeepAliveWhileWaiting(t *testing.T) {
	opts := testOptions()
	opts.StreamKeepAlive = 20 * time.Millisecond
	h := New(opts, slowBackend{newFake(), 200 * time.Millisecond}, zerolog.New(io.Discard))
	w := postChat(h, chatBody(t, map[string]any{"stream": true}))
	body := w.Body.String()
	if n := strings.Count(body, ": keep-alive\n\n"); n < 2 {
		t.Fatalf("%d keep-alive comments in %q", n, body)
	}
	var data []string
	for _, block := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		if !strings.HasPrefix(block, ":") {
			data = append(data, block)
		}
	}
	if got := sseEvents(t, strings.Join(data, "\n\n")+"\n\n"); got[len(got)-1] != "[DONE]" || !strings.Contains(strings.Join(got, ""), "Hello") {
		t.Fatalf("events %q", got)
	}
}
