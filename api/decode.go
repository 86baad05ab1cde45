package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"unicode/utf8"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// decodeChatRequest parses a request body. It checks UTF-8 and maps JSON
// errors to OpenAI errors naming the offending parameter.
func decodeChatRequest(body []byte) (*ChatRequest, *apiError) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, badRequest("", "invalid_json", "the request body is empty; send a JSON object")
	}
	if !utf8.Valid(body) {
		return nil, badRequest("", "invalid_utf8", "the request body is not valid UTF-8")
	}
	var cr ChatRequest
	if err := json.Unmarshal(body, &cr); err != nil {
		return nil, jsonError(err)
	}
	return &cr, nil
}

// jsonError turns an encoding/json error into a 400.
func jsonError(err error) *apiError {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return badRequest("", "invalid_json", "the request body is not valid JSON (at byte %d): %s", se.Offset, se.Error())
	case asTypeError(err, &te):
		if te.Field == "" {
			if te.Struct == "" && te.Type == reflect.TypeFor[ChatRequest]() {
				return badRequest("", "invalid_json", "the request body must be a JSON object, not %s", article(te.Value))
			}
			return badRequest("", "invalid_type", "invalid type: expected %s, got %s", typeName(te.Type), article(te.Value))
		}
		return badRequest(te.Field, "invalid_type", "invalid type for '%s': expected %s, got %s", te.Field, typeName(te.Type), article(te.Value))
	}
	return badRequest("", "invalid_json", "the request body is not valid JSON: %v", err)
}

func asTypeError(err error, te **json.UnmarshalTypeError) bool { return errors.As(err, te) }

// article turns encoding/json's "number 1.5" / "string" into readable text.
func article(v string) string {
	switch {
	case v == "array" || v == "object":
		return "an " + v
	case v == "null":
		return "null"
	case v == "":
		return "a value"
	}
	return "a " + v
}

// typeName names a Go type the way an API user thinks of it.
func typeName(t reflect.Type) string {
	if t == nil {
		return "a value"
	}
	switch t {
	case reflect.TypeFor[MessageContent]():
		return "a string or an array of content parts"
	case reflect.TypeFor[StopList]():
		return "a string or an array of strings"
	case reflect.TypeFor[ImageURL]():
		return "an object {\"url\": ...}"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return t.String()
}

// chatPlan is a validated request: the engine request with its image parts
// still empty (each part names the request field it came from, Part.Field)
// and where to get each image.
type chatPlan struct {
	req          *completion.Request
	images       []imageRef // in prompt order: images[k] fills the request's k-th image part
	stream       bool
	includeUsage bool
	// tools is the tool-call setting (nil: the answer is text); constraintParam
	// is the request field an output constraint came from, for its errors.
	tools           *toolPlan
	constraintParam string
}

// imageRef is one image to load: a data: or http(s) URL.
type imageRef struct {
	url   string
	param string // e.g. messages[0].content[1].image_url
}

// imageParam names the request's image i (in prompt order, as the engine
// counts them) for an error; without a plan (or for an index it does not
// know) the error points at messages.
func (p *chatPlan) imageParam(i int) (param, name string) {
	if p != nil {
		k := 0
		for _, m := range p.req.Messages {
			for _, part := range m.Parts {
				if part.Kind != completion.PartImage {
					continue
				}
				if k == i && part.Field != "" {
					return part.Field, part.Field
				}
				k++
			}
		}
	}
	return "messages", fmt.Sprintf("image %d of the request", i)
}

// textParam names part j of message i of the engine request, as imageParam
// does.
func (p *chatPlan) textParam(i, j int) string {
	if p != nil && i >= 0 && i < len(p.req.Messages) && j >= 0 && j < len(p.req.Messages[i].Parts) {
		if f := p.req.Messages[i].Parts[j].Field; f != "" {
			return f
		}
	}
	return "messages"
}

// setImages puts loaded image bytes (in p.images order) into the request's
// image parts, which are in the same order.
func (p *chatPlan) setImages(data [][]byte) {
	k := 0
	for _, m := range p.req.Messages {
		for j := range m.Parts {
			if m.Parts[j].Kind == completion.PartImage {
				m.Parts[j].Image = data[k]
				k++
			}
		}
	}
}

// planLimits is what validation needs to know about the server.
type planLimits struct {
	maxImages        int
	allowImageURLs   bool
	vision           bool
	marker           string // the engine's media marker; "": not checked here
	defaultMaxTokens int    // 0: none
	cache            elasticcache.Spec
}

const maxStops = 4

// planChat validates a decoded request and builds the engine request.
// It does no I/O; images are loaded later by loadImages.
func planChat(cr *ChatRequest, lim planLimits) (*chatPlan, *apiError) {
	p := &chatPlan{req: &completion.Request{}}
	if cr.Stream != nil && *cr.Stream {
		p.stream = true
		p.includeUsage = cr.StreamOptions != nil && cr.StreamOptions.IncludeUsage
	}
	if aerr := planMessages(cr.Messages, lim, p); aerr != nil {
		return nil, aerr
	}
	if aerr := planResponseFormat(cr.ResponseFormat, p); aerr != nil {
		return nil, aerr
	}
	if aerr := planTools(cr, p); aerr != nil {
		return nil, aerr
	}
	if aerr := planLogprobs(cr, p); aerr != nil {
		return nil, aerr
	}

	for _, mt := range []struct {
		name string
		v    *int
	}{{"max_tokens", cr.MaxTokens}, {"max_completion_tokens", cr.MaxCompletionTokens}} {
		if mt.v != nil && *mt.v < 1 {
			return nil, badRequest(mt.name, "invalid_value", "%s must be at least 1, got %d", mt.name, *mt.v)
		}
	}
	switch {
	case cr.MaxCompletionTokens != nil: // the newer name wins
		p.req.MaxTokens = *cr.MaxCompletionTokens
	case cr.MaxTokens != nil:
		p.req.MaxTokens = *cr.MaxTokens
	default:
		p.req.MaxTokens = max(lim.defaultMaxTokens, 0)
	}

	if cr.N != nil && *cr.N != 1 {
		return nil, badRequest("n", "invalid_value", "only n=1 is supported, got %d", *cr.N)
	}

	if len(cr.Stop) > maxStops {
		return nil, badRequest("stop", "invalid_value", "stop holds at most %d sequences, got %d", maxStops, len(cr.Stop))
	}
	for i, s := range cr.Stop {
		if s == "" {
			return nil, badRequest(fmt.Sprintf("stop[%d]", i), "invalid_value", "stop sequences must not be empty")
		}
	}
	if len(cr.Stop) > 0 {
		p.req.Stop = append([]string(nil), cr.Stop...)
	}

	s, aerr := planSampling(cr)
	if aerr != nil {
		return nil, aerr
	}
	p.req.Sampling = s

	cache, aerr := planCache(cr.ElasticCache, lim.cache)
	if aerr != nil {
		return nil, aerr
	}
	p.req.Cache = cache
	if cr.ElasticCache != nil {
		p.req.Reuse = cr.ElasticCache.Reuse
		p.req.Explain = cr.ElasticCache.Explain != nil && *cr.ElasticCache.Explain
	}
	return p, nil
}

// planLogprobs applies logprobs and top_logprobs.
func planLogprobs(cr *ChatRequest, p *chatPlan) *apiError {
	on := cr.Logprobs != nil && *cr.Logprobs
	if cr.TopLogprobs != nil {
		n := *cr.TopLogprobs
		if n < 0 || n > completion.MaxTopLogprobs {
			return badRequest("top_logprobs", "invalid_value", "top_logprobs must be between 0 and %d, got %d", completion.MaxTopLogprobs, n)
		}
		if !on && n > 0 {
			return badRequest("top_logprobs", "invalid_value", "top_logprobs needs logprobs: true")
		}
		p.req.TopLogprobs = n
	}
	p.req.Logprobs = on
	return nil
}

// planMessages turns messages into engine messages: one part per string
// content or content part, in order, each naming the field it came from.
func planMessages(msgs []ChatMessage, lim planLimits, p *chatPlan) *apiError {
	if len(msgs) == 0 {
		return badRequest("messages", "invalid_value", "messages must be a non-empty array")
	}
	out := make([]completion.Message, 0, len(msgs))
	callNames := map[string]string{} // tool call id -> function name, from earlier assistant messages
	for i, m := range msgs {
		param := fmt.Sprintf("messages[%d]", i)
		role, aerr := planRole(m, param)
		if aerr != nil {
			return aerr
		}
		content := m.Content
		if role == "assistant" && len(m.ToolCalls) > 0 && content.IsNull() {
			content = MessageContent{Parts: []ContentPart{}}
		}
		parts, aerr := planContent(content, role, param, lim, p)
		if aerr != nil {
			return aerr
		}
		switch {
		case len(m.ToolCalls) > 0:
			calls, aerr := planCalls(m.ToolCalls, param, callNames)
			if aerr != nil {
				return aerr
			}
			parts = append(parts, completion.Part{Text: completion.CallsText(calls), Field: param + ".tool_calls"})
		case role == "tool":
			head := completion.ToolResultHead(m.ToolCallID, callNames[m.ToolCallID])
			parts = append([]completion.Part{{Text: head, Field: param + ".tool_call_id"}}, parts...)
			role = "user"
		}
		out = append(out, completion.Message{Role: role, Parts: parts})
	}
	if len(p.images) > 0 && !lim.vision {
		return badRequest("messages", "images_not_supported", "this model cannot read images (the server was started without --mmproj)")
	}
	p.req.Messages = out
	return nil
}

// planRole checks message m's role and the fields that go with it, and
// returns the role the engine gets ("developer" is "system"; "tool" stays
// "tool" here, planMessages shows a result as a user turn).
func planRole(m ChatMessage, param string) (string, *apiError) {
	role := m.Role
	switch role {
	case "system", "user", "assistant", "tool":
	case "developer":
		role = "system"
	case "":
		return "", badRequest(param+".role", "invalid_value", "%s.role is required", param)
	case "function":
		return "", badRequest(param+".role", "invalid_value", "role \"function\" is deprecated and not supported; use tools and the \"tool\" role")
	default:
		return "", badRequest(param+".role", "invalid_value", "unknown role %q (want system, developer, user, assistant or tool)", m.Role)
	}
	if role == "tool" && m.ToolCallID == "" {
		return "", badRequest(param+".tool_call_id", "invalid_value", "%s.tool_call_id is required for a tool message", param)
	}
	if len(m.ToolCalls) > 0 && role != "assistant" {
		return "", badRequest(param+".tool_calls", "invalid_value", "only assistant messages hold tool_calls")
	}
	return role, nil
}

// planContent returns a message's parts, each naming the field it came from.
// Image parts are left empty; loadImages fills them.
func planContent(c MessageContent, role, param string, lim planLimits, p *chatPlan) ([]completion.Part, *apiError) {
	switch {
	case c.Text != nil:
		pp := param + ".content"
		if aerr := checkMarker(*c.Text, lim.marker, pp); aerr != nil {
			return nil, aerr
		}
		return []completion.Part{{Text: *c.Text, Field: pp}}, nil
	case c.Parts == nil:
		if role == "assistant" {
			return nil, nil
		}
		return nil, badRequest(param+".content", "invalid_value", "%s.content is required", param)
	}
	parts := make([]completion.Part, 0, len(c.Parts))
	for j, part := range c.Parts {
		pp := fmt.Sprintf("%s.content[%d]", param, j)
		switch part.Type {
		case "text":
			if part.Text == nil {
				return nil, badRequest(pp+".text", "invalid_value", "%s.text is required for a text part", pp)
			}
			if aerr := checkMarker(*part.Text, lim.marker, pp+".text"); aerr != nil {
				return nil, aerr
			}
			parts = append(parts, completion.Part{Text: *part.Text, Field: pp + ".text"})
		case "image_url":
			ref, aerr := planImage(part.ImageURL, role, pp, lim, len(p.images))
			if aerr != nil {
				return nil, aerr
			}
			p.images = append(p.images, ref)
			parts = append(parts, completion.Part{Kind: completion.PartImage, Field: ref.param})
		case "":
			return nil, badRequest(pp+".type", "invalid_value", "%s.type is required (text or image_url)", pp)
		default:
			return nil, badRequest(pp+".type", "invalid_value", "unsupported content part type %q (want text or image_url)", part.Type)
		}
	}
	return parts, nil
}

// checkMarker refuses text holding the engine's media marker, which the
// engine would take for an image.
func checkMarker(text, marker, param string) *apiError {
	if marker != "" && strings.Contains(text, marker) {
		return markerInText(param, marker)
	}
	return nil
}

func markerInText(param, marker string) *apiError {
	return badRequest(param, "invalid_value", "text must not contain the reserved image marker %q", marker)
}

// planImage checks one image_url part; the image itself is loaded later.
func planImage(iu *ImageURL, role, pp string, lim planLimits, before int) (imageRef, *apiError) {
	param := pp + ".image_url"
	if role != "user" {
		return imageRef{}, badRequest(pp, "invalid_value", "images are only allowed in user messages, not %s", role)
	}
	if lim.maxImages <= 0 {
		return imageRef{}, badRequest(pp, "too_many_images", "images are disabled on this server (--max-images 0)")
	}
	if before >= lim.maxImages {
		return imageRef{}, badRequest("messages", "too_many_images", "a request may hold at most %d images", lim.maxImages)
	}
	if iu == nil || iu.URL == "" {
		return imageRef{}, badRequest(param+".url", "invalid_value", "%s.url is required", param)
	}
	switch iu.Detail {
	case "", "auto", "low", "high", "original":
	default:
		return imageRef{}, badRequest(param+".detail", "invalid_value", "detail must be auto, low, high or original, got %q", iu.Detail)
	}
	u := iu.URL
	switch {
	case hasPrefixFold(u, "data:"):
		// Checked and decoded by loadImages.
	case hasPrefixFold(u, "http://"), hasPrefixFold(u, "https://"):
		if !lim.allowImageURLs {
			return imageRef{}, badRequest(param+".url", "image_url_not_allowed",
				"remote image URLs are disabled on this server (see --allow-image-urls); send the image inline as data:image/png;base64,...")
		}
	default:
		return imageRef{}, badRequest(param+".url", "invalid_image_url", "image URL must be a data: URL (data:image/png;base64,...) or an http(s) URL")
	}
	return imageRef{url: u, param: param}, nil
}

func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// planSampling starts from llama-server's defaults and applies the request.
func planSampling(cr *ChatRequest) (completion.Sampling, *apiError) {
	s := completion.DefaultSampling()
	type rangeCheck struct {
		v        *float64
		name     string
		lo, hi   float64
		loOpen   bool
		describe string
		set      func(float32)
	}
	checks := []rangeCheck{
		{cr.Temperature, "temperature", 0, 2, false, "between 0 and 2", func(v float32) { s.Temperature = v }},
		{cr.TopP, "top_p", 0, 1, true, "greater than 0 and at most 1", func(v float32) { s.TopP = v }},
		{cr.MinP, "min_p", 0, 1, false, "between 0 and 1", func(v float32) { s.MinP = v }},
		{cr.PresencePenalty, "presence_penalty", -2, 2, false, "between -2 and 2", func(v float32) { s.PresencePenalty = v }},
		{cr.FrequencyPenalty, "frequency_penalty", -2, 2, false, "between -2 and 2", func(v float32) { s.FrequencyPenalty = v }},
		{cr.RepeatPenalty, "repeat_penalty", 0, 10, true, "greater than 0 and at most 10", func(v float32) { s.RepeatPenalty = v }},
	}
	for _, c := range checks {
		if c.v == nil {
			continue
		}
		v := *c.v
		if v != v || v < c.lo || v > c.hi || (c.loOpen && v == c.lo) {
			return s, badRequest(c.name, "invalid_value", "%s must be %s, got %v", c.name, c.describe, v)
		}
		c.set(float32(v))
	}
	if cr.TopK != nil {
		if *cr.TopK < 0 {
			return s, badRequest("top_k", "invalid_value", "top_k must be >= 0 (0: disabled), got %d", *cr.TopK)
		}
		s.TopK = int32(min(*cr.TopK, 1<<30))
	}
	if cr.Seed != nil {
		s.Seed = foldSeed(*cr.Seed)
	}
	return s, nil
}

// foldSeed maps an OpenAI (int64) seed onto llama.cpp's uint32 seed:
// -1 means random (0xFFFFFFFF), 0..2^32-2 map to themselves, anything else is
// folded into that range deterministically.
func foldSeed(seed int64) uint32 {
	const random = 0xFFFFFFFF
	if seed == -1 {
		return random
	}
	u := uint64(seed)
	v := uint32(u ^ u>>32)
	if v == random {
		v--
	}
	return v
}

// planCache applies the elastic_cache extension to the server default and
// validates the result (elasticcache.Spec.With).
func planCache(ec *ElasticCacheParams, def elasticcache.Spec) (elasticcache.Spec, *apiError) {
	if ec == nil {
		return def, nil
	}
	spec, err := def.With(elasticcache.Overrides{Policy: ec.Policy, Budget: ec.Budget, Sink: ec.Sink, Distance: ec.Distance, Selection: ec.Selection})
	if err != nil {
		return elasticcache.Spec{}, cacheError(err)
	}
	return spec, nil
}

func cacheError(err error) *apiError {
	var ce *elasticcache.ConfigError
	if errors.As(err, &ce) && ce.Field != "" {
		param := "elastic_cache." + strings.TrimPrefix(ce.Field, "elastic_cache.")
		return badRequest(param, "invalid_value", "%s: %s", param, ce.Msg)
	}
	return badRequest("elastic_cache", "invalid_value", "elastic_cache: %v", err)
}
