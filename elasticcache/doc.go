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
// Rounding. ceil(b*n) is computed with a small relative slack, so products
// that are integers up to floating point error (0.07*100 = 7.000000000000001)
// round to that integer. A budget of 1 therefore never changes anything.
package elasticcache
