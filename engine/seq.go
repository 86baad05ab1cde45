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
	cellFree  []bool
	peakCells int

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
	firstAt time.Time
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

// placeNew records that a token at pos was written by llama.cpp into the lowest free cell.
func (s *seq) placeNew(pos int) int {
	for c, free := range s.cellFree {
		if free {
			s.cellFree[c] = false
			s.entryCell = append(s.entryCell, c)
			s.entryPos = append(s.entryPos, pos)
			s.peakCells = max(s.peakCells, len(s.entryCell))
			return c
		}
	}
	return -1
}

// evict drops entry i from the bookkeeping and returns its position.
func (s *seq) evict(i int) int {
	pos := s.entryPos[i]
	s.cellFree[s.entryCell[i]] = true
	s.entryCell = append(s.entryCell[:i], s.entryCell[i+1:]...)
	s.entryPos = append(s.entryPos[:i], s.entryPos[i+1:]...)
	return pos
}

// resetLayout records a rewritten cache: n entries in cells 0..n-1 at positions pos.
func (s *seq) resetLayout(pos []int) {
	for c := range s.cellFree {
		s.cellFree[c] = c >= len(pos)
	}
	s.entryCell = s.entryCell[:0]
	s.entryPos = append(s.entryPos[:0], pos...)
	for c := range pos {
		s.entryCell = append(s.entryCell, c)
	}
}

func (s *seq) free() int {
	return len(s.cellFree) - len(s.entryCell)
}
