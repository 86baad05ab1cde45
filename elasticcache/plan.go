package elasticcache

import (
	"cmp"
	"fmt"
	"math"
	"slices"
)

// LayerPlan says what one layer holds after phase 1.
//
// Keep lists the kept prompt indices in ascending order. Groups, when not nil,
// has one slice per Keep entry: the prompt indices (ascending) averaged into
// that entry. Kept entry i becomes the plain mean of Keep[i]'s row and the
// rows of Groups[i], each counted once per occurrence. A nil or empty group
// means the entry stays as it is.
//
// Under PaperSelection a group never names a kept index (the entry itself is
// not listed; it is counted once). Under ReferenceSelection a group may name
// the entry's own index, which is then counted twice (the reference's
// scatter-mean includes the anchor's row and also receives it as a thrown
// row), and may name sink indices, whose rows are averaged into the anchor
// while the sink entries themselves stay as they are. Merge and ApplyLayer
// both read every row from the unmerged source, so either case is exact.
type LayerPlan struct {
	Keep   []int
	Groups [][]int
}

// PrefillPlan is the phase 1 result for a prompt of N entries: K entries per
// layer, one LayerPlan per layer. For h2o and local all layers share one Keep
// slice and have no Groups; treat plans as read-only.
type PrefillPlan struct {
	N, K   int
	Layers []LayerPlan
}

// Merged is the number of prompt entries that leave the cache averaged into
// a kept entry, in layer 0: N-K for elastic under PaperSelection (the same in
// every layer), 0 for h2o and local. Under ReferenceSelection group members
// that are kept themselves are not counted, and the count may differ from
// layer to layer (its thrown set is per layer and partly overlaps the kept
// entries).
func (p *PrefillPlan) Merged() int {
	if p == nil || len(p.Layers) == 0 {
		return 0
	}
	lp := p.Layers[0]
	m := 0
	for _, g := range lp.Groups {
		for _, j := range g {
			if _, kept := slices.BinarySearch(lp.Keep, j); !kept {
				m++ // a prompt entry appears in at most one group
			}
		}
	}
	return m
}

// Evicted is the number of prompt entries dropped without being merged in
// layer 0: N-K for h2o and local, 0 for elastic under PaperSelection.
func (p *PrefillPlan) Evicted() int {
	if p == nil {
		return 0
	}
	return p.N - p.K - p.Merged()
}

// ApplyLayer applies one layer's plan to plain rows (rows[j] is entry j's
// vector) and returns len(plan.Keep) rows: row i is the mean of
// rows[plan.Keep[i]] and the rows of plan.Groups[i]. Sums are taken in
// float64. It panics when an index is out of range or row lengths differ.
func ApplyLayer(plan LayerPlan, rows [][]float32) [][]float32 {
	out := make([][]float32, len(plan.Keep))
	var sum []float64
	for i, ki := range plan.Keep {
		base := rows[ki]
		if cap(sum) < len(base) {
			sum = make([]float64, len(base))
		}
		sum = sum[:len(base)]
		for d, v := range base {
			sum[d] = float64(v)
		}
		var group []int
		if i < len(plan.Groups) {
			group = plan.Groups[i]
		}
		for _, j := range group {
			r := rows[j]
			if len(r) != len(base) {
				panic(fmt.Sprintf("elasticcache: row %d has %d values, row %d has %d", j, len(r), ki, len(base)))
			}
			for d, v := range r {
				sum[d] += float64(v)
			}
		}
		cnt := float64(1 + len(group))
		row := make([]float32, len(base))
		for d := range row {
			row[d] = float32(sum[d] / cnt)
		}
		out[i] = row
	}
	return out
}

// effectiveSink is the number of leading prompt entries that stay untouched
// when only k of n entries may be kept (k < n): at most k-1, so that the last
// prompt entry always fits.
func effectiveSink(sink, k int) int { return max(0, min(sink, k-1)) }

// orderedBits maps a float32 to a uint32 whose unsigned order is the numeric
// order of the floats (for non-NaN values; -0 is folded onto +0 by callers).
func orderedBits(f float32) uint32 {
	b := math.Float32bits(f)
	if b&0x80000000 != 0 {
		return ^b
	}
	return b | 0x80000000
}

// elasticPlanner holds scratch space reused across layers.
type elasticPlanner struct {
	n, k, sink, anchors int
	t                   int      // first protected tail position: n-1 under the paper's rule
	keys                []uint64 // (descending score, ascending index) sort keys
	isAnchor            []bool
	target              []int32 // keep slot each prompt entry ends up in
	count               []int   // group size per keep slot
}

// elasticShape is how many leading (sink) and trailing (tail) entries an elastic
// plan keeping k entries protects: a tail that leaves no room for one more entry
// falls back to the last entry alone (the paper's rule), and the sink gives way
// to the tail.
func elasticShape(k, sink, tail int) (s, t int) {
	if tail < 1 || tail > k-1 {
		tail = 1
	}
	return max(0, min(sink, k-tail)), tail
}

// newElasticPlanner plans for n entries of which k stay, the first sink and the
// last tail protected (see elasticShape).
func newElasticPlanner(n, k, sink, tail int) *elasticPlanner {
	s, tail := elasticShape(k, sink, tail)
	return &elasticPlanner{
		n: n, k: k, sink: s, anchors: k - s - tail, t: n - tail,
		keys:     make([]uint64, 0, n),
		isAnchor: make([]bool, n),
		target:   make([]int32, n),
		count:    make([]int, k),
	}
}

// layer plans one layer from its importance row (len n, finite values).
func (e *elasticPlanner) layer(row []float32) LayerPlan {
	n, k, s, na, t := e.n, e.k, e.sink, e.anchors, e.t
	clear(e.isAnchor)
	if na > 0 {
		// In (score desc, position asc) key order the na smallest keys are
		// the anchors; a selection finds them without a full sort.
		e.keys = e.keys[:0]
		for j := s; j < t; j++ {
			f := row[j]
			if f == 0 {
				f = 0 // fold -0 onto +0 so equal scores tie on position
			}
			e.keys = append(e.keys, uint64(^orderedBits(f))<<32|uint64(j))
		}
		selectSmallest(e.keys, na)
		for _, key := range e.keys[:na] {
			e.isAnchor[uint32(key)] = true
		}
	}

	keep := make([]int, 0, k)
	for j := 0; j < s; j++ {
		keep = append(keep, j)
	}
	for j := s; j < t; j++ {
		if e.isAnchor[j] {
			keep = append(keep, j)
		}
	}
	for j := t; j < n; j++ {
		keep = append(keep, j)
	}

	// Sweep the candidates in position order, tracking the anchors (keep
	// slots s..s+na-1) on either side; with no anchors the two protected
	// neighbours (last sink entry, first tail entry) take their place.
	clear(e.count)
	next := s // keep slot of the first anchor at or after j
	for j := s; j < t; j++ {
		if e.isAnchor[j] {
			next++
			continue
		}
		var slot int
		switch {
		case na == 0:
			// Protected neighbours: slot s-1 (if any sink) and slot s, the
			// first tail entry.
			slot = s
			if s > 0 && j-keep[s-1] <= keep[s]-j {
				slot = s - 1
			}
		case next == s: // no anchor before j
			slot = next
		case next == s+na: // no anchor after j
			slot = next - 1
		default:
			slot = next
			if j-keep[next-1] <= keep[next]-j {
				slot = next - 1
			}
		}
		e.target[j] = int32(slot)
		e.count[slot]++
	}

	merged := n - k
	if merged == 0 {
		return LayerPlan{Keep: keep}
	}
	backing := make([]int, merged)
	groups := make([][]int, k)
	off := 0
	for i, c := range e.count {
		if c > 0 {
			groups[i] = backing[off : off : off+c]
			off += c
		}
	}
	for j := s; j < t; j++ {
		if !e.isAnchor[j] {
			slot := e.target[j]
			groups[slot] = append(groups[slot], j)
		}
	}
	return LayerPlan{Keep: keep, Groups: groups}
}

// planElastic builds the layer-wise merge plan (k < n) protecting the last
// tail entries (1: the paper's rule).
func planElastic(n, k, sink, tail int, scores [][]float32) *PrefillPlan {
	e := newElasticPlanner(n, k, sink, tail)
	p := &PrefillPlan{N: n, K: k, Layers: make([]LayerPlan, len(scores))}
	for l, row := range scores {
		p.Layers[l] = e.layer(row[:n])
	}
	return p
}

// planLocal keeps the first effectiveSink entries and the most recent ones (k < n).
func planLocal(n, k, sink, nLayers int) *PrefillPlan {
	s := effectiveSink(sink, k)
	keep := make([]int, 0, k)
	for j := 0; j < s; j++ {
		keep = append(keep, j)
	}
	for j := n - (k - s); j < n; j++ {
		keep = append(keep, j)
	}
	return sharedPlan(n, k, keep, nLayers)
}

// h2oMeans is the per-token mean over layers of the importance scores.
func h2oMeans(n int, scores [][]float32) []float64 {
	m := make([]float64, n)
	for _, row := range scores {
		for j, v := range row[:n] {
			m[j] += float64(v)
		}
	}
	inv := 1 / float64(len(scores))
	for j := range m {
		m[j] *= inv
	}
	return m
}

// planH2O keeps the k-1 best-scored entries (ties: earlier) and the last one
// (k < n). It returns the plan and the kept entries' scores in keep order.
func planH2O(n, k, nLayers int, means []float64) (*PrefillPlan, []float64) {
	idx := make([]int, n-1)
	for j := range idx {
		idx[j] = j
	}
	slices.SortFunc(idx, func(a, b int) int {
		if c := cmp.Compare(means[b], means[a]); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	keep := append(idx[:k-1:k-1], n-1)
	slices.Sort(keep)
	acc := make([]float64, k, k+64)
	for i, j := range keep {
		acc[i] = means[j]
	}
	return sharedPlan(n, k, keep, nLayers), acc
}

func sharedPlan(n, k int, keep []int, nLayers int) *PrefillPlan {
	p := &PrefillPlan{N: n, K: k, Layers: make([]LayerPlan, nLayers)}
	for l := range p.Layers {
		p.Layers[l].Keep = keep
	}
	return p
}
