package elasticcache

import (
	"errors"
	"fmt"
	"slices"
)

// Continue plans the next turn of a conversation whose compressed cache prev
// left behind (prev has planned and decoded under the same Spec). The held
// entries stay as they are; the turn's n new entries, which follow the held
// history, are planned like a prompt of their own:
//
//   - the policy's prompt plan over the n entries, with no sink (the
//     conversation's sink entries are held already and stay protected);
//   - ranked, for elastic and h2o, by the attention they receive from the turn's
//     own queries: scores[l][j] for turn entry j (the attention those queries pay
//     to held entries does not move them: earlier plans placed them);
//   - under TextTailSelection, textFrom is the first turn position after the
//     turn's last image (0: none, so the turn's last entry alone is protected).
//
// So every turn keeps ceil(Budget*n) of its entries, and a conversation holds
// about Budget times its length, as a single prompt would. Decoding then goes on
// over the whole held cache: the bound is ceil(Budget*T) for the conversation's
// T tokens, elastic's truncation index counts from the entries kept after this
// plan, the sink entries are the conversation's, and h2o's accumulated scores
// of held entries gain heldScores[l][i], the attention held entry i received from
// the turn's queries.
//
// It returns the turn's plan (positions 0..n-1 of the turn), or nil when the turn
// is kept whole.
func (t *Tracker) Continue(prev *Tracker, held, n int, scores, heldScores [][]float32, textFrom int) (*PrefillPlan, error) {
	switch {
	case t.planned:
		return nil, errors.New("elasticcache: Continue on a tracker that has planned")
	case prev == nil || !prev.planned:
		return nil, errors.New("elasticcache: Continue needs the tracker of a planned conversation")
	case prev.spec != t.spec:
		return nil, errors.New("elasticcache: a conversation continues under the setting it was compressed with")
	case t.spec.reference():
		return nil, errors.New("elasticcache: reference selection does not continue conversations")
	case held < 1 || n < 1:
		return nil, fmt.Errorf("elasticcache: continuing %d held entries with %d new ones", held, n)
	}
	c := t.spec.c
	c.Sink = 0
	segSpec, err := c.Spec()
	if err != nil {
		return nil, err
	}
	seg := &Tracker{spec: segSpec, nLayers: t.nLayers, textFrom: textFrom}
	plan, err := seg.PlanPrefill(n, scores)
	if err != nil {
		return nil, err
	}
	t.planned = true
	t.promptN = n
	t.kept = held + seg.kept
	t.merged, t.evicted = seg.merged, seg.evicted
	t.sinkHeld = prev.sinkHeld
	if d := t.spec.Distance(); d < 0 {
		t.point = t.kept + d
	} else {
		t.point = d
	}
	if t.spec.Policy() == H2O && t.spec.Compresses() {
		if len(prev.acc) != held {
			return nil, fmt.Errorf("elasticcache: h2o holds scores of %d entries, the cache %d", len(prev.acc), held)
		}
		if err := t.checkScores(heldScores, held); err != nil {
			return nil, err
		}
		t.acc = slices.Clone(prev.acc)
		inv := 1 / float64(t.nLayers)
		for _, row := range heldScores {
			for i, v := range row {
				t.acc[i] += float64(v) * inv
			}
		}
		t.acc = append(t.acc, seg.acc...)
	}
	return plan, nil
}
