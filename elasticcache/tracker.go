package elasticcache

import (
	"errors"
	"fmt"
	"math"
	"slices"
)

// Stats summarises what a Tracker did to one sequence.
type Stats struct {
	PromptEntries int // N, the prompt length given to PlanPrefill
	Kept          int // entries per layer right after phase 1 (N when nothing changed)
	Merged        int // prompt entries merged in phase 1 (per layer)
	Evicted       int // prompt entries dropped in phase 1 plus all decode evictions
}

// Tracker is the cache policy state of one sequence, created before its
// prompt is encoded. It is not safe for concurrent use: one goroutine (the
// engine's decode loop) owns it.
type Tracker struct {
	spec     Spec
	nLayers  int
	textFrom int // first position after the prompt's last image (TextTailSelection)

	planned  bool
	promptN  int
	kept     int // entries held right after phase 1
	merged   int
	evicted  int
	sinkHeld int // leading entries that are original sink tokens (elastic, local)
	point    int // elastic decode truncation index before clamping

	acc []float64 // h2o: accumulated score of each held entry, position order

	// ReferenceSelection only.
	refHeld int // h2o: entries held after the last step (acc is not aligned to them)
}

// NewTracker returns a tracker for a model of nLayers layers.
func NewTracker(spec Spec, nLayers int) (*Tracker, error) {
	if nLayers < 1 {
		return nil, fmt.Errorf("elasticcache: nLayers must be at least 1, got %d", nLayers)
	}
	return &Tracker{spec: spec, nLayers: nLayers}, nil
}

// Spec returns the tracker's setting.
func (t *Tracker) Spec() Spec { return t.spec }

// SetTextTail tells the tracker where the text after the prompt's last image
// starts (its prompt position; 0 or less: the prompt has no image). Only
// TextTailSelection reads it. Call it before PlanPrefill.
func (t *Tracker) SetTextTail(from int) { t.textFrom = from }

var errNotPlanned = errors.New("elasticcache: AfterDecode called before PlanPrefill")

// checkScores verifies that scores has one finite row of exactly width
// values per layer.
func (t *Tracker) checkScores(scores [][]float32, width int) error {
	if len(scores) != t.nLayers {
		return fmt.Errorf("elasticcache: scores has %d layers, want %d", len(scores), t.nLayers)
	}
	for l, row := range scores {
		if len(row) != width {
			return fmt.Errorf("elasticcache: scores[%d] has %d entries, want %d", l, len(row), width)
		}
		for j, v := range row {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return fmt.Errorf("elasticcache: scores[%d][%d] is %v", l, j, v)
			}
		}
	}
	return nil
}

// PlanPrefill is called once, after all n prompt entries are in the cache.
// scores[l][j] is the head-averaged attention column sum that prompt entry j
// received in layer l; it may be nil when the policy needs none (full,
// local), when nothing would change (K >= n for elastic), or when the budget
// is 1. It returns nil when the cache stays as it is. Under
// ReferenceSelection elastic and h2o follow the reference rules (see the
// package documentation); its plan usually holds Spec.KeepCount(n)-1
// entries, and drops one entry when exactly one must go.
func (t *Tracker) PlanPrefill(n int, scores [][]float32) (*PrefillPlan, error) {
	if t.planned {
		return nil, errors.New("elasticcache: PlanPrefill called twice")
	}
	if n < 1 {
		return nil, fmt.Errorf("elasticcache: prompt of %d entries", n)
	}
	k := t.spec.KeepCount(n)
	compress := k < n
	policy := t.spec.Policy()

	// Which policies read the scores here: elastic when it compresses, h2o
	// whenever a later step may evict (its scores carry into decode).
	needed := (policy == Elastic && compress) || policy == H2O && t.spec.Compresses()
	if t.spec.PrefillScores() && (needed || scores != nil) {
		if scores == nil {
			return nil, fmt.Errorf("elasticcache: policy %s needs prompt scores", policy)
		}
		if err := t.checkScores(scores, n); err != nil {
			return nil, err
		}
	}

	var plan *PrefillPlan
	sink := t.spec.Sink()
	s := min(sink, n)
	ref := t.spec.reference()
	refPoint := 0 // reference elastic truncation index: initially 0
	switch {
	case !t.spec.Compresses():
	case ref && policy == Elastic:
		switch f := n - k; {
		case f >= 2:
			plan = planRefElastic(n, f, sink, scores)
			if d := t.spec.Distance(); d > 0 {
				refPoint = d
			} else {
				refPoint = k + d // ceil(b*n), one more than the entries kept
			}
		case f == 1:
			plan = planRefElasticSingle(n, t.nLayers)
		}
	case ref && policy == H2O:
		means := h2oMeans(n, scores)
		t.acc = means
		if f := n - k; f >= 1 {
			plan, t.acc = planRefH2O(n, f, sink, t.nLayers, means)
		}
	case policy == Elastic && compress:
		tail := 1
		switch t.spec.Selection() {
		case NormalizedSelection:
			scores = normalizeByQueries(scores, n)
		case TextTailSelection:
			if t.textFrom > 0 && t.textFrom < n {
				tail = n - t.textFrom
			}
		}
		plan = planElastic(n, k, sink, tail, scores)
		s, _ = elasticShape(k, sink, tail)
		if t.spec.c.EvictMerged {
			for l := range plan.Layers {
				plan.Layers[l].Groups = nil
			}
		}
	case policy == Local && compress:
		plan = planLocal(n, k, sink, t.nLayers)
		s = effectiveSink(sink, k)
	case policy == H2O:
		means := h2oMeans(n, scores)
		if compress {
			plan, t.acc = planH2O(n, k, t.nLayers, means)
		} else {
			t.acc = means
		}
	}

	t.planned = true
	t.promptN = n
	t.kept = n
	if plan != nil {
		t.kept = plan.K
		t.merged = plan.Merged()
		t.evicted = plan.Evicted()
	}
	t.sinkHeld = s
	switch d := t.spec.Distance(); {
	case ref && policy == Elastic:
		t.point = refPoint
	case d < 0:
		t.point = t.kept + d
	default:
		t.point = d
	}
	t.refHeld = t.kept
	return plan, nil
}

// AfterDecode is called after each generated token is appended. T counts the
// tokens processed so far (prompt plus generated) and held the entries the
// sequence holds now, the new one included (so 1 <= held <= T). For h2o,
// scores[l] holds this step's attention column sums over the held entries
// (len held); other policies take nil. It returns the position-order index
// of the one entry to evict, or -1, and accounts for that eviction itself.
//
// An entry is evicted exactly when held > ceil(Budget*T); the newest entry
// is never chosen, and sink entries only when nothing else is left. Choice:
// elastic takes index p clamped to [sink, held-2]; local takes index sink;
// h2o takes the lowest accumulated score in [sink, held-1), earliest on ties.
// For elastic and local "sink" is the number of original sink entries still
// held after phase 1; for h2o it is Spec.Sink as an index, as in the
// reference H2O cache (its phase 1 does not protect sink entries).
//
// Under ReferenceSelection (see the package documentation) the bound is the
// same, but elastic takes the reference's index with no sink protection (a
// negative index counts from the end, the result clamped to [0, held-2]),
// and h2o adds each step's scores to accumulated slots that phase 1 did not
// re-index.
func (t *Tracker) AfterDecode(T, held int, scores [][]float32) (int, error) {
	if held < 1 || held > T {
		return -1, fmt.Errorf("elasticcache: held=%d with T=%d (want 1 <= held <= T)", held, T)
	}
	if t.spec.Policy() == Full {
		return -1, nil
	}
	if !t.planned {
		return -1, errNotPlanned
	}
	if !t.spec.Compresses() {
		return -1, nil // ceil(1*T) = T >= held: never evicts, nothing to track
	}
	over := held > t.spec.KeepCount(T) // implies held >= 2

	idx := -1
	switch t.spec.Policy() {
	case Elastic:
		switch {
		case !over:
		case t.spec.reference():
			// The reference slices the cache around its index like a
			// Python list: a negative index counts from the end. No sink
			// protection; an index the slicing would misuse (-1, or past
			// either end) is clamped so that exactly one entry goes.
			idx = t.point
			if idx < 0 {
				idx += held
			}
			idx = min(max(idx, 0), held-2)
		default:
			lo, hi := min(t.sinkHeld, held-2), held-2
			idx = min(max(t.point, lo), hi)
		}
	case Local:
		if over {
			idx = min(t.sinkHeld, held-2)
		}
	case H2O:
		if scores == nil {
			return -1, errors.New("elasticcache: policy h2o needs decode scores")
		}
		if err := t.checkScores(scores, held); err != nil {
			return -1, err
		}
		if t.spec.reference() {
			if held != t.refHeld+1 {
				return -1, fmt.Errorf("elasticcache: held=%d but the tracker holds %d entries before this step", held, t.refHeld)
			}
			idx = t.referenceH2OStep(held, over, scores)
			break
		}
		if len(t.acc) != held-1 {
			return -1, fmt.Errorf("elasticcache: held=%d but the tracker holds %d entries before this step", held, len(t.acc))
		}
		t.acc = append(t.acc, 0)
		inv := 1 / float64(t.nLayers)
		for _, row := range scores {
			for j, v := range row {
				t.acc[j] += float64(v) * inv
			}
		}
		if over {
			idx = min(t.spec.Sink(), held-2)
			for j := idx + 1; j < held-1; j++ {
				if t.acc[j] < t.acc[idx] {
					idx = j
				}
			}
			t.acc = append(t.acc[:idx], t.acc[idx+1:]...)
		}
	}
	if idx >= 0 {
		t.evicted++
	}
	return idx, nil
}

// referenceH2OStep is one decode step of the reference H2OCache: this step's
// layer-mean scores are added to the first held slots of the accumulated
// scores (slots beyond what was accumulated count as 0; after a phase 1 that
// compacted the cache the slots are still indexed by prompt position, as in
// the reference), and when over budget the lowest of slots [sink, held-1)
// (earliest on ties) is evicted and its slot removed. It returns the index,
// or -1 for none.
func (t *Tracker) referenceH2OStep(held int, over bool, scores [][]float32) int {
	for len(t.acc) < held {
		t.acc = append(t.acc, 0)
	}
	inv := 1 / float64(t.nLayers)
	for _, row := range scores {
		for j, v := range row {
			t.acc[j] += float64(v) * inv
		}
	}
	t.refHeld = held
	if !over {
		return -1
	}
	idx := min(t.spec.Sink(), held-2)
	for j := idx + 1; j < held-1; j++ {
		if t.acc[j] < t.acc[idx] {
			idx = j
		}
	}
	t.acc = slices.Delete(t.acc, idx, idx+1)
	t.refHeld--
	return idx
}

// Stats returns the tracker's counters.
func (t *Tracker) Stats() Stats {
	return Stats{PromptEntries: t.promptN, Kept: t.kept, Merged: t.merged, Evicted: t.evicted}
}

// normalizeByQueries divides the score of prompt entry j by the n-j prompt
// queries that can attend it under a causal mask (NormalizedSelection).
func normalizeByQueries(scores [][]float32, n int) [][]float32 {
	out := make([][]float32, len(scores))
	for l, row := range scores {
		out[l] = make([]float32, n)
		for j := range n {
			out[l][j] = row[j] / float32(n-j)
		}
	}
	return out
}
