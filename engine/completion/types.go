// Package completion holds the request, event and error types shared by the engine
// and its callers (the HTTP layer, the eval tool, the demo tools). It has no cgo, so
// packages that only speak these types stay pure Go. These are the engine's own types:
// they carry no wire format (the API layer owns JSON).
package completion

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// PartKind says what a message part holds.
type PartKind int

// The kinds of message parts.
const (
	PartText PartKind = iota
	PartImage
)

// Part is one piece of a message: text, or an encoded image (PNG or JPEG bytes).
type Part struct {
	Kind  PartKind
	Text  string
	Image []byte
	// Field is the request field the part came from, as its caller names it
	// (the API: a JSON path such as "messages[2].content[1].text"), so that an
	// error about the part can point at it; "" when the caller has none.
	Field string
}

// Text is a text part.
func Text(s string) Part { return Part{Kind: PartText, Text: s} }

// Image is an image part holding encoded image bytes.
func Image(data []byte) Part { return Part{Kind: PartImage, Image: data} }

// Message is one chat turn. The engine renders a message's parts joined by "\n"
// (llama-server's rule for OpenAI content arrays), an image part becoming the
// vision encoder's media marker.
type Message struct {
	Role  string
	Parts []Part
}

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

// Request is one completion request.
type Request struct {
	ID        string
	Messages  []Message
	MaxTokens int // 0: until the context is full or EOS
	Stop      []string
	Sampling  Sampling
	// Force, when set, replaces sampling: generation feeds these tokens one by one (the
	// reference answer of a perplexity run) and the final event reports their NLL.
	Force []int32
	// Cache is the validated cache setting for this request (server default already
	// applied); the zero Spec is full.
	Cache elasticcache.Spec
	// Reuse, when set to false, keeps this request from continuing a held
	// conversation's cells and from being held itself; nil follows the engine.
	Reuse *bool
	// Constraint, when set, restricts what may be generated (structured output, tool
	// calls). It works with every cache policy: it acts on sampling only.
	Constraint *Constraint
	// AnswerPrefix is the start of the answer, written by the caller: it is rendered
	// right after the chat template's assistant header and the model continues it. It
	// is not part of the generated text (nor of Usage.CompletionTokens); a Constraint
	// applies to what follows it.
	AnswerPrefix string
	// Logprobs asks for each generated token's log-probability, and TopLogprobs
	// (0..MaxTopLogprobs) for that many most likely alternatives at each step.
	Logprobs    bool
	TopLogprobs int
	// Explain asks for KVReport.Explain: what the cache did to every prompt entry,
	// per layer. An explained request neither continues a held conversation nor is
	// held, so the explanation covers its whole prompt.
	Explain bool
}

// MaxTopLogprobs is the most alternatives a request may ask for per token.
const MaxTopLogprobs = 20

// Constraint says what the generated text must be.
type Constraint struct {
	// Schema is a JSON schema; the answer is compact JSON (no whitespace between
	// tokens) that matches it, then end of generation.
	Schema []byte
	// OrText also allows an answer that is plain text: anything that does not begin,
	// after optional whitespace, with "{". An answer that begins with "{" must match
	// Schema. (For tool calls the model may choose: a call or a reply.)
	OrText bool
}

// Images returns the request's image parts' bytes in prompt order.
func (r *Request) Images() [][]byte {
	var out [][]byte
	for _, m := range r.Messages {
		for _, p := range m.Parts {
			if p.Kind == PartImage {
				out = append(out, p.Image)
			}
		}
	}
	return out
}

// FinishReason values follow the OpenAI API.
const (
	FinishStop   = "stop"
	FinishLength = "length"
)

// Usage counts tokens.
type Usage struct {
	PromptTokens     int
	CompletionTokens int
	TotalTokens      int
	// CachedTokens: prompt tokens whose KV entries came from a held conversation
	// instead of being encoded (image tokens included).
	CachedTokens int
}

// KVReport says what the cache policy did for one request.
type KVReport struct {
	Policy        string
	Budget        float64 // in effect: 1 for full
	Selection     string  // the selection rule of a compressing setting; "" when nothing is compressed
	PromptEntries int
	Reused        int // prompt entries served by a held conversation's cells (not encoded)
	// ReusedFrom says where those cells were: "slot" (held in the request's slot),
	// "host" or "disk" (restored from that tier); "" when Reused is 0.
	ReusedFrom string
	Kept       int // entries per layer right after the prompt plan
	Merged     int
	Evicted    int
	PeakCells  int
	FinalCells int
	BytesSaved int64 // KV bytes not held at the end, compared with full
	// Timings: prompt encoding, the prefill plan (capture read-out + merge + rewrite),
	// and generation.
	PrefillMs  float64
	CompressMs float64
	DecodeMs   float64
	// Explain is set when the request asked for it (Request.Explain).
	Explain *KVExplain
}

// Region is the part of a sequence a cache entry belongs to.
type Region int

// Prompt regions of KVExplain, in order.
const (
	RegionSystem   Region = iota // the text of system messages
	RegionImage                  // an image's embeddings
	RegionQuestion               // the text of the other messages
	RegionTemplate               // everything else in the prompt: BOS, role markers, separators
	RegionAnswer                 // generated tokens
	NumRegions
)

// RegionNames are the regions' names, indexed by region.
var RegionNames = [NumRegions]string{"system", "image", "question", "template", "answer"}

func (g Region) String() string {
	if g >= 0 && g < NumRegions {
		return RegionNames[g]
	}
	return fmt.Sprintf("region(%d)", int(g))
}

// RegionCounts are one region's entries in one layer. Every prompt entry is, at
// the prompt plan, kept, merged into a kept entry, or evicted (without a plan all
// are kept); DecodeEvicted counts entries evicted while the answer was generated
// and Held those left at the end. For the answer region, Entries counts the
// generated tokens that entered the cache and Kept, Merged, Evicted stay 0.
type RegionCounts struct {
	Entries, Kept, Merged, Evicted, DecodeEvicted, Held int
}

// Add adds o to c.
func (c *RegionCounts) Add(o RegionCounts) {
	c.Entries += o.Entries
	c.Kept += o.Kept
	c.Merged += o.Merged
	c.Evicted += o.Evicted
	c.DecodeEvicted += o.DecodeEvicted
	c.Held += o.Held
}

// LayerRegions are one layer's counts, indexed by region.
type LayerRegions [NumRegions]RegionCounts

// Entry states of ExplainImage.States.
const (
	StateKept          = 'k' // kept whole by the prompt plan and held at the end
	StateMerged        = 'm' // averaged into a kept entry (its anchor) by the prompt plan
	StateEvicted       = 'e' // dropped by the prompt plan
	StateDecodeEvicted = 'd' // kept by the prompt plan, evicted while generating
)

// KVExplain is what the cache did to one request's prompt, per cache layer that a
// policy plans (every layer; a sliding-window model's full-attention layers).
type KVExplain struct {
	Layers []ExplainLayer
	Images []ExplainImage
	// Spans cut the prompt into runs of one region: an image tile, or text (with
	// its text), so that an anchor's prompt index can be named.
	Spans []ExplainSpan
}

// ExplainLayer is one planned layer: its model layer index and counts per region.
type ExplainLayer struct {
	Layer   int
	Regions LayerRegions
}

// ExplainSpan is a run of prompt entries of one region.
type ExplainSpan struct {
	Region  Region
	Start   int // prompt index of its first entry
	Entries int
	Text    string // the tokens' text (special tokens spelled out); "" for an image tile
}

// ExplainImage is one picture of the prompt: its tiles, and each of its entries'
// state per planned layer. A picture that the encoder reads as several tiles
// (LLaVA-1.6's anyres, SmolVLM's and MiniCPM-V's slices) is still one image, its
// entries those of its tiles in prompt order; the text the encoder puts between
// tiles is not counted.
type ExplainImage struct {
	Start   int // prompt index of its first entry
	Entries int // its entries over all tiles
	// Rows x Cols is its grid of entries (row-major) when it is one tile with a
	// grid; Queries its entries when it is one tile without a grid (a resampler's
	// queries). All 0 for a picture of several tiles: see Tiles.
	Rows, Cols, Queries int
	Tiles               []ExplainTile
	// States[l][i] is entry i's state in layer l (a State* byte).
	States []string
	// Anchors[l][i] is the prompt index of the kept entry that entry i was merged
	// into in layer l, -1 where it was not merged.
	Anchors [][]int
}

// ExplainTile is one tile of a picture (every picture has at least one).
type ExplainTile struct {
	Start   int // prompt index of its first entry
	Offset  int // index of its first entry in the image's States and Anchors rows
	Entries int
	// Rows x Cols is its grid of entries, row-major (M-RoPE grids, and a square
	// number of entries); else Queries is its number of entries.
	Rows, Cols, Queries int
	// Label is the text the encoder put right before the tile (its last line,
	// e.g. "<row_1_col_2>", "<global-img>", "<slice>"); "" when none.
	Label string
	// Overview: the tile is the whole picture at a low resolution. Row and Col
	// (from 1) place a tile in its picture's TileRows x TileCols layout; 0 when the
	// tile is the whole picture or its place is not known.
	Overview           bool
	Row, Col           int
	TileRows, TileCols int
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
	// QueueMs is how long the request waited for a slot, from being queued by
	// Submit (after its prompt was tokenized) to its admission. Set on the final
	// event of an admitted request; 0 for one that never got a slot.
	QueueMs float64
	// Logprobs: one entry per token generated since the previous event, when the
	// request asked for them. Tokens are reported when generated; text held back
	// for a possible stop string follows in a later event.
	Logprobs []TokenLogprob
}

// TokenLogprob is one generated token and its log-probability under the model
// (softmax of the raw logits, before any sampler or grammar).
type TokenLogprob struct {
	Token   string // the token's text (invalid UTF-8 replaced)
	Bytes   []byte // the token's raw bytes (a token may hold part of a character)
	Logprob float64
	Top     []TopLogprob // most likely tokens at this step, best first
}

// TopLogprob is one alternative at a step.
type TopLogprob struct {
	Token   string
	Bytes   []byte
	Logprob float64
}

// ---- errors ----
//
// Submit and a final Event return these; callers map them to their own terms (the API
// layer to HTTP statuses and OpenAI error codes). Errors about the request itself
// are ErrNoVision, ErrEmptyPrompt, *PromptTooLongError, *PolicyUnsupportedError,
// *ImageError, *MarkerInTextError and *elasticcache.ConfigError; everything else is
// the server's problem.

// ErrQueueFull is returned by Submit when the waiting queue is at capacity.
var ErrQueueFull = errors.New("engine: request queue is full")

// ErrShuttingDown is returned by Submit once the engine is stopping, and ends the
// requests still running when it stops.
var ErrShuttingDown = errors.New("engine: shutting down")

// ErrNoVision: the request holds images but the model has no vision encoder.
var ErrNoVision = errors.New("this model has no vision encoder (start the server with --mmproj) and cannot take images")

// ErrEmptyPrompt: the rendered prompt has no tokens.
var ErrEmptyPrompt = errors.New("the prompt is empty")

// PromptTooLongError: the prompt cannot fit in one sequence's cells.
type PromptTooLongError struct {
	Tokens int // prompt tokens
	Limit  int // most prompt tokens a sequence can hold
	// Raise names the setting that bounds Limit ("" means --ctx-size).
	Raise string
}

func (e *PromptTooLongError) Error() string {
	raise := e.Raise
	if raise == "" {
		raise = "--ctx-size"
	}
	return fmt.Sprintf("the prompt is %d tokens but a sequence holds at most %d; shorten the messages or raise %s",
		e.Tokens, e.Limit, raise)
}

// PolicyUnsupportedError: the request's cache policy cannot run with this engine's
// setting or model; nothing was done.
type PolicyUnsupportedError struct {
	Policy elasticcache.Policy
	Reason string
}

func (e *PolicyUnsupportedError) Error() string {
	return fmt.Sprintf("policy %q cannot run here: %s", e.Policy, e.Reason)
}

// ImageError: an image could not be read (corrupt, unsupported) by the vision encoder.
type ImageError struct {
	Index int // position among the request's images
	Err   error
}

func (e *ImageError) Error() string { return fmt.Sprintf("image %d: %v", e.Index, e.Err) }

func (e *ImageError) Unwrap() error { return e.Err }

// MarkerInTextError: a text part contains the vision encoder's media marker, which
// would be taken for an image.
type MarkerInTextError struct {
	Message, Part int
	Marker        string
}

func (e *MarkerInTextError) Error() string {
	return fmt.Sprintf("messages[%d] part %d: text must not contain the reserved image marker %q", e.Message, e.Part, e.Marker)
}

// ConstraintError: a request's Constraint cannot be turned into a grammar; nothing
// was done.
type ConstraintError struct {
	Reason string
}

func (e *ConstraintError) Error() string { return "the output constraint cannot be used: " + e.Reason }

// InternalError: the engine failed while working on this request (a panic or a
// broken invariant). The request is lost; the engine goes on serving the others.
type InternalError struct {
	RequestID string
	Err       error
}

func (e *InternalError) Error() string { return "engine: internal error: " + e.Err.Error() }

func (e *InternalError) Unwrap() error { return e.Err }

// ---- collecting a request ----

// Result is a finished request: all of its text and its final event.
type Result struct {
	Text  string
	Final Event
}

// Collect reads a request's events until the final one. It returns the final
// event's error when the request failed, ctx's error when ctx ended first, and an
// error when the channel closed without a final event.
func Collect(ctx context.Context, events <-chan Event) (Result, error) {
	var r Result
	var b strings.Builder
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				r.Text = b.String()
				if ctx.Err() != nil {
					return r, ctx.Err()
				}
				return r, errors.New("the engine closed the request without a final event")
			}
			b.WriteString(ev.Text)
			if ev.Done {
				r.Text, r.Final = b.String(), ev
				return r, ev.Err
			}
		case <-ctx.Done():
			r.Text = b.String()
			return r, ctx.Err()
		}
	}
}

// SplitImages turns text in which token stands for each image (in order) into
// parts: the text around each token becomes text parts, without the one newline
// that separates it from the image (parts are rendered joined by "\n"), and empty
// text parts are dropped. So "<image>\nQuestion?" gives [image, "Question?"] and
// renders as before. It fails when the token count and len(images) differ.
func SplitImages(text, token string, images [][]byte) ([]Part, error) {
	pieces := strings.Split(text, token)
	if len(pieces)-1 != len(images) {
		return nil, fmt.Errorf("the text holds %d %q markers for %d images", len(pieces)-1, token, len(images))
	}
	var parts []Part
	for i, p := range pieces {
		if i > 0 {
			parts = append(parts, Image(images[i-1]))
			p = strings.TrimPrefix(p, "\n")
		}
		if i < len(pieces)-1 {
			p = strings.TrimSuffix(p, "\n")
		}
		if p != "" {
			parts = append(parts, Text(p))
		}
	}
	return parts, nil
}

// Stats is a snapshot of an engine's queue and cache use (Engine.Stats), the state
// the server exports on /metrics.
type Stats struct {
	QueueDepth   int // requests waiting for a slot
	SlotsBusy    int // slots running a request
	SlotsTotal   int // slots in total; 0: the server reports its BackendInfo.Slots
	KVCellsUsed  int // KV cells holding entries, all sequences
	KVCellsTotal int // KV cells in total
	// KVInvariantFailures counts requests failed because a runtime invariant of the
	// KV hook broke (see InvariantError), since start.
	KVInvariantFailures int
	// KVCellsByPolicy splits KVCellsUsed by the cache policy of the sequences
	// holding the cells; an engine gives every policy an entry (0 when it holds
	// none). nil: not reported (elasticserve_kv_cells_used_by_policy is left out).
	KVCellsByPolicy map[string]int
	// KVCellsHeld: cells of finished conversations kept for reuse (reclaimable; not
	// in KVCellsUsed).
	KVCellsHeld int
	// Prefix reuse since start: requests that continued from held cells (hits) or
	// found none to continue from while some were held (misses), the prompt tokens
	// not encoded again, and held cells dropped to make room.
	ReuseHits, ReuseMisses, ReusedTokens, ReclaimedCells int
	// Image cache since start: images served from it, and images encoded.
	ImageCacheHits, ImageEncodes int
	// Host tier (held conversations in host memory), see TierStats.
	HostCache TierStats
	// Disk tier (held conversations in files), the same quantities for files;
	// failures count files that could not be used (another model, version,
	// truncated, corrupt) and writes that failed. DiskCacheOff: a directory was
	// given but could not be used.
	DiskCache    TierStats
	DiskCacheOff bool
}

// TierStats describes one tier of conversation memory (host memory or disk) since
// the engine started: bytes and conversations held now; conversations stored,
// requests restored from it (hits) or that found nothing there to continue while it
// held some (misses), conversations evicted to stay within its bound, restores,
// copies or files that failed, and prompt tokens restored instead of encoded.
type TierStats struct {
	Bytes, Entries                  int64
	Stored, Hits, Misses, Evictions int64
	Failures, RestoredTokens        int64
}
