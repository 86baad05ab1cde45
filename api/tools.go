package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"regexp"
	"strings"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// Tool calling, in one generic format that works with any chat template (llama.cpp's
// per-model formats live in its common/chat.cpp, which the module does not ship):
//
//   - The tools are described to the model in the system text, one compact JSON line
//     per tool (name, description, parameters).
//   - A call is the whole answer, as compact JSON:
//     {"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}
//     Generation is constrained by a grammar made from the tools' parameter schemas,
//     so the name is one of the tools and the arguments match its schema.
//   - tool_choice "auto": the model answers in text or with a call (an answer that
//     starts with "{" must be a call); "required": it must call; a named function:
//     the server writes {"tool_calls":[{"name":"NAME","arguments": itself and the model
//     generates only the arguments; "none": the tools are not shown to the model.
//   - History: an assistant message's tool_calls are rendered in the same JSON; a
//     "tool" message becomes a user turn that starts "Result of tool call ID (NAME):".

// Tool is one entry of tools.
type Tool struct {
	Type     string       `json:"type"`
	Function *FunctionDef `json:"function"`
}

// FunctionDef is a tool's function.
type FunctionDef struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters,omitempty"`
	Strict      *bool           `json:"strict,omitempty"`
}

// ToolChoice is tool_choice: "none", "auto", "required", or
// {"type": "function", "function": {"name": ...}}.
type ToolChoice struct {
	Mode string // none, auto, required or function
	Name string // Mode function: the function's name
}

// UnmarshalJSON accepts the string forms and the object form.
func (c *ToolChoice) UnmarshalJSON(b []byte) error {
	*c = ToolChoice{}
	switch firstByte(b) {
	case 'n':
		return nil
	case '"':
		return json.Unmarshal(b, &c.Mode)
	case '{':
		var o struct {
			Type     string `json:"type"`
			Function *struct {
				Name string `json:"name"`
			} `json:"function"`
		}
		if err := json.Unmarshal(b, &o); err != nil {
			return err
		}
		c.Mode = "function"
		if o.Type != "" && o.Type != "function" {
			c.Mode = "type:" + o.Type
		}
		if o.Function != nil {
			c.Name = o.Function.Name
		}
		return nil
	}
	return &json.UnmarshalTypeError{Value: jsonKind(b), Type: reflect.TypeFor[ToolChoice]()}
}

// ToolCall is a call in a response message, a stream delta (with Index) or a
// request's assistant message.
type ToolCall struct {
	Index    *int             `json:"index,omitempty"`
	ID       string           `json:"id,omitempty"`
	Type     string           `json:"type,omitempty"`
	Function ToolCallFunction `json:"function"`
}

// ToolCallFunction is a call's function: its name and its arguments as a JSON string.
type ToolCallFunction struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments"`
}

// ResponseFormat is response_format.
type ResponseFormat struct {
	Type       string          `json:"type"`
	JSONSchema *JSONSchemaSpec `json:"json_schema"`
}

// JSONSchemaSpec is response_format.json_schema.
type JSONSchemaSpec struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Schema      json.RawMessage `json:"schema"`
	Strict      *bool           `json:"strict"`
}

// toolPlan is a request's validated tool setting; nil when the answer is plain text.
type toolPlan struct {
	mode string // auto, required or function
	name string // mode function
}

// anyJSONObject is json_object mode's schema.
var anyJSONObject = []byte(`{"type":"object"}`)

// functionName is OpenAI's rule for tool and schema names.
var functionName = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// planResponseFormat turns response_format into a constraint.
func planResponseFormat(rf *ResponseFormat, p *chatPlan) *apiError {
	if rf == nil {
		return nil
	}
	switch rf.Type {
	case "", "text":
		return nil
	case "json_object":
		p.req.Constraint = &completion.Constraint{Schema: anyJSONObject}
		p.constraintParam = "response_format"
		return nil
	case "json_schema":
	default:
		return badRequest("response_format.type", "invalid_value", "response_format.type must be text, json_object or json_schema, got %q", rf.Type)
	}
	js := rf.JSONSchema
	if js == nil {
		return badRequest("response_format.json_schema", "invalid_value", "response_format.json_schema is required when type is json_schema")
	}
	if !functionName.MatchString(js.Name) {
		return badRequest("response_format.json_schema.name", "invalid_value",
			"response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-', got %q", js.Name)
	}
	schema := bytes.TrimSpace(js.Schema)
	if len(schema) == 0 || bytes.Equal(schema, []byte("null")) {
		schema = anyJSONObject
	}
	const param = "response_format.json_schema.schema"
	if problems := checkSchema(schema); problems != nil {
		return schemaError(param, problems)
	}
	p.req.Constraint = &completion.Constraint{Schema: compactJSON(schema)}
	p.constraintParam = param
	return nil
}

// planTools validates tools and tool_choice, describes the tools to the model and
// sets the constraint (and, for a named function, the answer's prefix). It runs
// after planMessages.
func planTools(cr *ChatRequest, p *chatPlan) *apiError {
	choice := ToolChoice{Mode: "auto"}
	if cr.ToolChoice != nil && cr.ToolChoice.Mode != "" {
		choice = *cr.ToolChoice
	}
	if len(cr.Tools) == 0 {
		if cr.ToolChoice != nil && choice.Mode != "none" && choice.Mode != "auto" {
			return badRequest("tool_choice", "invalid_value", "tool_choice %q needs tools", choiceText(choice))
		}
		return nil
	}
	tools, aerr := planToolList(cr.Tools)
	if aerr != nil {
		return aerr
	}
	if aerr := checkChoice(choice, tools); aerr != nil || choice.Mode == "none" {
		return aerr
	}
	if p.req.Constraint != nil {
		return badRequest("response_format", "invalid_value", "response_format cannot be combined with tools unless tool_choice is \"none\"")
	}

	p.req.Messages = completion.DescribeTools(p.req.Messages, tools, choice.Mode == "auto")
	p.tools = &toolPlan{mode: choice.Mode, name: choice.Name}
	p.constraintParam = "tools"
	if choice.Mode == "function" {
		p.req.AnswerPrefix = completion.CallPrefix(choice.Name)
		p.req.Constraint = &completion.Constraint{Schema: toolNamed(tools, choice.Name).Parameters}
		return nil
	}
	p.req.Constraint = &completion.Constraint{Schema: callsSchema(tools, cr.ParallelToolCalls), OrText: choice.Mode == "auto"}
	return nil
}

// planToolList checks tools: functions with distinct names and object
// schemas for their parameters (compacted).
func planToolList(list []Tool) ([]completion.Tool, *apiError) {
	tools := make([]completion.Tool, 0, len(list))
	for i, t := range list {
		param := fmt.Sprintf("tools[%d]", i)
		if t.Type != "function" {
			return nil, badRequest(param+".type", "invalid_value", "%s.type must be \"function\", got %q", param, t.Type)
		}
		f := t.Function
		if f == nil {
			return nil, badRequest(param+".function", "invalid_value", "%s.function is required", param)
		}
		if !functionName.MatchString(f.Name) {
			return nil, badRequest(param+".function.name", "invalid_value", "%s.function.name must be 1 to 64 letters, digits, '_' or '-', got %q", param, f.Name)
		}
		if toolNamed(tools, f.Name) != nil {
			return nil, badRequest(param+".function.name", "invalid_value", "two tools are named %q", f.Name)
		}
		params, aerr := toolParameters(f.Parameters, param+".function.parameters")
		if aerr != nil {
			return nil, aerr
		}
		tools = append(tools, completion.Tool{Name: f.Name, Description: f.Description, Parameters: params})
	}
	return tools, nil
}

func toolNamed(tools []completion.Tool, name string) *completion.Tool {
	for i := range tools {
		if tools[i].Name == name {
			return &tools[i]
		}
	}
	return nil
}

// checkChoice checks tool_choice against the tools.
func checkChoice(choice ToolChoice, tools []completion.Tool) *apiError {
	switch choice.Mode {
	case "none", "auto", "required":
	case "function":
		if choice.Name == "" {
			return badRequest("tool_choice.function.name", "invalid_value", "tool_choice.function.name is required")
		}
		if toolNamed(tools, choice.Name) == nil {
			return badRequest("tool_choice.function.name", "invalid_value", "tool_choice names %q, which is not among the tools", choice.Name)
		}
	default:
		return badRequest("tool_choice", "invalid_value", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}, got %q", choiceText(choice))
	}
	return nil
}

// callsSchema is the schema of an answer in the call format that calls
// tools: at least one call (exactly one when parallel is false), each call
// one of the tools with its arguments.
func callsSchema(tools []completion.Tool, parallel *bool) json.RawMessage {
	alts := make([]json.RawMessage, len(tools))
	for i, t := range tools {
		alts[i] = mustJSON(map[string]any{
			"type": "object",
			"properties": orderedProps{
				{"name", json.RawMessage(mustJSON(map[string]string{"const": t.Name}))},
				{"arguments", t.Parameters},
			},
			"required": []string{"name", "arguments"},
		})
	}
	calls := map[string]any{"type": "array", "items": map[string]any{"anyOf": alts}, "minItems": 1}
	if parallel != nil && !*parallel {
		calls["maxItems"] = 1
	}
	return mustJSON(map[string]any{
		"type": "object", "properties": map[string]any{"tool_calls": calls}, "required": []string{"tool_calls"},
	})
}

func choiceText(c ToolChoice) string {
	if c.Mode == "function" {
		return "function " + c.Name
	}
	return strings.TrimPrefix(c.Mode, "type:")
}

// toolParameters checks a function's parameters schema (absent: no arguments)
// and returns it compacted.
func toolParameters(raw json.RawMessage, param string) (json.RawMessage, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return json.RawMessage(`{"type":"object","properties":{}}`), nil
	}
	if problems := checkSchema(raw); problems != nil {
		return nil, schemaError(param, problems)
	}
	var top struct {
		Type any `json:"type"`
	}
	_ = json.Unmarshal(raw, &top)
	if top.Type != nil && top.Type != "object" {
		return nil, badRequest(param, "invalid_value", "%s must be an object schema ({\"type\": \"object\", ...})", param)
	}
	return compactJSON(raw), nil
}

// planCalls checks an assistant message's tool_calls and returns them for
// the prompt (arguments compacted, "{}" when empty); it records each call's id
// in names (id -> function name), which names the results that follow.
func planCalls(calls []ToolCall, param string, names map[string]string) ([]completion.ToolCall, *apiError) {
	out := make([]completion.ToolCall, 0, len(calls))
	for i, c := range calls {
		cp := fmt.Sprintf("%s.tool_calls[%d]", param, i)
		if c.Function.Name == "" {
			return nil, badRequest(cp+".function.name", "invalid_value", "%s.function.name is required", cp)
		}
		args := json.RawMessage(strings.TrimSpace(c.Function.Arguments))
		switch {
		case len(args) == 0:
			args = json.RawMessage(`{}`)
		case !json.Valid(args):
			return nil, badRequest(cp+".function.arguments", "invalid_value", "%s.function.arguments must be a JSON string holding valid JSON", cp)
		}
		out = append(out, completion.ToolCall{Name: c.Function.Name, Arguments: compactJSON(args)})
	}
	for _, c := range calls {
		if c.ID != "" {
			names[c.ID] = c.Function.Name
		}
	}
	return out, nil
}

// ---- reading the answer ----

// finalCalls reads a finished answer: the calls it makes, or its text when it
// makes none (or when it was cut off before the call was complete).
func (t *toolPlan) finalCalls(text string) ([]ToolCall, string) {
	if t == nil {
		return nil, text
	}
	if t.mode == "function" {
		args := strings.TrimSpace(text)
		if !json.Valid([]byte(args)) {
			return nil, text
		}
		return []ToolCall{newCall(t.name, args)}, ""
	}
	trimmed := strings.TrimSpace(text)
	if !strings.HasPrefix(trimmed, "{") {
		return nil, text
	}
	var out struct {
		ToolCalls []struct {
			Name      string          `json:"name"`
			Arguments json.RawMessage `json:"arguments"`
		} `json:"tool_calls"`
	}
	if err := json.Unmarshal([]byte(trimmed), &out); err != nil || len(out.ToolCalls) == 0 {
		return nil, text
	}
	calls := make([]ToolCall, len(out.ToolCalls))
	for i, c := range out.ToolCalls {
		calls[i] = newCall(c.Name, string(c.Arguments))
	}
	return calls, ""
}

func newCall(name, args string) ToolCall {
	return ToolCall{ID: "call_" + randomHex(12), Type: "function", Function: ToolCallFunction{Name: name, Arguments: args}}
}

// toolStreamer turns streamed answer text into content or tool-call deltas, the
// way OpenAI streams them: a call's first delta has its index, id, type and name
// (arguments ""), the following ones only argument fragments.
type toolStreamer struct {
	t       *toolPlan
	buf     strings.Builder
	state   int // streamUndecided, streamText or streamCalls
	sent    int // streamText: bytes of buf sent as content
	ids     []string
	argSent []int
}

const (
	streamUndecided = iota
	streamText
	streamCalls
)

// feed takes new answer text and returns the content and call deltas to send.
func (s *toolStreamer) feed(text string) (string, []ToolCall) {
	s.buf.WriteString(text)
	all := s.buf.String()
	if s.state == streamUndecided {
		switch {
		case s.t.mode == "function":
			s.state = streamCalls
		case strings.TrimSpace(all) == "":
			return "", nil // blanks so far: a call may still follow
		case strings.HasPrefix(strings.TrimSpace(all), "{"):
			s.state = streamCalls
		default:
			s.state = streamText
		}
	}
	if s.state == streamText {
		out := all[s.sent:]
		s.sent = len(all)
		return out, nil
	}
	return "", s.callDeltas(all)
}

// end returns what is left to send and whether the answer was a call.
func (s *toolStreamer) end() (string, bool) {
	if s.state == streamCalls {
		return "", len(s.ids) > 0
	}
	all := s.buf.String()
	out := all[s.sent:]
	s.sent = len(all)
	return out, false
}

func (s *toolStreamer) callDeltas(all string) []ToolCall {
	var calls []partialCall
	if s.t.mode == "function" {
		calls = []partialCall{{name: s.t.name, nameDone: true, args: all}}
	} else {
		calls = scanCalls(all)
	}
	var out []ToolCall
	for i, c := range calls {
		if !c.nameDone {
			break
		}
		if i == len(s.ids) {
			s.ids = append(s.ids, "call_"+randomHex(12))
			s.argSent = append(s.argSent, 0)
			out = append(out, ToolCall{Index: intPtr(i), ID: s.ids[i], Type: "function", Function: ToolCallFunction{Name: c.name}})
		}
		if len(c.args) > s.argSent[i] {
			out = append(out, ToolCall{Index: intPtr(i), Function: ToolCallFunction{Arguments: c.args[s.argSent[i]:]}})
			s.argSent[i] = len(c.args)
		}
	}
	return out
}

func intPtr(i int) *int { return &i }

// partialCall is one call of a (possibly unfinished) answer in the call format.
type partialCall struct {
	name     string
	nameDone bool
	args     string // the arguments' JSON text so far
}

// scanCalls reads the calls of {"tool_calls":[{"name":...,"arguments":{...}},...]}
// as far as text goes. The grammar fixes the layout: compact JSON, each call's name
// before its arguments, so call objects are at depth 3 and their arguments open
// depth 4.
func scanCalls(text string) []partialCall {
	var calls []partialCall
	depth, cur, argsAt, strAt := 0, -1, -1, 0
	inStr, esc, expectKey := false, false, false
	key := ""
	for i := 0; i < len(text); i++ {
		ch := text[i]
		if inStr {
			switch {
			case esc:
				esc = false
			case ch == '\\':
				esc = true
			case ch == '"':
				inStr = false
				if depth != 3 || cur < 0 {
					break
				}
				var s string
				_ = json.Unmarshal([]byte(text[strAt:i+1]), &s)
				if expectKey {
					key, expectKey = s, false
				} else if key == "name" {
					calls[cur].name, calls[cur].nameDone = s, true
				}
			}
			continue
		}
		switch ch {
		case '"':
			inStr, strAt = true, i
		case '{', '[':
			depth++
			switch {
			case depth == 3 && ch == '{':
				calls = append(calls, partialCall{})
				cur, key, expectKey = len(calls)-1, "", true
			case depth == 4 && key == "arguments" && argsAt < 0:
				argsAt = i
			}
		case '}', ']':
			if depth == 4 && argsAt >= 0 {
				calls[cur].args = text[argsAt : i+1]
				argsAt, key = -1, ""
			}
			depth--
		case ',':
			if depth == 3 {
				expectKey = true
			}
		}
	}
	if argsAt >= 0 && cur >= 0 {
		calls[cur].args = text[argsAt:]
	}
	return calls
}

// ---- JSON helpers ----

// orderedProps is a JSON object that keeps its keys' order: the converter builds an
// object's grammar in property order, and a call's name must come before its
// arguments for streaming.
type orderedProps []struct {
	key string
	val json.RawMessage
}

func (o orderedProps) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, kv := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(mustJSON(kv.key))
		b.WriteByte(':')
		b.Write(kv.val)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only called on values built here
	}
	return b
}

// compactJSON is valid JSON without insignificant whitespace (key order kept).
func compactJSON(b []byte) json.RawMessage {
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return b
	}
	return out.Bytes()
}
