package engine

import (
	"context"
	"time"

	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// seq is one request, from Submit until its final event. Only the decode loop
// touches it after Submit. Its fields are grouped by concern: the request and
// where it is in its life, its prompt, its generation, and its slot's cells.
type seq struct {
	request
	promptState
	generation
	placement
}

// request is who asked, where the answer goes, and when.
type request struct {
	ctx   context.Context
	req   *completion.Request
	box   *outbox
	state reqState // where it is in its life (lifecycle.go)
	// queuedAt (set when Submit queues it) and started (set when a slot takes it)
	// give the time the request waited, reported as Event.QueueMs.
	queuedAt time.Time
	started  time.Time
}

// promptState is the tokenized prompt and how far it is encoded.
type promptState struct {
	prompt  *llama.Prompt // C chunks (images); nil for text-only prompts
	chunks  []promptChunk
	nPrompt int
	units   []unit // what each prompt position holds (for prefix reuse)
	// textFrom is the first prompt position after the last image (0: no image).
	textFrom int

	// prefill progress
	chunkIdx int
	chunkOff int

	prefillStart time.Time
	prefillDur   time.Duration
}

// generation is the sampling and what it produced.
type generation struct {
	sampler *llama.Sampler
	logprob *completion.TokenLogprob // the token just sampled, when the request asked for logprobs

	pending llama.Token   // sampled, not yet decoded
	answer  []llama.Token // generated tokens, in order
	nGen    int
	maxGen  int // tokens this request may generate (its reservation assumes it)

	decodeStart time.Time

	nll  float64 // forced decoding: summed -log p(forced token)
	nllN int

	utf8    llama.UTF8Buffer
	stops   stopScanner
	stopHit bool
}

// placement is the request's slot, its cells there, and the held cells it
// continues.
type placement struct {
	id      int       // slot and llama sequence id; -1 until admitted
	cache   *seqCache // set when admitted
	reserve int       // cells reserved for it in its pool
	nPast   int       // tokens processed (prompt + generated): T

	// reuse: the request may continue from a held sequence and be held itself;
	// cached: prompt positions served by held cells instead of being encoded.
	reuse  bool
	cached int
	// reusedFrom: where the cached positions came from, "slot", "host" or
	// "disk" (restored from that tier); "" when none.
	reusedFrom string
	// reuseCompressed: the request may continue a compressed conversation
	reuseCompressed bool
}

func (s *seq) release() {
	if s.prompt != nil {
		s.prompt.Close()
		s.prompt = nil
	}
	if s.sampler != nil {
		s.sampler.Close()
		s.sampler = nil
	}
}

// startAt skips the first n prompt positions, whose entries the sequence's cells
// already hold (prefix reuse): prefill goes on from position n.
func (s *seq) startAt(n int) {
	s.nPast, s.cached = n, n
	for s.chunkIdx < len(s.chunks) && n >= s.chunks[s.chunkIdx].n {
		n -= s.chunks[s.chunkIdx].n
		s.chunkIdx++
	}
	s.chunkOff = n
}
