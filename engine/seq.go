package engine

import (
	"context"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

type promptChunk struct {
	kind   llama.ChunkKind
	tokens []llama.Token
	n      int
	src    llama.Chunk
	embd   []float32 // image embeddings, once encoded
}

// seq is one request in a slot. Only the decode loop touches it after Submit.
type seq struct {
	id      int
	ctx     context.Context
	req     *Request
	box     *outbox
	prompt  *llama.Prompt // C chunks (images); nil for text-only prompts
	chunks  []promptChunk
	nPrompt int

	// prefill progress
	chunkIdx  int
	chunkOff  int
	prefilled bool

	sampler *llama.Sampler
	tracker *elasticcache.Tracker

	nPast   int         // next position
	pending llama.Token // sampled, not yet decoded
	nGen    int

	// Cache layout, kept in step with llama.cpp: entry i (position order) lives in
	// cell entryCell[i] at position entryPos[i]. A new token takes the lowest free cell,
	// which is where llama.cpp's find_slot puts it for a stream only this sequence uses.
	entryCell []int
	entryPos  []int
	pool      *cellPool
	peakCells int
	maxGen    int // tokens this request may generate (its reservation assumes it)
	reserve   int // cells reserved for it in its pool

	scores       [][]float32 // prefill attention column sums by prompt position, per layer
	prefillStart time.Time
	prefillDur   time.Duration
	compressDur  time.Duration
	decodeStart  time.Time

	nll  float64 // forced decoding: summed -log p(forced token)
	nllN int

	utf8    llama.UTF8Buffer
	stops   stopScanner
	stopHit bool
	started time.Time
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

// record notes that the token at pos went into cell c.
func (s *seq) record(c, pos int) {
	s.entryCell = append(s.entryCell, c)
	s.entryPos = append(s.entryPos, pos)
	s.peakCells = max(s.peakCells, len(s.entryCell))
}

// evict drops entry i from the bookkeeping and frees its cell; it returns the position.
func (s *seq) evict(i int) int {
	pos := s.entryPos[i]
	s.pool.release(s.entryCell[i])
	s.entryCell = append(s.entryCell[:i], s.entryCell[i+1:]...)
	s.entryPos = append(s.entryPos[:i], s.entryPos[i+1:]...)
	return pos
}

// resetLayout records a rewritten cache: the entries at positions pos, in order,
// went into cells (as llama.cpp's state reader places them).
func (s *seq) resetLayout(cells, pos []int) {
	s.entryCell = append(s.entryCell[:0], cells...)
	s.entryPos = append(s.entryPos[:0], pos...)
}
