package engine

import (
	"crypto/sha256"
	"fmt"
	"slices"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// unit names what one position of a sequence holds: a text token, or the k-th
// embedding of an image (by the image's content). Two prompts that agree on their
// first n units put the same entries in their first n cells, which is what lets a
// finished conversation's cells serve the next request.
type unit struct {
	img imageKey    // zero for a text token
	tok llama.Token // the token, or k for an image
}

func textUnit(t llama.Token) unit { return unit{tok: t} }

// inImage is k > 0 for a position inside an image after its first embedding.
func (u unit) inImage() int {
	if u.img == (imageKey{}) {
		return 0
	}
	return int(u.tok)
}

// heldSeq is a finished request's sequence kept in its slot so that the next turn
// of the conversation can continue from its cells (prefix reuse). Its cells stay
// in the pool until the slot or the cells are needed, least recently used first.
type heldSeq struct {
	cache *seqCache
	units []unit // what positions 0..len-1 hold: the prompt and the decoded answer
	used  uint64 // engine.clock when it was held
	// compressed: its policy merged or evicted entries, so its cells serve only the
	// request that continues its whole history under the same setting (no merged
	// row can reach another conversation); the cache's tracker carries on.
	compressed bool
	// from: the tier its cells were restored from ("host", "disk"); "" when they
	// stayed in the slot since its last turn.
	from string
}

// continues is how many leading units of s's prompt the held sequence serves: all
// of its history when it is compressed and s continues it exactly under the same
// setting, else 0; and for an uncompressed one, its reusable prefix when s's
// policy can start from held cells.
func (h *heldSeq) continues(s *seq) int {
	return continuesUnits(h.units, h.cache.spec, h.compressed, s)
}

// continuesUnits is heldSeq.continues for a conversation that holds units,
// compressed or not under spec: the one rule by which slot reuse and the host
// tier match a request to a held conversation.
func continuesUnits(units []unit, spec elasticcache.Spec, compressed bool, s *seq) int {
	if !compressed {
		// A plan that ranks prompt entries by every prompt query's attention
		// cannot start from cells whose queries are not encoded again.
		if s.req.Cache.PrefillScores() {
			return 0
		}
		return reusable(units, s.units)
	}
	n := len(units)
	if !s.reuseCompressed || spec != s.req.Cache || n >= len(s.units) || !slices.Equal(units, s.units[:n]) {
		return 0
	}
	return n
}

// reusable is how many leading units of want a held sequence of units can serve: the
// common prefix, never the whole of want (the last prompt token must be decoded to
// get the first answer token's logits), and never part of an image (an image is
// encoded, and attended without a mask by some models, as a whole).
func reusable(held, want []unit) int {
	n := min(len(held), len(want)-1)
	common := 0
	for common < n && held[common] == want[common] {
		common++
	}
	if common > 0 && common < len(want) {
		common -= want[common].inImage()
	}
	return max(common, 0)
}

// promptUnits lists the units of a tokenized prompt; images are keyed by their bytes
// (in prompt order, as the chunks are). A picture that the encoder cut into
// several chunks (tiles: SmolVLM, MiniCPM-V) has one chunk per tile, per[i] of
// them for picture i (pictureChunks), and tile k > 0 is keyed by the picture and
// k (tileKey), so that no tile is taken for another picture's.
func promptUnits(chunks []promptChunk, images [][]byte, per []int) []unit {
	var out []unit
	pic, tile := 0, 0
	for _, ch := range chunks {
		switch ch.kind {
		case llama.ChunkImage:
			var k imageKey
			if pic < len(images) {
				k = tileKey(keyOf(images[pic]), tile)
			}
			tile++
			if pic >= len(per) || tile >= per[pic] {
				pic, tile = pic+1, 0
			}
			for i := range ch.n {
				out = append(out, unit{img: k, tok: llama.Token(i)})
			}
		default:
			for _, t := range ch.tokens {
				out = append(out, textUnit(t))
			}
		}
	}
	return out
}

// tileKey names tile k of the picture named key: the picture's own key for its
// first (or only) chunk.
func tileKey(key imageKey, k int) imageKey {
	if k == 0 {
		return key
	}
	return sha256.Sum256(fmt.Appendf(key[:len(key):len(key)], "/tile %d", k))
}

// pickSlot chooses where waiting request s runs, and how many of its prompt
// positions the chosen slot's held cells serve:
//  1. the free slot whose held sequence serves the longest prefix, when that prefix
//     is at least half of what it holds (the conversation continues);
//  2. else a free slot holding nothing;
//  3. else a free slot whose held sequence is given up: the one serving the longest
//     prefix, or, when none serves any, the least recently used.
//
// A held conversation is not cut down for a short shared prefix (a common system
// prompt) while an empty slot is free, as llama-server's slot-similarity rule does.
// It returns slot -1 when every slot is running a request.
func (e *Engine) pickSlot(s *seq) (slot, common int) {
	best, bestN := -1, 0
	empty, lru := -1, -1
	for i, h := range e.held {
		switch {
		case e.slots[i] != nil:
		case h == nil:
			if empty < 0 {
				empty = i
			}
		default:
			if lru < 0 || h.used < e.held[lru].used {
				lru = i
			}
			if n := h.continues(s); s.reuse && n > bestN && e.continuesInStream(i, h, s, n) {
				best, bestN = i, n
			}
		}
	}
	switch {
	case best >= 0 && 2*bestN >= len(e.held[best].units):
		return best, bestN
	case empty >= 0:
		return empty, 0
	case best >= 0:
		return best, bestN
	}
	return lru, 0
}

// continuesInStream reports whether s, continuing the held sequence of slot i from
// its first n units, can encode the rest of its prompt where the held cells are
// (with a prefill context, the slot's stream): the held cells it keeps and the
// rest of its prompt must fit the stream together, and a plan that reads the new
// turn's attention needs a context that captures it.
func (e *Engine) continuesInStream(i int, h *heldSeq, s *seq, n int) bool {
	if e.pctx == nil {
		return true // every prompt fits a slot (prepare)
	}
	kept := n
	if h.compressed {
		kept = h.cache.held()
	}
	return e.fitsStream(e.poolOf(i), kept, s, n)
}

// fitsStream reports whether s, continuing a conversation of which kept cells
// stay, from its first n units, can encode the rest of its prompt in pool pi's
// stream (see continuesInStream).
func (e *Engine) fitsStream(pi, kept int, s *seq, n int) bool {
	if e.pctx == nil {
		return true
	}
	if kept+len(s.units)-n > e.pools[pi].size()-1 {
		return false
	}
	return !s.req.Cache.PrefillScores() || e.ctx.Params().Capture
}

// heldCells is the number of cells of pool pi that held sequences other than the
// one in slot keep occupy.
func (e *Engine) heldCells(pi, keep int) int {
	n := 0
	for i, h := range e.held {
		if h != nil && i != keep && e.poolOf(i) == pi {
			n += h.cache.held()
		}
	}
	return n
}

// reclaim drops held sequences of pool pi (never the one in slot keep), least
// recently used first, until need more cells fit next to the reservations; it
// reports whether they do.
func (e *Engine) reclaim(pi, keep, need int) bool {
	for e.reserved[pi]+e.heldCells(pi, keep)+need > e.pools[pi].size() {
		victim := -1
		for i, h := range e.held {
			if h != nil && i != keep && e.poolOf(i) == pi && (victim < 0 || h.used < e.held[victim].used) {
				victim = i
			}
		}
		if victim < 0 {
			return false
		}
		e.reclaimed.Add(int64(e.held[victim].cache.held()))
		e.drop(victim)
	}
	return true
}

// drop frees the held sequence of slot i, after copying it to the host tier
// (when on).
func (e *Engine) drop(i int) {
	if h := e.held[i]; h != nil {
		e.toHost(h)
		h.cache.free()
		e.held[i] = nil
	}
}

// hold keeps s's cache in its slot after it finished, so that a later prompt
// starting with the same units can continue from it: uncompressed cells that hold
// exactly its prompt and decoded answer, or a compressed conversation (not under
// the reference selection, whose positions are relabelled). It reports whether it
// did; otherwise the caller frees the cache.
func (e *Engine) hold(s *seq) bool {
	c := s.cache
	// (An M-RoPE image's shift is carried: a continuation recomputes it from the
	// images its prompt shares with the held units, imageShift.)
	if !s.reuse || c == nil || s.nPast < s.nPrompt || c.spec.CompactPositions() {
		return false
	}
	compressed := c.spec.Compresses()
	if compressed && !s.reuseCompressed || !compressed && c.held() != s.nPast {
		return false
	}
	units := slices.Clip(s.units[:s.nPrompt])
	for _, t := range s.answer[:s.nPast-s.nPrompt] {
		units = append(units, textUnit(t))
	}
	e.clock++
	e.held[s.id] = &heldSeq{cache: c, units: units, used: e.clock, compressed: compressed}
	return true
}
