// Package completion holds the request and event types shared by the engine and the
// HTTP layer. It has no cgo, so packages that only speak these types stay pure Go.
package completion

import (
	"errors"
	"fmt"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// Message is one chat turn after the API layer has flattened its content parts.
// Images referenced by the turn appear in Content as the engine's media marker
// (ImageMarker) in the order the bytes appear in Request.Images.
type Message struct {
	Role    string
	Content string
}

// ImageMarker stands for one image inside Message.Content.
const ImageMarker = "<__media__>"

// Sampling holds the sampler settings of one request. Zero Temperature means greedy.
type Sampling struct {
	Temperature      float32
	TopK             int32
	TopP             float32
	MinP             float32
	RepeatPenalty    float32
	PresencePenalty  float32
	FrequencyPenalty float32
	RepeatLastN      int32
	Seed             uint32
}

// DefaultSampling mirrors llama-server's defaults.
func DefaultSampling() Sampling {
	return Sampling{Temperature: 0.8, TopK: 40, TopP: 0.95, MinP: 0.05, RepeatPenalty: 1.0, RepeatLastN: 64, Seed: 0xFFFFFFFF}
}

// Request is one completion request, validated by the API layer.
type Request struct {
	ID        string
	Messages  []Message
	Images    [][]byte // encoded PNG/JPEG bytes, in marker order
	MaxTokens int      // 0: until the context is full or EOS
	Stop      []string
	Sampling  Sampling
	// Force, when set, replaces sampling: generation feeds these tokens one by one (the
	// reference answer of a perplexity run) and the final event reports their NLL.
	Force []int32
	// Cache is the Elastic Cache setting for this request (server default already applied).
	Cache elasticcache.Config
}

// FinishReason values follow the OpenAI API.
const (
	FinishStop   = "stop"
	FinishLength = "length"
)

// Usage counts tokens the way the OpenAI API does.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// KVReport says what the cache policy did for one request.
type KVReport struct {
	Policy        string  `json:"policy"`
	Budget        float64 `json:"budget"`
	PromptEntries int     `json:"prompt_entries"`
	Kept          int     `json:"kept"`
	Merged        int     `json:"merged"`
	Evicted       int     `json:"evicted"`
	PeakCells     int     `json:"peak_cells"`
	FinalCells    int     `json:"final_cells"`
	BytesSaved    int64   `json:"bytes_saved"`
	// Timings: prompt encoding, the prefill plan (capture read-out + merge + rewrite),
	// and generation.
	PrefillMs  float64 `json:"prefill_ms"`
	CompressMs float64 `json:"compress_ms"`
	DecodeMs   float64 `json:"decode_ms"`
}

// Event is what a running request sends to its caller. Exactly one event has
// Done set, and it is the last one; Err is non-nil only on that last event.
type Event struct {
	Text         string // new, UTF-8 complete content since the previous event
	Done         bool
	FinishReason string
	Usage        Usage
	KV           *KVReport
	Err          error
	// NLL and NLLTokens: summed negative log-likelihood of the forced tokens (Request.Force).
	NLL       float64
	NLLTokens int
}

// ErrQueueFull is returned by Submit when the waiting queue is at capacity.
var ErrQueueFull = errors.New("engine: request queue is full")

// ErrShuttingDown is returned by Submit once the engine is stopping.
var ErrShuttingDown = errors.New("engine: shutting down")

// InputError is a problem with the request itself (HTTP 400 class).
type InputError struct {
	Param string // OpenAI error param, e.g. "messages"
	Code  string // OpenAI error code, e.g. "context_length_exceeded"
	Msg   string
}

func (e *InputError) Error() string { return e.Msg }

// PromptTooLong builds the error for a prompt that cannot fit in a sequence.
func PromptTooLong(promptTokens, maxTokens int) *InputError {
	return &InputError{
		Param: "messages",
		Code:  "context_length_exceeded",
		Msg: fmt.Sprintf("the prompt is %d tokens but a sequence holds at most %d; shorten the messages or raise --ctx-size",
			promptTokens, maxTokens),
	}
}
