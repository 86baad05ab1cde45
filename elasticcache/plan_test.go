package elasticcache

import (
	"math/rand"
	"reflect"
	"slices"
	"testing"
)

// mustPlan creates a tracker for cfg (one layer per scores row, 2 without
// scores) and runs PlanPrefill, failing the test on error.
func mustPlan(t testing.TB, cfg Config, n int, scores [][]float32) (*Tracker, *PrefillPlan) {
	t.Helper()
	spec, err := cfg.Spec()
	if err != nil {
		t.Fatalf("Spec(%+v): %v", cfg, err)
	}
	nl := len(scores)
	if nl == 0 {
		nl = 2
	}
	tr, err := NewTracker(spec, nl)
	if err != nil {
		t.Fatalf("NewTracker(%+v): %v", cfg, err)
	}
	p, err := tr.PlanPrefill(n, scores)
	if err != nil {
		t.Fatalf("PlanPrefill(n=%d, %+v): %v", n, cfg, err)
	}
	return tr, p
}

func randomScores(r *rand.Rand, layers, n, levels int) [][]float32 {
	s := make([][]float32, layers)
	for l := range s {
		s[l] = make([]float32, n)
		for j := range s[l] {
			if levels > 0 {
				s[l][j] = float32(r.Intn(levels)) // few distinct values: many ties
			} else {
				s[l][j] = r.Float32() * 10
			}
		}
	}
	return s
}

// groupOf returns the group of keep slot i, nil when Groups is absent.
func groupOf(lp LayerPlan, i int) []int {
	if i < len(lp.Groups) {
		return lp.Groups[i]
	}
	return nil
}

// bruteElastic is a slow, direct reading of the rule: pick anchors one at a
// time by (highest score, earliest position), then send each other candidate
// to the anchor at the smallest distance, scanning anchors left to right so
// the earlier one wins a tie.
func bruteElastic(n, k, sink int, row []float32) LayerPlan {
	s := min(sink, k-1)
	na := k - s - 1
	taken := make([]bool, n)
	var anchors []int
	for range na {
		best := -1
		for j := s; j < n-1; j++ {
			if !taken[j] && (best < 0 || row[j] > row[best]) {
				best = j
			}
		}
		taken[best] = true
		anchors = append(anchors, best)
	}
	slices.Sort(anchors)
	var keep []int
	for j := range s {
		keep = append(keep, j)
	}
	keep = append(keep, anchors...)
	keep = append(keep, n-1)
	targets := anchors
	if len(targets) == 0 {
		targets = nil
		if s > 0 {
			targets = append(targets, s-1)
		}
		targets = append(targets, n-1)
	}
	groups := make([][]int, k)
	for j := s; j < n-1; j++ {
		if taken[j] {
			continue
		}
		best := -1
		for _, a := range targets {
			if best < 0 || abs(a-j) < abs(best-j) {
				best = a
			}
		}
		slot := slices.Index(keep, best)
		groups[slot] = append(groups[slot], j)
	}
	return LayerPlan{Keep: keep, Groups: groups}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

func TestElasticPlanMatchesBruteForceRule(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for trial := 0; trial < 400; trial++ {
		n := 2 + r.Intn(200)
		cfg := Config{Policy: Elastic, Budget: 0.02 + 0.97*r.Float64(), Sink: r.Intn(9), Distance: -25}
		k := keepCount(cfg.Budget, n)
		levels := []int{0, 2, 5}[trial%3]
		scores := randomScores(r, 3, n, levels)
		_, p := mustPlan(t, cfg, n, scores)
		if k >= n {
			if p != nil {
				t.Fatalf("n=%d k=%d: expected nil plan", n, k)
			}
			continue
		}
		for l := range scores {
			want := bruteElastic(n, k, cfg.Sink, scores[l])
			got := p.Layers[l]
			for i := range want.Keep {
				if !slices.Equal(want.Keep, got.Keep) || !slices.Equal(groupOf(want, i), groupOf(got, i)) {
					t.Fatalf("trial %d n=%d k=%d sink=%d layer %d:\n got  %v %v\n want %v %v",
						trial, n, k, cfg.Sink, l, got.Keep, got.Groups, want.Keep, want.Groups)
				}
			}
		}
	}
}

// Every prompt index is either kept or in exactly one group; protected
// entries are kept and never merged; groups hold only candidates and every
// merged entry sits in the group of its nearest anchor.
func TestElasticPlanPartitionsThePrompt(t *testing.T) {
	r := rand.New(rand.NewSource(7))
	for trial := 0; trial < 300; trial++ {
		n := 2 + r.Intn(600)
		cfg := Config{Policy: Elastic, Budget: 0.05 + 0.9*r.Float64(), Sink: r.Intn(12), Distance: -25}
		k := keepCount(cfg.Budget, n)
		if k >= n {
			continue
		}
		s := min(cfg.Sink, k-1)
		scores := randomScores(r, 4, n, []int{0, 3}[trial%2])
		_, p := mustPlan(t, cfg, n, scores)
		if p.N != n || p.K != k || len(p.Layers) != 4 {
			t.Fatalf("plan header N=%d K=%d layers=%d, want %d %d 4", p.N, p.K, len(p.Layers), n, k)
		}
		if p.Merged() != n-k || p.Evicted() != 0 {
			t.Fatalf("Merged=%d Evicted=%d, want %d 0", p.Merged(), p.Evicted(), n-k)
		}
		for l, lp := range p.Layers {
			if len(lp.Keep) != k || len(lp.Groups) != k {
				t.Fatalf("layer %d: len(Keep)=%d len(Groups)=%d, want %d", l, len(lp.Keep), len(lp.Groups), k)
			}
			if !slices.IsSorted(lp.Keep) {
				t.Fatalf("layer %d: Keep not ascending: %v", l, lp.Keep)
			}
			for j := range s {
				if lp.Keep[j] != j {
					t.Fatalf("layer %d: sink entry %d not kept in place: %v", l, j, lp.Keep[:s])
				}
			}
			if lp.Keep[k-1] != n-1 {
				t.Fatalf("layer %d: last prompt entry not kept", l)
			}
			seen := make([]int, n)
			for i, ki := range lp.Keep {
				seen[ki]++
				g := lp.Groups[i]
				if !slices.IsSorted(g) {
					t.Fatalf("layer %d slot %d: group not ascending: %v", l, i, g)
				}
				if len(g) > 0 && k > s+1 && (i < s || i == k-1) {
					t.Fatalf("layer %d: protected slot %d received %v although anchors exist", l, i, g)
				}
				for _, j := range g {
					seen[j]++
					if j < s || j == n-1 {
						t.Fatalf("layer %d: protected entry %d merged", l, j)
					}
				}
			}
			for j, c := range seen {
				if c != 1 {
					t.Fatalf("layer %d: entry %d appears %d times", l, j, c)
				}
			}
		}
	}
}

func TestElasticAnchorsByScoreTiesToEarlierAndMergeIntoNearestAnchor(t *testing.T) {
	// n=10, budget 0.5 -> K=5, sink=1 -> 3 anchors among candidates 1..8.
	row := []float32{9, 0.1, 0.5, 0.9, 0.5, 0.5, 0.2, 0.9, 0.1, 0}
	cfg := Config{Policy: Elastic, Budget: 0.5, Sink: 1, Distance: -25}
	_, p := mustPlan(t, cfg, 10, [][]float32{row})
	lp := p.Layers[0]
	// Anchors: 3 and 7 (0.9), then 2 wins the 0.5 tie against 4 and 5.
	if want := []int{0, 2, 3, 7, 9}; !slices.Equal(lp.Keep, want) {
		t.Fatalf("Keep = %v, want %v", lp.Keep, want)
	}
	// 1 -> 2; 4 -> 3; 5 is 2 from both 3 and 7 -> 3; 6 -> 7; 8 -> 7 even
	// though the protected last entry 9 is nearer.
	want := [][]int{nil, {1}, {4, 5}, {6, 8}, nil}
	for i := range want {
		if !slices.Equal(lp.Groups[i], want[i]) {
			t.Fatalf("Groups = %v, want %v", lp.Groups, want)
		}
	}
}

func TestElasticNearestAnchorTieGoesToEarlierAnchor(t *testing.T) {
	// n=9, sink 0, budget 3/9 -> K=3: anchors 2 and 6, last 8.
	row := []float32{0, 0, 5, 0, 0, 0, 5, 0, 0}
	_, p := mustPlan(t, Config{Policy: Elastic, Budget: 3.0 / 9, Sink: 0, Distance: -25}, 9, [][]float32{row})
	lp := p.Layers[0]
	if want := []int{2, 6, 8}; !slices.Equal(lp.Keep, want) {
		t.Fatalf("Keep = %v, want %v", lp.Keep, want)
	}
	// 4 is 2 away from both 2 and 6: it goes to 2. 7 goes to 6, not to 8.
	want := [][]int{{0, 1, 3, 4}, {5, 7}, nil}
	for i := range want {
		if !slices.Equal(lp.Groups[i], want[i]) {
			t.Fatalf("Groups = %v, want %v", lp.Groups, want)
		}
	}
}

func TestElasticNegativeZeroTiesWithZero(t *testing.T) {
	negZero := float32(0)
	negZero = -negZero
	row := []float32{1, negZero, 0, 0, 0, 1}
	// n=6, sink 1, budget 0.5 -> K=3: one anchor among 1..4, all scores zero.
	_, p := mustPlan(t, Config{Policy: Elastic, Budget: 0.5, Sink: 1}, 6, [][]float32{row})
	if want := []int{0, 1, 5}; !slices.Equal(p.Layers[0].Keep, want) {
		t.Fatalf("Keep = %v, want %v (earliest of equal scores)", p.Layers[0].Keep, want)
	}
}

func TestElasticLayersChooseIndependently(t *testing.T) {
	up := []float32{0, 1, 2, 3, 4, 5, 6, 7}
	down := []float32{7, 6, 5, 4, 3, 2, 1, 0}
	_, p := mustPlan(t, Config{Policy: Elastic, Budget: 0.5, Sink: 1}, 8, [][]float32{up, down})
	if want := []int{0, 5, 6, 7}; !slices.Equal(p.Layers[0].Keep, want) {
		t.Fatalf("layer 0 Keep = %v, want %v", p.Layers[0].Keep, want)
	}
	if want := []int{0, 1, 2, 7}; !slices.Equal(p.Layers[1].Keep, want) {
		t.Fatalf("layer 1 Keep = %v, want %v", p.Layers[1].Keep, want)
	}
}

func TestElasticBudgetBelowSinkClampsSinkAndMergesIntoNearestProtected(t *testing.T) {
	row := make([]float32, 10)
	for j := range row {
		row[j] = float32(j * j)
	}
	cases := []struct {
		name   string
		budget float64
		keep   []int
		groups [][]int
	}{
		// K=5 = sink+1: no anchors, candidates 4..8 go to 3 or 9 (6 ties -> 3).
		{"K equals sink+1", 0.5, []int{0, 1, 2, 3, 9}, [][]int{nil, nil, nil, {4, 5, 6}, {7, 8}}},
		// K=2: sink shrinks to 1; 1..8 split between 0 and 9 (ties impossible).
		{"K=2", 0.2, []int{0, 9}, [][]int{{1, 2, 3, 4}, {5, 6, 7, 8}}},
		// K=1: only the last entry stays and takes everything.
		{"K=1", 0.1, []int{9}, [][]int{{0, 1, 2, 3, 4, 5, 6, 7, 8}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, p := mustPlan(t, Config{Policy: Elastic, Budget: c.budget, Sink: 4}, 10, [][]float32{row})
			lp := p.Layers[0]
			if !slices.Equal(lp.Keep, c.keep) {
				t.Fatalf("Keep = %v, want %v", lp.Keep, c.keep)
			}
			for i := range c.groups {
				if !slices.Equal(lp.Groups[i], c.groups[i]) {
					t.Fatalf("Groups = %v, want %v", lp.Groups, c.groups)
				}
			}
		})
	}
}

func TestApplyLayerAveragesEachGroupWithItsAnchor(t *testing.T) {
	rows := [][]float32{
		{1, 10}, {2, 20}, {4, 40}, {8, 80}, {16, 160}, {32, 320},
	}
	plan := LayerPlan{
		Keep:   []int{0, 2, 5},
		Groups: [][]int{nil, {1, 3, 4}, {}},
	}
	got := ApplyLayer(plan, rows)
	want := [][]float32{
		{1, 10},
		{(2 + 4 + 8 + 16) / 4.0, (20 + 40 + 80 + 160) / 4.0}, // 7.5, 75
		{32, 320},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ApplyLayer = %v, want %v", got, want)
	}
	// No Groups at all: plain gather.
	got = ApplyLayer(LayerPlan{Keep: []int{1, 4}}, rows)
	if want := [][]float32{{2, 20}, {16, 160}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ApplyLayer gather = %v, want %v", got, want)
	}
	// The input rows are untouched.
	if rows[2][0] != 4 || rows[2][1] != 40 {
		t.Fatalf("ApplyLayer modified its input: %v", rows[2])
	}
}

func TestApplyLayerOnElasticPlanPreservesColumnSumsWeighted(t *testing.T) {
	// sum over kept rows of mean*groupsize equals the sum of all rows.
	r := rand.New(rand.NewSource(3))
	n, dim := 200, 5
	rows := make([][]float32, n)
	for j := range rows {
		rows[j] = make([]float32, dim)
		for d := range rows[j] {
			rows[j][d] = float32(r.Intn(100))
		}
	}
	_, p := mustPlan(t, Config{Policy: Elastic, Budget: 0.3, Sink: 4}, n, randomScores(r, 2, n, 0))
	for _, lp := range p.Layers {
		out := ApplyLayer(lp, rows)
		for d := 0; d < dim; d++ {
			var all, weighted float64
			for j := range rows {
				all += float64(rows[j][d])
			}
			for i := range out {
				weighted += float64(out[i][d]) * float64(1+len(groupOf(lp, i)))
			}
			if diff := all - weighted; diff > 1e-2 || diff < -1e-2 {
				t.Fatalf("dim %d: weighted sum %v, want %v", d, weighted, all)
			}
		}
	}
}

func TestAfterPhaseOneEveryLayerHoldsExactlyK(t *testing.T) {
	r := rand.New(rand.NewSource(11))
	for _, pol := range []Policy{Elastic, H2O, Local} {
		for _, n := range []int{1, 2, 3, 5, 17, 100, 577, 1500} {
			for _, b := range []float64{0.01, 0.1, 0.25, 0.5, 0.8, 0.99, 1} {
				cfg := Config{Policy: pol, Budget: b, Sink: 4, Distance: -25}
				k := keepCount(cfg.Budget, n)
				tr, p := mustPlan(t, cfg, n, randomScores(r, 3, n, 4))
				if k >= n {
					if p != nil {
						t.Fatalf("%s n=%d b=%v: plan for K>=n", pol, n, b)
					}
					continue
				}
				if p == nil || p.K != k || p.N != n {
					t.Fatalf("%s n=%d b=%v: plan %+v, want K=%d", pol, n, b, p, k)
				}
				for l, lp := range p.Layers {
					if len(lp.Keep) != k {
						t.Fatalf("%s n=%d b=%v layer %d holds %d, want %d", pol, n, b, l, len(lp.Keep), k)
					}
					if lp.Keep[len(lp.Keep)-1] != n-1 {
						t.Fatalf("%s: last prompt entry dropped", pol)
					}
				}
				st := tr.Stats()
				wantMerged, wantEvicted := 0, n-k
				if pol == Elastic {
					wantMerged, wantEvicted = n-k, 0
				}
				if p.Merged() != wantMerged || p.Evicted() != wantEvicted {
					t.Fatalf("%s: Merged=%d Evicted=%d, want %d %d", pol, p.Merged(), p.Evicted(), wantMerged, wantEvicted)
				}
				if st != (Stats{PromptEntries: n, Kept: k, Merged: wantMerged, Evicted: wantEvicted}) {
					t.Fatalf("%s: Stats = %+v", pol, st)
				}
			}
		}
	}
}

func TestLocalPrefillKeepsSinkAndMostRecent(t *testing.T) {
	cases := []struct {
		n      int
		budget float64
		sink   int
		keep   []int
	}{
		{10, 0.6, 2, []int{0, 1, 6, 7, 8, 9}},
		{10, 0.5, 0, []int{5, 6, 7, 8, 9}},
		{10, 0.3, 4, []int{0, 1, 9}}, // K=3 <= sink: sink shrinks to K-1
		{10, 0.1, 4, []int{9}},
	}
	for _, c := range cases {
		_, p := mustPlan(t, Config{Policy: Local, Budget: c.budget, Sink: c.sink}, c.n, nil)
		for l, lp := range p.Layers {
			if !slices.Equal(lp.Keep, c.keep) || len(lp.Groups) != 0 {
				t.Fatalf("n=%d b=%v sink=%d layer %d: Keep=%v Groups=%v, want %v", c.n, c.budget, c.sink, l, lp.Keep, lp.Groups, c.keep)
			}
		}
	}
}

func TestH2OPrefillKeepsBestMeanScoresPlusLast(t *testing.T) {
	// Means over the two layers: [4, 1, 2, 2, 0.5, 0].
	scores := [][]float32{
		{5, 1, 3, 2, 0.5, 0},
		{3, 1, 1, 2, 0.5, 0},
	}
	// n=6, budget 0.5 -> K=3: best two of 0..4 are 0 (4) and 2 (ties with 3, earlier wins); plus 5.
	_, p := mustPlan(t, Config{Policy: H2O, Budget: 0.5, Sink: 0}, 6, scores)
	for l, lp := range p.Layers {
		if want := []int{0, 2, 5}; !slices.Equal(lp.Keep, want) || len(lp.Groups) != 0 {
			t.Fatalf("layer %d: Keep=%v Groups=%v, want %v and no groups", l, lp.Keep, lp.Groups, want)
		}
	}
}

func TestPlanIsNilWhenNothingChanges(t *testing.T) {
	r := rand.New(rand.NewSource(5))
	for _, pol := range []Policy{Full, Elastic, H2O, Local} {
		for _, b := range []float64{0.1, 0.5, 1} {
			n := 50
			cfg := Config{Policy: pol, Budget: b, Sink: 4}
			_, p := mustPlan(t, cfg, n, randomScores(r, 2, n, 0))
			if (p == nil) != (pol == Full || b == 1) {
				t.Fatalf("%s b=%v: plan %v", pol, b, p)
			}
		}
		// One-token prompt: K = n = 1 for any budget.
		_, p := mustPlan(t, Config{Policy: pol, Budget: 0.1, Sink: 4}, 1, randomScores(r, 2, 1, 0))
		if p != nil {
			t.Fatalf("%s: plan for a one-token prompt", pol)
		}
	}
}

func TestSelectSmallestFindsTheKSmallest(t *testing.T) {
	r := rand.New(rand.NewSource(13))
	for trial := 0; trial < 500; trial++ {
		n := 1 + r.Intn(400)
		keys := make([]uint64, n)
		for i := range keys {
			switch trial % 4 {
			case 0: // random
				keys[i] = r.Uint64()>>32<<32 | uint64(i)
			case 1: // ascending
				keys[i] = uint64(i)
			case 2: // descending
				keys[i] = uint64(n - i)
			default: // all "scores" equal, shuffled: only the index differs
				keys[i] = 7<<32 | uint64(i)
			}
		}
		if trial%4 == 3 {
			r.Shuffle(n, func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
		}
		k := r.Intn(n + 1)
		want := slices.Clone(keys)
		slices.Sort(want)
		selectSmallest(keys, k)
		got := slices.Clone(keys[:k])
		slices.Sort(got)
		if !slices.Equal(got, want[:k]) {
			t.Fatalf("trial %d n=%d k=%d: got %v, want %v", trial, n, k, got, want[:k])
		}
	}
}

// The normalized selection ranks an entry by its mean attention per query that can
// see it: an entry late in the prompt, attended by few queries but strongly, becomes
// an anchor where the paper's accumulated score passes it over.
func TestNormalizedSelectionRanksLateEntriesByMeanAttention(t *testing.T) {
	const n = 10
	// Accumulated scores: entry 2 gathers 3.0 from 8 queries (mean 0.375), entry 7
	// gathers 2.0 from 3 queries (mean 0.67); everything else is lower on both counts.
	row := []float32{5, 1, 3.0, 0.8, 0.7, 0.6, 0.5, 2.0, 0.1, 1}
	plan := func(sel Selection) []int {
		tr, err := NewTracker(MustSpec(Config{Policy: Elastic, Budget: 0.3, Sink: 1, Distance: -25, Selection: sel}), 1)
		if err != nil {
			t.Fatal(err)
		}
		p, err := tr.PlanPrefill(n, [][]float32{row})
		if err != nil || p == nil {
			t.Fatalf("%s: plan %v, err %v", sel, p, err)
		}
		return p.Layers[0].Keep
	}
	// K = 3: the sink, one anchor, the last entry.
	if got := plan(PaperSelection); !slices.Equal(got, []int{0, 2, 9}) {
		t.Errorf("paper keeps %v, want [0 2 9]", got)
	}
	if got := plan(NormalizedSelection); !slices.Equal(got, []int{0, 7, 9}) {
		t.Errorf("normalized keeps %v, want [0 7 9]", got)
	}
}

// The text-tail selection keeps the text after the last image whole, like the
// last entry, and spends the rest of the budget as the paper does; without an
// image, or when the tail leaves no room, it is the paper's rule.
func TestTextTailSelectionKeepsTheTextAfterTheImage(t *testing.T) {
	const n = 12
	row := []float32{5, 1, 3, 0.8, 0.7, 0.6, 0.5, 2, 0.1, 0.2, 0.05, 1}
	plan := func(sel Selection, budget float64, textFrom int) LayerPlan {
		tr, err := NewTracker(MustSpec(Config{Policy: Elastic, Budget: budget, Sink: 1, Distance: -25, Selection: sel}), 1)
		if err != nil {
			t.Fatal(err)
		}
		tr.SetTextTail(textFrom)
		p, err := tr.PlanPrefill(n, [][]float32{row})
		if err != nil || p == nil {
			t.Fatalf("plan %v, err %v", p, err)
		}
		return p.Layers[0]
	}
	// K = 6: sink 0, tail 8..11 (4 entries), one anchor: entry 2 (score 3).
	got := plan(TextTailSelection, 0.5, 8)
	if !slices.Equal(got.Keep, []int{0, 2, 8, 9, 10, 11}) {
		t.Fatalf("text-tail keeps %v, want [0 2 8 9 10 11]", got.Keep)
	}
	// Every other candidate (1, 3..7) merges into the only anchor.
	if !slices.Equal(got.Groups[1], []int{1, 3, 4, 5, 6, 7}) || len(got.Groups[2]) != 0 {
		t.Fatalf("groups %v", got.Groups)
	}
	paper := plan(PaperSelection, 0.5, 8)
	for _, tc := range []struct {
		name     string
		budget   float64
		textFrom int
	}{{"no image", 0.5, 0}, {"tail leaves no room", 0.3, 2}} {
		if a, b := plan(TextTailSelection, tc.budget, tc.textFrom), plan(PaperSelection, tc.budget, tc.textFrom); !slices.Equal(a.Keep, b.Keep) {
			t.Errorf("%s: text-tail keeps %v, paper %v", tc.name, a.Keep, b.Keep)
		}
	}
	if slices.Equal(paper.Keep, got.Keep) {
		t.Fatal("the paper's rule kept the same entries; the test shows nothing")
	}
}

// The evict-merged ablation keeps exactly the anchors the merge would keep and
// drops the rest instead of averaging them in.
func TestEvictMergedKeepsTheSameAnchorsWithoutGroups(t *testing.T) {
	const n, layers = 40, 3
	scores := make([][]float32, layers)
	for l := range scores {
		scores[l] = make([]float32, n)
		for j := range scores[l] {
			scores[l][j] = float32((j*7+l*13)%17) + 0.5
		}
	}
	plan := func(evict bool) *PrefillPlan {
		tr, err := NewTracker(MustSpec(Config{Policy: Elastic, Budget: 0.5, Sink: 2, Distance: -25, EvictMerged: evict}), layers)
		if err != nil {
			t.Fatal(err)
		}
		p, err := tr.PlanPrefill(n, scores)
		if err != nil || p == nil {
			t.Fatalf("plan %v, err %v", p, err)
		}
		return p
	}
	merged, evicted := plan(false), plan(true)
	for l := range layers {
		if !slices.Equal(merged.Layers[l].Keep, evicted.Layers[l].Keep) {
			t.Fatalf("layer %d: anchors differ: %v vs %v", l, merged.Layers[l].Keep, evicted.Layers[l].Keep)
		}
	}
	if merged.Merged() != n-merged.K || evicted.Merged() != 0 || evicted.Evicted() != n-evicted.K {
		t.Fatalf("merged %d/%d, evicted %d/%d", merged.Merged(), merged.Evicted(), evicted.Merged(), evicted.Evicted())
	}
}
