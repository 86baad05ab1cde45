package engine

import (
	"slices"
	"sync/atomic"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// The host tier keeps held conversations that lost their slot: when a held
// sequence is given up (its slot or its cells are needed, or a request cuts it
// down to a shared prefix), its cells are copied to host memory as they are
// (compressed or not) with what the slot kept beside them, and a later request
// that continues the conversation, by the rule that slot reuse applies, has them
// written back into its slot's stream instead of encoding that part again. It then
// continues exactly as if the conversation had stayed in the slot.

// hostEntry is one conversation in host memory: a heldSeq without its cells.
type hostEntry struct {
	units      []unit
	spec       elasticcache.Spec
	compressed bool
	// tracker is the tracker that compressed the conversation (what a continued
	// compressed conversation plans from); nil when uncompressed.
	tracker *elasticcache.Tracker
	snap    *llama.CellSnapshot // cells in entry order (part 0), the window cache's (part 1)
	bytes   int64
	used    uint64
	cells   int // entries, from a file's header before its cells are read
}

// serves is how many leading units of s's prompt the entry's cells serve, by
// heldSeq.continues's rule.
func (h *hostEntry) serves(s *seq) int {
	return continuesUnits(h.units, h.spec, h.compressed, s)
}

// hostTier is an LRU of conversations in host memory, bounded in bytes.
//
// Locking: the entries belong to the engine's loop goroutine (the only one that
// stores, looks up and restores); the counters are atomics, read by Stats from any
// goroutine.
type hostTier struct {
	limit   int64 // bytes; <= 0: the tier is off
	entries []*hostEntry
	clock   uint64
	// spill receives what leaves the tier for lack of room (or does not fit it):
	// the disk tier's put, or nil.
	spill func(*hostEntry)

	tierCounters
}

// tierCounters are a tier's gauges and counters, read by Stats from any goroutine.
type tierCounters struct {
	bytes, count                         atomic.Int64
	stored, hits, misses, evictions, bad atomic.Int64
	restored                             atomic.Int64 // prompt tokens restored instead of encoded
}

func (c *tierCounters) snapshot() completion.TierStats {
	return completion.TierStats{Bytes: c.bytes.Load(), Entries: c.count.Load(), Stored: c.stored.Load(),
		Hits: c.hits.Load(), Misses: c.misses.Load(), Evictions: c.evictions.Load(),
		Failures: c.bad.Load(), RestoredTokens: c.restored.Load()}
}

func (t *hostTier) on() bool { return t != nil && t.limit > 0 }

// put stores e, the most recently used, and evicts the least recently used
// entries until the tier fits its bound; an entry larger than the bound is not
// kept. An entry for the same units and setting replaces the older one.
func (t *hostTier) put(e *hostEntry) {
	if !t.on() || e.bytes > t.limit {
		if t.spill != nil {
			t.spill(e)
		}
		return
	}
	for i, o := range t.entries {
		if o.spec == e.spec && o.compressed == e.compressed && slices.Equal(o.units, e.units) {
			t.remove(i)
			break
		}
	}
	t.clock++
	e.used = t.clock
	t.entries = append(t.entries, e)
	t.bytes.Add(e.bytes)
	t.count.Add(1)
	t.stored.Add(1)
	for t.bytes.Load() > t.limit {
		lru := 0
		for i, o := range t.entries {
			if o.used < t.entries[lru].used {
				lru = i
			}
		}
		out := t.remove(lru)
		t.evictions.Add(1)
		if t.spill != nil {
			t.spill(out)
		}
	}
}

// remove takes entry i out of the tier and returns it.
func (t *hostTier) remove(i int) *hostEntry {
	e := t.entries[i]
	t.bytes.Add(-e.bytes)
	t.count.Add(-1)
	t.entries = slices.Delete(t.entries, i, i+1)
	return e
}

// best is the entry that serves the most leading units of s's prompt, at least
// half of what it holds (pickSlot's rule for continuing a conversation), and how
// many; -1 when none does.
func (t *hostTier) best(s *seq) (int, int) {
	if !t.on() || !s.reuse {
		return -1, 0
	}
	best, bestN := -1, 0
	for i, h := range t.entries {
		if n := h.serves(s); n > bestN && 2*n >= len(h.units) {
			best, bestN = i, n
		}
	}
	return best, bestN
}

// toHost copies held sequence h's cells into the host tier (or, when it is off
// or they do not fit, the disk tier) before they are dropped. A failure to read
// them is counted and the conversation is lost, as it was before the tiers
// existed.
func (e *Engine) toHost(h *heldSeq) {
	if !e.host.on() && !e.disk.on() || h == nil || len(h.cache.cells) == 0 {
		return
	}
	if ent := e.snapshot(h); ent != nil {
		e.host.put(ent)
	}
}

// snapshot copies held sequence h's cells out of the context (loop goroutine,
// or Stop once the loop is done); nil when that fails (counted).
func (e *Engine) snapshot(h *heldSeq) *hostEntry {
	c := h.cache
	t0 := time.Now()
	snap, err := c.export()
	if err != nil {
		e.host.bad.Add(1)
		e.opts.Log.Warn().Err(err).Msg("host tier: could not copy a held conversation")
		return nil
	}
	ent := &hostEntry{units: h.units, spec: c.spec, compressed: h.compressed, snap: snap, cells: snap.Cells(),
		bytes: snap.Bytes() + int64(len(h.units))*int64(unitBytes)}
	if h.compressed {
		ent.tracker = c.tracker
	}
	e.opts.Log.Debug().Int("cells", len(c.cells)).Int64("bytes", ent.bytes).Dur("took", time.Since(t0)).Msg("host tier: conversation copied")
	return ent
}

const unitBytes = 40 // an imageKey and a token

// restore moves a conversation from the host tier (or the disk tier) into slot
// for s, when a tier holds one that serves more of s's prompt than the slot's own
// held cells (common of them) and its cells and the rest of s's prompt fit the
// slot's stream. What the slot held goes to the host tier first. It returns the
// number of prompt positions the slot now serves: common when nothing was
// restored.
func (e *Engine) restore(s *seq, slot, common int) int {
	i, n := e.host.best(s)
	file, dn := e.disk.best(s)
	if max(n, dn) <= common {
		// A miss: no conversation to continue, in the slot (pickSlot's rule) or
		// in a tier, while the tier holds some.
		continuing := common > 0 && e.held[slot] != nil && 2*common >= len(e.held[slot].units)
		if s.reuse && !continuing {
			if i < 0 && len(e.host.entries) > 0 {
				e.host.misses.Add(1)
			}
			if file == nil && !e.disk.empty() {
				e.disk.misses.Add(1)
			}
		}
		return common
	}
	fromDisk := dn > n
	kept, compressed := n, false
	if fromDisk {
		kept = dn
		if compressed = file.compressed; compressed {
			kept = file.cells
		}
		n = dn
	} else {
		ent := e.host.entries[i]
		if compressed = ent.compressed; compressed {
			kept = ent.snap.Cells()
		}
	}
	pi := e.poolOf(slot)
	if !e.fitsStream(pi, kept, s, n) || compressed && s.req.Cache.PrefillScores() && e.pctx != nil && !e.ctx.Params().Capture {
		return common
	}
	var ent *hostEntry
	from := "host"
	if fromDisk {
		var err error
		if ent, err = e.disk.load(file.name); err != nil {
			return common // counted and forgotten; the prompt is encoded
		}
		from = "disk"
	} else {
		ent = e.host.remove(i)
	}
	e.drop(slot)
	// A unified cache: make room among the other slots' held cells.
	if !e.reclaim(pi, slot, ent.snap.Cells()) {
		if !fromDisk {
			e.host.put(ent) // not now; it stays in the tier
			e.host.stored.Add(-1)
		}
		return 0
	}
	if !e.fromHost(ent, slot, from) {
		return 0
	}
	if fromDisk {
		e.disk.hits.Add(1)
		e.disk.restored.Add(int64(n))
	} else {
		e.host.hits.Add(1)
		e.host.restored.Add(int64(n))
	}
	return n
}

// fromHost writes ent's cells into slot's stream (which holds nothing: the
// caller dropped what it held) and makes them the slot's held sequence, restored
// from tier from ("host" or "disk"). It
// reports whether it did; a refusal (no room, another layout) is counted and the
// conversation is lost (the request encodes its prompt).
func (e *Engine) fromHost(ent *hostEntry, slot int, from string) bool {
	t0 := time.Now()
	c, err := importSeqCache(e.ctx, slot, e.pools[e.poolOf(slot)], ent.snap, ent.spec, ent.tracker, e.cacheLayers)
	if err != nil {
		e.host.bad.Add(1)
		e.opts.Log.Warn().Err(err).Msg("host tier: could not restore a conversation")
		return false
	}
	e.clock++
	e.held[slot] = &heldSeq{cache: c, units: ent.units, used: e.clock, compressed: ent.compressed, from: from}
	e.opts.Log.Debug().Int("cells", len(c.cells)).Dur("took", time.Since(t0)).Msg("host tier: conversation restored")
	return true
}
