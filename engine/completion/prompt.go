package completion

import (
	"encoding/json"
	"fmt"
	"strings"
)

// The prompt's own text. Everything a request adds to the conversation before the
// model's chat template sees it is written here: how a message's parts are
// joined (TemplateMessages, which the engine's RenderPrompt applies the template
// to), how tools are described in the system text (DescribeTools), how a past
// tool call and a tool's result read (CallsText, ToolResultHead), and the start
// of an answer that must call a named function (CallPrefix). The call format,
// {"tool_calls":[{"name":...,"arguments":{...}}]}, is the model's and the API
// reads answers in it; it is not the wire format of any API.

// TemplateMessage is one message as the chat template gets it.
type TemplateMessage struct {
	Role    string
	Content string
}

// TemplateMessages joins each message's parts by "\n" (llama-server's rule for
// OpenAI content arrays), every image part becoming marker, and returns the
// images in marker order. A text part that holds marker is refused
// (*MarkerInTextError): it would be taken for an image.
//
// A past answer (an assistant message) is written without its leading spaces:
// a model answers "ASSISTANT:" with " red", and templates put their own
// separator before a past answer ("ASSISTANT: " + content), so the space is
// written once, as the model saw it when it generated the answer. That also
// makes the rendered history hold the answer's tokens as they were generated,
// which is what lets the next turn continue from the conversation's cells.
func TemplateMessages(msgs []Message, marker string) ([]TemplateMessage, [][]byte, error) {
	var images [][]byte
	out := make([]TemplateMessage, len(msgs))
	for i, msg := range msgs {
		pieces := make([]string, len(msg.Parts))
		for j, p := range msg.Parts {
			switch p.Kind {
			case PartText:
				if strings.Contains(p.Text, marker) {
					return nil, nil, &MarkerInTextError{Message: i, Part: j, Marker: marker}
				}
				pieces[j] = p.Text
				if msg.Role == "assistant" && j == 0 {
					pieces[j] = strings.TrimLeft(p.Text, " ")
				}
			case PartImage:
				pieces[j] = marker
				images = append(images, p.Image)
			default:
				return nil, nil, fmt.Errorf("engine: messages[%d] part %d has unknown kind %d", i, j, p.Kind)
			}
		}
		out[i] = TemplateMessage{Role: msg.Role, Content: strings.Join(pieces, "\n")}
	}
	return out, images, nil
}

// Tool is a function the model may call, as it is described to the model.
type Tool struct {
	Name        string
	Description string          // "": none
	Parameters  json.RawMessage // compact JSON schema of the arguments
}

// ToolsField is the Field of the part that describes the tools.
const ToolsField = "tools"

// DescribeTools adds the tools and the call format to the system text: a part
// (Field ToolsField) at the end of the first message when it is a system
// message, else a new system message before the others. optional says that the
// model may answer in plain text instead.
func DescribeTools(msgs []Message, tools []Tool, optional bool) []Message {
	var b strings.Builder
	b.WriteString("You can call these tools (one JSON line per tool: name, description, JSON schema of the arguments):\n")
	for _, t := range tools {
		line, _ := json.Marshal(struct {
			Name        string          `json:"name"`
			Description string          `json:"description,omitempty"`
			Parameters  json.RawMessage `json:"parameters"`
		}{t.Name, t.Description, t.Parameters})
		b.Write(line)
		b.WriteByte('\n')
	}
	b.WriteString("To call tools, answer with only this JSON, nothing else: ")
	b.WriteString(`{"tool_calls":[{"name":"TOOL_NAME","arguments":{...}}]}`)
	b.WriteString("\nEach result comes back in the next message.")
	if optional {
		b.WriteString(" When no tool is needed, answer in plain text.")
	}
	part := Part{Kind: PartText, Text: b.String(), Field: ToolsField}
	if len(msgs) > 0 && msgs[0].Role == "system" {
		msgs[0].Parts = append(msgs[0].Parts, part)
		return msgs
	}
	return append([]Message{{Role: "system", Parts: []Part{part}}}, msgs...)
}

// ToolCall is one call of a past answer: a function and its arguments (JSON).
type ToolCall struct {
	Name      string
	Arguments json.RawMessage
}

// CallsText is a past answer's calls in the call format (compact JSON).
func CallsText(calls []ToolCall) string {
	type call struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	}
	out := make([]call, len(calls))
	for i, c := range calls {
		out[i] = call{c.Name, c.Arguments}
	}
	b, _ := json.Marshal(map[string]any{"tool_calls": out})
	return string(b)
}

// ToolResultHead is the line before a tool's result. Templates know user and
// assistant turns, so a result is shown as a user turn that starts with this
// line; name is the called function ("": not known).
func ToolResultHead(callID, name string) string {
	head := "Result of tool call " + callID
	if name != "" {
		head += " (" + name + ")"
	}
	return head + ":"
}

// CallPrefix is the start of an answer that calls the function name: the
// model goes on with the call's arguments (Request.AnswerPrefix).
func CallPrefix(name string) string {
	n, _ := json.Marshal(name)
	return `{"tool_calls":[{"name":` + string(n) + `,"arguments":`
}
