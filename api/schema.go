package api

import (
	"bytes"
	"encoding/json"
	"reflect"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// ---- requests ----

// ChatRequest is the body of POST /v1/chat/completions. Fields this server
// does not know are ignored (the OpenAI SDKs send a few).
type ChatRequest struct {
	Model               string         `json:"model"`
	Messages            []ChatMessage  `json:"messages"`
	MaxTokens           *int           `json:"max_tokens"`
	MaxCompletionTokens *int           `json:"max_completion_tokens"`
	Temperature         *float64       `json:"temperature"`
	TopP                *float64       `json:"top_p"`
	Seed                *int64         `json:"seed"`
	Stop                StopList       `json:"stop"`
	PresencePenalty     *float64       `json:"presence_penalty"`
	FrequencyPenalty    *float64       `json:"frequency_penalty"`
	N                   *int           `json:"n"`
	Stream              *bool          `json:"stream"`
	StreamOptions       *StreamOptions `json:"stream_options"`

	Logprobs          *bool           `json:"logprobs"`
	TopLogprobs       *int            `json:"top_logprobs"`
	Tools             []Tool          `json:"tools"`
	ToolChoice        *ToolChoice     `json:"tool_choice"`
	ParallelToolCalls *bool           `json:"parallel_tool_calls"`
	ResponseFormat    *ResponseFormat `json:"response_format"`

	// llama.cpp-style sampler extensions.
	TopK          *int     `json:"top_k"`
	MinP          *float64 `json:"min_p"`
	RepeatPenalty *float64 `json:"repeat_penalty"`

	// ElasticCache overrides the server's default cache setting for this request.
	ElasticCache *ElasticCacheParams `json:"elastic_cache"`
}

// StreamOptions is stream_options.
type StreamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// ElasticCacheParams is the elastic_cache extension; missing fields keep the
// server default.
type ElasticCacheParams struct {
	Policy   *string  `json:"policy"`
	Budget   *float64 `json:"budget"`
	Sink     *int     `json:"sink"`
	Distance *int     `json:"distance"`
	// Selection is "paper" (the method as published) or "reference" (parity
	// with the authors' published code).
	Selection *string `json:"selection"`
	// Reuse false keeps this request from continuing a held conversation's cells
	// and from being held itself.
	Reuse *bool `json:"reuse"`
	// Explain true adds kv_cache.explain: what the cache did to each prompt
	// entry, per layer.
	Explain *bool `json:"explain"`
}

// ChatMessage is one entry of messages.
type ChatMessage struct {
	Role       string         `json:"role"`
	Content    MessageContent `json:"content"`
	Name       string         `json:"name,omitempty"`
	ToolCalls  []ToolCall     `json:"tool_calls,omitempty"`   // assistant messages
	ToolCallID string         `json:"tool_call_id,omitempty"` // tool messages
}

// MessageContent is a message's content: a string, an array of parts, or null.
type MessageContent struct {
	Text  *string       // set when content was a JSON string
	Parts []ContentPart // set (non-nil) when content was an array
}

// IsNull reports whether content was null or absent.
func (c MessageContent) IsNull() bool { return c.Text == nil && c.Parts == nil }

// UnmarshalJSON accepts a string, an array of parts, or null.
func (c *MessageContent) UnmarshalJSON(b []byte) error {
	*c = MessageContent{}
	switch firstByte(b) {
	case 'n':
		return nil
	case '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		c.Text = &s
		return nil
	case '[':
		parts := []ContentPart{}
		if err := json.Unmarshal(b, &parts); err != nil {
			return err
		}
		c.Parts = parts
		return nil
	}
	return &json.UnmarshalTypeError{Value: jsonKind(b), Type: reflect.TypeFor[MessageContent](), Field: ""}
}

// ContentPart is one element of an array content.
type ContentPart struct {
	Type     string    `json:"type"`
	Text     *string   `json:"text"`
	ImageURL *ImageURL `json:"image_url"`
}

// ImageURL is a part's image_url: an object {url, detail} or, leniently, a bare string.
type ImageURL struct {
	URL    string `json:"url"`
	Detail string `json:"detail,omitempty"`
}

// UnmarshalJSON accepts {"url": ..., "detail": ...} or a string.
func (u *ImageURL) UnmarshalJSON(b []byte) error {
	if firstByte(b) == '"' {
		*u = ImageURL{}
		return json.Unmarshal(b, &u.URL)
	}
	if firstByte(b) != '{' {
		return &json.UnmarshalTypeError{Value: jsonKind(b), Type: reflect.TypeFor[ImageURL]()}
	}
	type plain ImageURL
	var p plain
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	*u = ImageURL(p)
	return nil
}

// StopList is stop: a string, an array of strings, or null.
type StopList []string

// UnmarshalJSON accepts a string, an array of strings, or null.
func (s *StopList) UnmarshalJSON(b []byte) error {
	switch firstByte(b) {
	case 'n':
		*s = nil
		return nil
	case '"':
		var one string
		if err := json.Unmarshal(b, &one); err != nil {
			return err
		}
		*s = StopList{one}
		return nil
	case '[':
		var many []string
		if err := json.Unmarshal(b, &many); err != nil {
			var te *json.UnmarshalTypeError
			if asTypeError(err, &te) {
				return &json.UnmarshalTypeError{Value: te.Value, Type: reflect.TypeFor[string](), Offset: te.Offset}
			}
			return err
		}
		if many == nil {
			many = []string{}
		}
		*s = many
		return nil
	}
	return &json.UnmarshalTypeError{Value: jsonKind(b), Type: reflect.TypeFor[StopList]()}
}

func firstByte(b []byte) byte {
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 {
		return 0
	}
	return b[0]
}

// jsonKind names a JSON value's kind the way encoding/json does in its errors.
func jsonKind(b []byte) string {
	switch firstByte(b) {
	case '{':
		return "object"
	case '[':
		return "array"
	case '"':
		return "string"
	case 't', 'f':
		return "bool"
	case 'n':
		return "null"
	}
	return "number"
}

// ---- responses ----

// ChatCompletion is the non-streaming response.
type ChatCompletion struct {
	ID                string             `json:"id"`
	Object            string             `json:"object"` // "chat.completion"
	Created           int64              `json:"created"`
	Model             string             `json:"model"`
	Choices           []ChatChoice       `json:"choices"`
	Usage             Usage              `json:"usage"`
	KVCache           *KVCacheReport     `json:"kv_cache,omitempty"`
	SystemFingerprint string             `json:"system_fingerprint,omitempty"`
	Timings           *CompletionTimings `json:"timings,omitempty"`
}

// Usage is the OpenAI usage object.
type Usage struct {
	PromptTokens        int                 `json:"prompt_tokens"`
	CompletionTokens    int                 `json:"completion_tokens"`
	TotalTokens         int                 `json:"total_tokens"`
	PromptTokensDetails PromptTokensDetails `json:"prompt_tokens_details"`
}

// PromptTokensDetails is usage.prompt_tokens_details. CachedTokens counts prompt
// tokens (image tokens included) whose KV entries came from a held conversation
// instead of being encoded.
type PromptTokensDetails struct {
	CachedTokens int `json:"cached_tokens"`
}

func usageOf(u completion.Usage) Usage {
	return Usage{PromptTokens: u.PromptTokens, CompletionTokens: u.CompletionTokens, TotalTokens: u.TotalTokens,
		PromptTokensDetails: PromptTokensDetails{CachedTokens: u.CachedTokens}}
}

// ChoiceLogprobs is a choice's logprobs.
type ChoiceLogprobs struct {
	Content []LogprobEntry `json:"content"`
	Refusal []LogprobEntry `json:"refusal"`
}

// LogprobEntry is one token's log-probability.
type LogprobEntry struct {
	Token       string       `json:"token"`
	Logprob     float64      `json:"logprob"`
	Bytes       []int        `json:"bytes"`
	TopLogprobs []TopLogprob `json:"top_logprobs"`
}

// TopLogprob is one alternative of top_logprobs.
type TopLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// logprobsOf converts the engine's entries; nil when there are none.
func logprobsOf(lps []completion.TokenLogprob) *ChoiceLogprobs {
	if lps == nil {
		return nil
	}
	out := &ChoiceLogprobs{Content: make([]LogprobEntry, len(lps))}
	for i, lp := range lps {
		e := LogprobEntry{Token: lp.Token, Logprob: lp.Logprob, Bytes: bytesOf(lp.Bytes), TopLogprobs: make([]TopLogprob, len(lp.Top))}
		for j, t := range lp.Top {
			e.TopLogprobs[j] = TopLogprob{Token: t.Token, Logprob: t.Logprob, Bytes: bytesOf(t.Bytes)}
		}
		out.Content[i] = e
	}
	return out
}

// bytesOf is a byte slice as OpenAI writes it: an array of integers.
func bytesOf(b []byte) []int {
	out := make([]int, len(b))
	for i, c := range b {
		out[i] = int(c)
	}
	return out
}

// KVCacheReport is the kv_cache extension: what the cache policy did.
type KVCacheReport struct {
	Policy        string  `json:"policy"`
	Budget        float64 `json:"budget"`
	Selection     string  `json:"selection,omitempty"`
	PromptEntries int     `json:"prompt_entries"`
	Reused        int     `json:"reused"`
	// ReusedFrom says where the reused cells were: "slot" (held in the slot),
	// "host" (restored from host memory) or "disk" (from --cache-dir); absent
	// when nothing was reused.
	ReusedFrom string  `json:"reused_from,omitempty"`
	Kept       int     `json:"kept"`
	Merged     int     `json:"merged"`
	Evicted    int     `json:"evicted"`
	PeakCells  int     `json:"peak_cells"`
	FinalCells int     `json:"final_cells"`
	BytesSaved int64   `json:"bytes_saved"`
	PrefillMs  float64 `json:"prefill_ms"`
	CompressMs float64 `json:"compress_ms"`
	DecodeMs   float64 `json:"decode_ms"`
	// Explain is present when the request asked for elastic_cache.explain.
	Explain *KVExplain `json:"explain,omitempty"`
}

// KVExplain is kv_cache.explain: per planned layer, the prompt regions' counts;
// per picture, its tiles and each entry's state per layer; and the prompt's spans.
type KVExplain struct {
	Layers []ExplainLayer `json:"layers"`
	Images []ExplainImage `json:"images"`
	Spans  []ExplainSpan  `json:"spans"`
}

// ExplainLayer is one layer that the policy plans (a sliding-window model's
// full-attention layers only), by model layer index.
type ExplainLayer struct {
	Layer    int          `json:"layer"`
	System   RegionCounts `json:"system"`
	Image    RegionCounts `json:"image"`
	Question RegionCounts `json:"question"`
	Template RegionCounts `json:"template"`
	Answer   RegionCounts `json:"answer"`
}

// RegionCounts are one region's entries in one layer: at the prompt plan each is
// kept, merged or evicted; decode_evicted were dropped while generating; held are
// left at the end. For the answer, entries counts generated tokens.
type RegionCounts struct {
	Entries       int `json:"entries"`
	Kept          int `json:"kept"`
	Merged        int `json:"merged"`
	Evicted       int `json:"evicted"`
	DecodeEvicted int `json:"decode_evicted"`
	Held          int `json:"held"`
}

// ExplainImage is one picture: its first prompt index, its entries (over all
// its tiles), its grid (rows x cols, row-major) or queries when it is one tile,
// its tiles, and per layer a string with one letter per entry (k kept, m merged,
// e evicted at the prompt plan, d evicted while generating) and, per entry, the
// prompt index of the anchor a merged entry went into (-1 otherwise).
type ExplainImage struct {
	Start   int           `json:"start"`
	Entries int           `json:"entries"`
	Rows    int           `json:"rows,omitempty"`
	Cols    int           `json:"cols,omitempty"`
	Queries int           `json:"queries,omitempty"`
	Tiles   []ExplainTile `json:"tiles"`
	States  []string      `json:"states"`
	Anchors [][]int       `json:"anchors"`
}

// ExplainTile is one tile of a picture: where its entries are in the prompt
// (start) and in the image's rows (offset), its grid or queries, the tag before
// it, and its place in the picture (overview, or row/col of tile_rows x
// tile_cols, from 1).
type ExplainTile struct {
	Start    int    `json:"start"`
	Offset   int    `json:"offset"`
	Entries  int    `json:"entries"`
	Rows     int    `json:"rows,omitempty"`
	Cols     int    `json:"cols,omitempty"`
	Queries  int    `json:"queries,omitempty"`
	Label    string `json:"label,omitempty"`
	Overview bool   `json:"overview,omitempty"`
	Row      int    `json:"row,omitempty"`
	Col      int    `json:"col,omitempty"`
	TileRows int    `json:"tile_rows,omitempty"`
	TileCols int    `json:"tile_cols,omitempty"`
}

// ExplainSpan is a run of prompt entries of one region (an image tile, or text
// with its text), so that an anchor's prompt index can be named.
type ExplainSpan struct {
	Region  string `json:"region"`
	Start   int    `json:"start"`
	Entries int    `json:"entries"`
	Text    string `json:"text,omitempty"`
}

func explainOf(x *completion.KVExplain) *KVExplain {
	if x == nil {
		return nil
	}
	out := &KVExplain{Layers: make([]ExplainLayer, 0, len(x.Layers)), Images: make([]ExplainImage, 0, len(x.Images)),
		Spans: make([]ExplainSpan, 0, len(x.Spans))}
	rc := func(c completion.RegionCounts) RegionCounts {
		return RegionCounts{Entries: c.Entries, Kept: c.Kept, Merged: c.Merged, Evicted: c.Evicted, DecodeEvicted: c.DecodeEvicted, Held: c.Held}
	}
	for _, l := range x.Layers {
		r := l.Regions
		out.Layers = append(out.Layers, ExplainLayer{Layer: l.Layer,
			System: rc(r[completion.RegionSystem]), Image: rc(r[completion.RegionImage]), Question: rc(r[completion.RegionQuestion]),
			Template: rc(r[completion.RegionTemplate]), Answer: rc(r[completion.RegionAnswer])})
	}
	for _, im := range x.Images {
		e := ExplainImage{Start: im.Start, Entries: im.Entries, Rows: im.Rows, Cols: im.Cols, Queries: im.Queries,
			Tiles: make([]ExplainTile, 0, len(im.Tiles)), States: im.States, Anchors: im.Anchors}
		for _, t := range im.Tiles {
			e.Tiles = append(e.Tiles, ExplainTile{Start: t.Start, Offset: t.Offset, Entries: t.Entries, Rows: t.Rows, Cols: t.Cols,
				Queries: t.Queries, Label: t.Label, Overview: t.Overview, Row: t.Row, Col: t.Col, TileRows: t.TileRows, TileCols: t.TileCols})
		}
		out.Images = append(out.Images, e)
	}
	for _, sp := range x.Spans {
		name := "region"
		if sp.Region >= 0 && sp.Region < completion.NumRegions {
			name = completion.RegionNames[sp.Region]
		}
		out.Spans = append(out.Spans, ExplainSpan{Region: name, Start: sp.Start, Entries: sp.Entries, Text: sp.Text})
	}
	return out
}

// kvCacheOf is nil when the engine sent no report.
func kvCacheOf(kv *completion.KVReport) *KVCacheReport {
	if kv == nil {
		return nil
	}
	return &KVCacheReport{
		Policy: kv.Policy, Budget: kv.Budget, Selection: kv.Selection, PromptEntries: kv.PromptEntries, Reused: kv.Reused, ReusedFrom: kv.ReusedFrom,
		Kept: kv.Kept, Merged: kv.Merged, Evicted: kv.Evicted,
		PeakCells: kv.PeakCells, FinalCells: kv.FinalCells, BytesSaved: kv.BytesSaved,
		PrefillMs: kv.PrefillMs, CompressMs: kv.CompressMs, DecodeMs: kv.DecodeMs,
		Explain: explainOf(kv.Explain),
	}
}

// CompletionTimings is a llama-server style extension.
type CompletionTimings struct {
	TotalMS            float64 `json:"total_ms"`
	PredictedPerSecond float64 `json:"predicted_per_second"`
}

// ChatChoice is one element of choices in a non-streaming response.
type ChatChoice struct {
	Index        int              `json:"index"`
	Message      AssistantMessage `json:"message"`
	FinishReason string           `json:"finish_reason"`
	Logprobs     *ChoiceLogprobs  `json:"logprobs"` // null unless asked for
}

// AssistantMessage is the generated message. Content is null when the answer is
// tool calls.
type AssistantMessage struct {
	Role      string     `json:"role"`
	Content   *string    `json:"content"`
	Refusal   *string    `json:"refusal"` // always null: this server never refuses by policy
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

// ChatCompletionChunk is one SSE event of a streaming response.
type ChatCompletionChunk struct {
	ID                string         `json:"id"`
	Object            string         `json:"object"` // "chat.completion.chunk"
	Created           int64          `json:"created"`
	Model             string         `json:"model"`
	Choices           []ChunkChoice  `json:"choices"`
	Usage             *Usage         `json:"usage,omitempty"`
	KVCache           *KVCacheReport `json:"kv_cache,omitempty"`
	SystemFingerprint string         `json:"system_fingerprint,omitempty"`
}

// ChunkChoice is one element of choices in a chunk.
type ChunkChoice struct {
	Index        int             `json:"index"`
	Delta        Delta           `json:"delta"`
	FinishReason *string         `json:"finish_reason"` // null until the last content chunk
	Logprobs     *ChoiceLogprobs `json:"logprobs"`      // null unless asked for
}

// Delta is the incremental message of a chunk.
type Delta struct {
	Role      string     `json:"role,omitempty"`
	Content   *string    `json:"content,omitempty"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

// Model is one entry of GET /v1/models.
type Model struct {
	ID      string `json:"id"`
	Object  string `json:"object"` // "model"
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// ElasticCache: whether the loaded model can apply each elastic_cache policy.
	ElasticCache *ModelCache `json:"elastic_cache,omitempty"`
}

// ModelList is the body of GET /v1/models.
type ModelList struct {
	Object string  `json:"object"` // "list"
	Data   []Model `json:"data"`
}

// ErrorBody is the body of every error response.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail follows the OpenAI error object.
type ErrorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}
