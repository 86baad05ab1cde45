package engine

import "time"

// pacer sizes the prompt work of one loop turn so that sequences already
// generating are not held up by a newly admitted prompt for more than about one of
// their own decode steps: a llama context is used by one call at a time, so every
// prompt batch delays the next decode step of every running stream by its whole
// duration (a 1,000-token prompt encoded in one piece stalls them for a second).
//
// While some sequence generates, a turn encodes at most chunk tokens of a prompt,
// chunk = target / (measured ms per prompt token), target = chunkSteps decode steps
// (at least minChunkMs): the gap a stream sees stays near chunkSteps+1 decode
// steps. With no sequence generating, prompts go in whole batches (nothing waits).
//
// Every call reads all the weights once, so a chunk costs a fixed part (about one
// decode step) plus its tokens' compute; the measured ms per token includes the
// fixed part, and the iteration settles where a chunk takes the target. A target
// of one step leaves chunks of a few tokens that are mostly fixed cost (measured on
// the 125M model: time to first token 7x one request's with four streams, and four
// requests gave fewer tokens/s than one); two steps keep the fixed cost under
// about half of a chunk and the gap under three steps.
type pacer struct {
	batch int // the most tokens one call may take (Options.BatchSize)
	fixed int // Options.PrefillChunk > 0: the chunk, whatever the times
	// exponential moving averages of measured times (0: none yet)
	tokMs, stepMs float64
}

const (
	// minChunkMs keeps chunks from becoming so small that per-call overhead
	// dominates when decode steps are very short.
	minChunkMs = 15.0
	// chunkSteps: a chunk's target time in decode steps.
	chunkSteps = 2.0
	// minChunkTokens: fewer tokens would be mostly a call's fixed cost, and one slow
	// call would otherwise shrink the chunks it is measured on.
	minChunkTokens = 16
	// firstChunk is the chunk before anything was measured.
	firstChunk = 64
	// paceAlpha weighs a new measurement in the moving averages.
	paceAlpha = 0.2
)

func newPacer(batch, fixed int) *pacer { return &pacer{batch: batch, fixed: fixed} }

// chunk is how many prompt tokens this turn may encode; generating says whether
// some sequence is waiting for its next decode step.
func (p *pacer) chunk(generating bool) int {
	switch {
	case !generating:
		return p.batch
	case p.fixed > 0:
		return min(p.fixed, p.batch)
	case p.tokMs <= 0 || p.stepMs <= 0:
		return min(firstChunk, p.batch)
	}
	n := int(max(chunkSteps*p.stepMs, minChunkMs) / p.tokMs)
	return max(min(minChunkTokens, p.batch), min(n, p.batch))
}

// prompt records that n prompt tokens took d.
func (p *pacer) prompt(n int, d time.Duration) {
	if n > 0 {
		p.tokMs = ema(p.tokMs, float64(d.Microseconds())/1000/float64(n))
	}
}

// decode records a decode step (every generating sequence's token) that took d.
func (p *pacer) decode(d time.Duration) { p.stepMs = ema(p.stepMs, float64(d.Microseconds())/1000) }

func ema(old, v float64) float64 {
	if old <= 0 {
		return v
	}
	return old + paceAlpha*(v-old)
}
