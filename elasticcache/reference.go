package elasticcache

import (
	"cmp"
	"slices"
	"sort"
)

// This file holds the phase 1 planners of ReferenceSelection: the rules of
// the authors' published kv_cache.py (classes ElasticCache and H2OCache),
// restated from reading that code. The package documentation lists the rules;
// the comments here say how each maps onto a LayerPlan.

// refForget is the reference's forget_num for n entries: int(n - n*b), which
// is n - ceil(b*n) in exact arithmetic. It is computed through keepCount so
// that the same rounding slack as the paper rule applies (0.07*100 is 7).
func refForget(b float64, n int) int { return n - keepCount(b, n) }

// ascendingRanks returns the candidates 0..len(row)-1 ordered by ascending
// score, ties by ascending index: order[r] is the candidate of rank r. The
// reference calls torch.argsort, which does not promise an order for ties;
// earlier-first is the choice made here. -0 and +0 compare equal.
func ascendingRanks[F float32 | float64](row []F, order []int) []int {
	order = order[:0]
	for c := range row {
		order = append(order, c)
	}
	slices.SortFunc(order, func(a, b int) int {
		if c := cmp.Compare(row[a], row[b]); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	return order
}

// planRefElastic is phase 1 of the reference ElasticCache for f >= 2
// entries to forget. Per layer, over the m = n-1-s candidates s..n-2 (s the
// sink, capped at n-1):
//
//   - order = the candidates ranked by ascending score (ascendingRanks);
//   - rank r is kept as the anchor at position s+r when order[r] > f: the
//     rank, not the candidate, becomes the position, so m-f-1 anchors are
//     kept and the plan holds K = ceil(b*n)-1 entries;
//   - rank r with order[r] <= f is thrown as position r, without the sink
//     offset (f+1 thrown entries, possibly sink or anchor positions);
//   - each thrown position goes to the group of the anchor nearest to it
//     (ties: the earlier anchor); a thrown anchor lands in its own group, and
//     a thrown sink position is averaged into an anchor while the sink entry
//     stays as it is. Candidates neither kept nor thrown are dropped.
//
// When the sink leaves fewer than f+1 candidates (sink > ceil(b*n)-2) the
// reference keeps sink+1 entries, more than its budget, and may then fail
// its own assertion during decode (two entries to forget at once); here the sink is capped at
// max(0, ceil(b*n)-2) instead, so that the plan always holds
// max(1, ceil(b*n)-1) entries. With no anchor left (the cap reached) the
// thrown entries are dropped, where the reference would fail (argmin over
// nothing).
func planRefElastic(n, f, sink int, scores [][]float32) *PrefillPlan {
	s := max(0, min(sink, n-f-2))
	m := n - 1 - s
	nAnchors := max(0, m-f-1)
	k := s + nAnchors + 1
	p := &PrefillPlan{N: n, K: k, Layers: make([]LayerPlan, len(scores))}
	order := make([]int, 0, m)
	for l, row := range scores {
		order = ascendingRanks(row[s:n-1], order)
		keep := make([]int, 0, k)
		for j := range s {
			keep = append(keep, j)
		}
		var thrown []int
		for r, c := range order {
			if c > f {
				keep = append(keep, s+r)
			} else {
				thrown = append(thrown, r)
			}
		}
		keep = append(keep, n-1)
		anchors := keep[s : k-1]
		lp := LayerPlan{Keep: keep}
		if len(anchors) > 0 && len(thrown) > 0 {
			lp.Groups = make([][]int, k)
			for _, t := range thrown { // ascending, so every group is too
				i := sort.SearchInts(anchors, t) // first anchor at or after t
				if i == len(anchors) || (i > 0 && t-anchors[i-1] <= anchors[i]-t) {
					i--
				}
				lp.Groups[s+i] = append(lp.Groups[s+i], t)
			}
		}
		p.Layers[l] = lp
	}
	return p
}

// planRefElasticSingle is what the reference ElasticCache does when exactly
// one entry must go at the end of the prompt: phase 1 does not run, and its
// one-entry eviction takes its truncation index, still at its initial value
// 0. All layers drop prompt entry 0.
func planRefElasticSingle(n, nLayers int) *PrefillPlan {
	keep := make([]int, 0, n-1)
	for j := 1; j < n; j++ {
		keep = append(keep, j)
	}
	return sharedPlan(n, n-1, keep, nLayers)
}

// planRefH2O is phase 1 of the reference H2OCache for f >= 1 entries to
// forget, given the per-token means over layers. It returns the plan and the
// accumulated scores the tracker carries into decode.
//
//   - f >= 2: over entries 0..n-2 (no sink protection) ranked by ascending
//     mean, rank r is kept as position r when order[r] > f, plus the last
//     entry: K = ceil(b*n)-1 entries (at least 1). The accumulated scores are
//     not re-indexed: they stay indexed by prompt position while the cache
//     is compacted, so every later step adds its scores to misaligned slots.
//   - f == 1: phase 1 does not run; the one-entry eviction removes the
//     lowest mean in [sink, n-1) (earliest on ties, sink capped at n-2), and
//     its score slot is removed with it.
func planRefH2O(n, f, sink, nLayers int, means []float64) (*PrefillPlan, []float64) {
	if f == 1 {
		idx := min(sink, n-2)
		for j := idx + 1; j < n-1; j++ {
			if means[j] < means[idx] {
				idx = j
			}
		}
		keep := make([]int, 0, n-1)
		for j := range n {
			if j != idx {
				keep = append(keep, j)
			}
		}
		return sharedPlan(n, n-1, keep, nLayers), slices.Delete(means, idx, idx+1)
	}
	order := ascendingRanks(means[:n-1], make([]int, 0, n-1))
	keep := make([]int, 0, max(1, n-f-1))
	for r, c := range order {
		if c > f {
			keep = append(keep, r)
		}
	}
	keep = append(keep, n-1)
	return sharedPlan(n, len(keep), keep, nLayers), means
}
