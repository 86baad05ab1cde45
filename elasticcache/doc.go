// Package elasticcache plans how a sequence's KV cache is shrunk under the
// Elastic Cache method (Liu et al., ECCV 2024) and two eviction baselines.
//
// The package decides which entries stay, which are averaged into which, and
// which one to drop after each generated token (Tracker, PrefillPlan), and it
// merges rows (Merge) through a small interface over the cache's storage
// (Store, Rows), so it never depends on how the rows reach the cache: the
// engine reads a sequence's cells, lets Merge rewrite them, and writes them
// back. ApplyLayer is the float64 oracle that Merge is tested against.
//
// Policies:
//
//   - full: the cache is left alone.
//   - elastic: after the prompt is encoded, each layer keeps K = ceil(b*N)
//     entries: the first Sink entries, the last prompt entry and the K-Sink-1
//     best-scored remaining entries (anchors). Every other entry is averaged
//     into the anchor nearest to it by position. During generation, whenever
//     the sequence holds more than ceil(b*T) entries, the entry at a fixed
//     index p (p = K+Distance, or Distance when Distance >= 0) is dropped.
//   - h2o: one score per token (mean over layers), accumulated over the
//     prompt and every decode step; the lowest-scored entry is dropped.
//   - local: the first Sink entries and a window of the most recent ones.
//
// Small budgets. When K < Sink+1 there is no room for all sink entries plus
// the last prompt entry. The planner then keeps the first K-1 entries as the
// sink and the last prompt entry, with no anchors; every other prompt entry is
// merged (elastic) into whichever of the last sink entry and the last prompt
// entry is nearer (ties: the sink entry) or dropped (local). More generally,
// with no anchors the nearest protected entry receives the merge; with at
// least one anchor only anchors receive merges.
//
// During generation an entry is always evicted when the bound requires it,
// even if that means going below the sink: the lowest index that may be
// evicted is min(sink entries held, held-2), and the newest entry (index
// held-1) is never evicted. So after every step the sequence holds at most
// ceil(b*T) entries.
//
// Reference selection. Config.Selection "reference" (ReferenceSelection)
// reproduces the authors' published kv_cache.py (ElasticCache, H2OCache) for
// parity experiments; "paper" (or empty) is the default and the method as
// published in the paper. With f = N - ceil(b*N) entries to forget (the
// reference's forget_num, int(N - b*N)):
//
//   - Phase 1 runs only when f >= 2. With f == 1 the reference's one-entry
//     eviction runs instead: elastic drops prompt entry 0 (its truncation
//     index still has its initial value 0, which later evictions keep using),
//     h2o drops the lowest-scored entry in [Sink, N-1).
//   - Rank as position (elastic, per layer): the candidates Sink..N-2 are
//     ranked by ascending score (ties: earlier; torch.argsort leaves them
//     unspecified), and rank r keeps position Sink+r when the candidate of
//     rank r has index > f. So K-1 entries are kept (K = ceil(b*N)), and
//     which positions survive depends on the scores only through the ranks.
//   - Throw set without the sink offset: rank r whose candidate index is <= f
//     throws position r itself (not Sink+r): f+1 positions in [0, N-Sink-1),
//     which may be sink entries or anchors. Candidates neither kept nor
//     thrown are dropped unmerged.
//   - Anchors merging into themselves: a thrown position joins the group of
//     the nearest anchor (ties: earlier). A thrown anchor is its own nearest,
//     so its row is counted twice in its mean; a thrown sink entry is
//     averaged into an anchor and also stays as it is (see LayerPlan).
//   - Decode (elastic): index p = ceil(b*N) + Distance (Distance when > 0,
//     not >= 0), computed from K rather than the K-1 entries held, with no
//     sink protection; a negative p counts from the end (Python slicing).
//   - h2o: entries 0..N-2 ranked by ascending layer-mean score, rank r keeps
//     position r when the candidate of rank r has index > f, plus the last
//     entry (K-1 kept, no sink protection). The accumulated scores are not
//     re-indexed to the kept entries, so decode-time accumulation is
//     misaligned, as in the reference; each eviction removes its slot.
//   - Positions: Spec.CompactPositions tells the engine to relabel the kept
//     cells 0..K-1 and place each new token at the compacted length.
//
// Where the reference would exceed its budget, fail or misbehave (a sink
// larger than ceil(b*N)-2, no anchor left, an index past the cache), the
// planner stays within the budget and the cache: the elastic sink is capped
// at max(0, ceil(b*N)-2), thrown entries without an anchor are dropped,
// decode indices are clamped. local is the same under both selections.
//
// Rounding. ceil(b*n) is computed with a small relative slack, so products
// that are integers up to floating point error (0.07*100 = 7.000000000000001)
// round to that integer. A budget of 1 therefore never changes anything.
package elasticcache
