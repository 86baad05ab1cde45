package engine

import (
	"testing"
	"time"
)

// The pacer settles where a chunk takes chunkSteps decode steps, whatever part of
// a call is fixed cost, and gives whole batches when nothing generates.
func TestPacerSettlesOnTheTargetChunkTime(t *testing.T) {
	for _, c := range []struct {
		name             string
		fixedMs, perTok  float64 // a chunk of n tokens takes fixedMs + n*perTok
		stepMs           float64
		batch, wantChunk int
	}{
		{"weights dominate", 10, 1.3, 22, 512, 26},        // (44-10)/1.3
		{"compute dominates", 0.5, 0.5, 20, 512, 79},      // (40-0.5)/0.5
		{"fast steps use the floor", 1, 0.1, 2, 512, 140}, // 15 ms floor: (15-1)/0.1
		{"capped by the batch", 1, 0.01, 50, 256, 256},
		{"slow calls keep the token floor", 100, 5, 10, 512, 16},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := newPacer(c.batch, 0)
			if got := p.chunk(false); got != c.batch {
				t.Fatalf("nothing generating: chunk %d, want the batch %d", got, c.batch)
			}
			for range 200 {
				n := p.chunk(true)
				p.prompt(n, time.Duration((c.fixedMs+float64(n)*c.perTok)*float64(time.Millisecond)))
				p.decode(time.Duration(c.stepMs * float64(time.Millisecond)))
			}
			if got := p.chunk(true); got < c.wantChunk-2 || got > c.wantChunk+2 {
				t.Errorf("settled on %d tokens, want about %d", got, c.wantChunk)
			}
		})
	}
	if got := newPacer(512, 7).chunk(true); got != 7 {
		t.Errorf("fixed chunk: %d", got)
	}
}
