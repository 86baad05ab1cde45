package elasticcache

import (
	"fmt"
	"math"
	"math/rand"
	"reflect"
	"slices"
	"testing"
)

// The tests in this file state each rule of ReferenceSelection on hand-made
// scores: the expected sets are derived by hand from the reference code's
// behaviour (kv_cache.py, ElasticCache and H2OCache), with the paper's
// answer next to it wherever the two differ.

// refCfg is the setting the hand-made cases use: N=10, sink 1, budget 0.5
// unless a case says otherwise, so ceil(b*N) = 5 and f = forget_num = 5.
func refCfg(pol Policy, b float64, sink, d int, sel Selection) Config {
	return Config{Policy: pol, Budget: b, Sink: sink, Distance: d, Selection: sel}
}

// Scores used by several cases (positions 0..9).
var (
	// Candidates 1..8 (sink 1) are candidate indices c = 0..7 with scores
	// .1 .8 .3 .7 .2 .6 .4 .5; ascending, the candidates are
	// order = [0 4 2 6 7 5 3 1].
	refRowA = []float32{9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.5, 1}
	// Candidates 1..8: .1 .3 .4 .5 .7 .8 .2 .6, so order = [0 6 1 2 3 7 4 5].
	refRowD = []float32{5, 0.1, 0.3, 0.4, 0.5, 0.7, 0.8, 0.2, 0.6, 1}
	refRowZ = make([]float32, 10) // all tied
)

// Rule: rank as position. Rank r keeps position sink+r when order[r] > f;
// the paper keeps the K-sink-1 best-scored candidates.
func TestReferenceElasticKeepsRanksAsPositions(t *testing.T) {
	cases := []struct {
		name      string
		row       []float32
		sink      int
		ref, pape []int
	}{
		// order = [0 4 2 6 7 5 3 1]: ranks 3 and 4 hold 6 and 7 (> 5), so
		// positions 1+3 and 1+4 stay. Paper: the 3 best of 1..8 are 2 (.8),
		// 4 (.7), 6 (.6).
		{"A", refRowA, 1, []int{0, 4, 5, 9}, []int{0, 2, 4, 6, 9}},
		// order = [0 6 1 2 3 7 4 5]: ranks 1 and 5 (> 5) -> positions 2, 6.
		// Paper: 6 (.8), 5 (.7), 8 (.6).
		{"D", refRowD, 1, []int{0, 2, 6, 9}, []int{0, 5, 6, 8, 9}},
		// All tied: ranks are the candidates in order, so ranks 6 and 7 stay
		// (positions 7, 8). Paper: ties go to the earliest, 1 2 3.
		{"tied", refRowZ, 1, []int{0, 7, 8, 9}, []int{0, 1, 2, 3, 9}},
		// Sink 0 on row A: candidates 0..8 with order [1 5 3 7 8 6 4 2 0];
		// ranks 3, 4, 5 hold 7, 8, 6 (> 5). Paper: 0 (9), 2, 4, 6.
		{"A sink 0", refRowA, 0, []int{3, 4, 5, 9}, []int{0, 2, 4, 6, 9}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, sel := range []Selection{ReferenceSelection, PaperSelection} {
				_, p := mustPlan(t, refCfg(Elastic, 0.5, c.sink, -25, sel), 10, [][]float32{c.row})
				want := c.pape
				if sel == ReferenceSelection {
					want = c.ref
				}
				if got := p.Layers[0].Keep; !slices.Equal(got, want) || p.K != len(want) {
					t.Errorf("%s: Keep = %v (K=%d), want %v", sel, got, p.K, want)
				}
			}
		})
	}
}

// Rule: the throw set misses the sink offset. Rank r with order[r] <= f
// throws position r itself; each thrown position joins the group of its
// nearest anchor (ties: the earlier one). Candidates neither kept nor thrown
// are dropped unmerged.
func TestReferenceElasticThrowsRanksWithoutSinkOffset(t *testing.T) {
	cases := []struct {
		name    string
		row     []float32
		sink    int
		groups  [][]int // per keep slot
		dropped []int   // prompt entries gone without being merged
	}{
		// Keep [0 4 5 9]. Thrown ranks 0 1 2 5 6 7 -> positions 0 1 2 5 6 7
		// (with the offset they would be 1 2 3 6 7 8). Nearest of {4, 5}:
		// 0 1 2 -> 4; 5 -> 5 (itself); 6 7 -> 5. 3 and 8 are dropped.
		{"A", refRowA, 1, [][]int{nil, {0, 1, 2}, {5, 6, 7}, nil}, []int{3, 8}},
		// Keep [0 2 6 9]. Thrown ranks 0 2 3 4 6 7 -> positions 0 2 3 4 6 7.
		// 4 is 2 away from both anchors: the earlier (2) wins.
		{"D", refRowD, 1, [][]int{nil, {0, 2, 3, 4}, {6, 7}, nil}, []int{1, 5, 8}},
		// Keep [0 7 8 9]. Thrown ranks 0..5 -> positions 0..5, all nearest 7.
		{"tied", refRowZ, 1, [][]int{nil, {0, 1, 2, 3, 4, 5}, nil, nil}, []int{6}},
		// Sink 0: keep [3 4 5 9], thrown ranks 0 1 2 6 7 8 -> 0 1 2 -> 3,
		// 6 7 8 -> 5. Nothing is dropped.
		{"A sink 0", refRowA, 0, [][]int{{0, 1, 2}, nil, {6, 7, 8}, nil}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tr, p := mustPlan(t, refCfg(Elastic, 0.5, c.sink, -25, ReferenceSelection), 10, [][]float32{c.row})
			lp := p.Layers[0]
			for i := range lp.Keep {
				if got := groupOf(lp, i); !slices.Equal(got, c.groups[i]) {
					t.Errorf("group of slot %d (entry %d) = %v, want %v", i, lp.Keep[i], got, c.groups[i])
				}
			}
			// Every group totals f+1 = 6 thrown positions.
			total := 0
			for _, g := range lp.Groups {
				total += len(g)
			}
			if total != 6 {
				t.Errorf("%d thrown entries, want f+1 = 6", total)
			}
			var gone []int
			for j := range 10 {
				_, kept := slices.BinarySearch(lp.Keep, j)
				inGroup := slices.ContainsFunc(lp.Groups, func(g []int) bool { return slices.Contains(g, j) })
				if !kept && !inGroup {
					gone = append(gone, j)
				}
			}
			if !slices.Equal(gone, c.dropped) {
				t.Errorf("dropped %v, want %v", gone, c.dropped)
			}
			if st := tr.Stats(); st.Evicted != len(c.dropped) || st.Merged != 10-p.K-len(c.dropped) {
				t.Errorf("Stats = %+v, want Evicted %d Merged %d", st, len(c.dropped), 10-p.K-len(c.dropped))
			}
		})
	}
}

// Rule: anchors merge into themselves. A thrown anchor is in its own group,
// so its row counts twice in the mean (the reference's scatter-mean includes
// the anchor and also receives it); a thrown sink entry is averaged into an
// anchor and stays as it is. ApplyLayer and Merge agree on both.
func TestReferenceElasticAnchorsMergeIntoThemselves(t *testing.T) {
	cases := []struct {
		name string
		row  []float32
		// mean[i] lists the rows averaged into kept slot i, repeats included.
		mean [][]int
	}{
		// Keep [0 4 5 9]: slot 1 = (r4 + r0 + r1 + r2)/4, slot 2 =
		// (r5 + r5 + r6 + r7)/4 (anchor 5 was thrown too), sink 0 as is.
		{"A", refRowA, [][]int{{0}, {4, 0, 1, 2}, {5, 5, 6, 7}, {9}}},
		// Keep [0 2 6 9]: both anchors were thrown.
		{"D", refRowD, [][]int{{0}, {2, 0, 2, 3, 4}, {6, 6, 7}, {9}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, p := mustPlan(t, refCfg(Elastic, 0.5, 1, -25, ReferenceSelection), 10, [][]float32{c.row})
			lp := p.Layers[0]
			// Entry j's row is one-hot at j, so a mean shows each entry's weight.
			rows := make([][]float32, 10)
			for j := range rows {
				rows[j] = make([]float32, 10)
				rows[j][j] = 1
			}
			got := ApplyLayer(lp, rows)
			for i, members := range c.mean {
				want := make([]float32, 10)
				for _, j := range members {
					want[j] += 1 / float32(len(members))
				}
				for d := range want {
					if math.Abs(float64(got[i][d]-want[d])) > 1e-6 {
						t.Fatalf("ApplyLayer slot %d = %v, want %v", i, got[i], want)
					}
				}
			}
			// Merge on a store whose cells are the prompt reversed.
			cellOf := make([]int, 10)
			src := newF32Store(1, 10, 10, 10, func() float32 { return 0 })
			for j := range 10 {
				cellOf[j] = 9 - j
				copy(src.k[0].cell(9-j), rows[j])
				copy(src.v[0].cell(9-j), rows[j])
			}
			dst := newF32Store(1, p.K, 10, 10, func() float32 { return float32(math.NaN()) })
			Merge(p, src, dst, cellOf)
			for i := range lp.Keep {
				for d := range 10 {
					if a, b := dst.k[0].cell(i)[d], got[i][d]; math.Abs(float64(a-b)) > 1e-6 || dst.v[0].cell(i)[d] != a {
						t.Fatalf("Merge slot %d = K %v V %v, ApplyLayer %v", i, dst.k[0].cell(i), dst.v[0].cell(i), got[i])
					}
				}
			}
		})
	}
}

// Rule: K-1 kept, and phase 1 runs only when at least two entries must go.
// With f = N - ceil(b*N): f >= 2 keeps max(1, ceil(b*N)-1) (elastic caps
// the sink at ceil(b*N)-2 so that this holds); f == 1 is the reference's one-entry
// eviction (elastic: index 0, its truncation index's initial value; h2o:
// the lowest score in [sink, N-1)); f == 0 changes nothing.
func TestReferenceKeepsKMinusOneAndNeedsTwoToForget(t *testing.T) {
	// h2o row: like A but entry 0 scores lowest, so the paper's h2o (no
	// sink protection in phase 1) and the reference's f == 1 eviction (from
	// the sink on) differ.
	h2oRow := []float32{0.05, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.5, 1}
	cases := []struct {
		pol        Policy
		b          float64
		row        []float32
		ref, paper []int // Keep; nil: no plan
		sink       int   // 0 means 1
	}{
		// f=5 (b .5): 4 = ceil(5)-1 kept, paper 5.
		{Elastic, 0.5, refRowA, []int{0, 4, 5, 9}, []int{0, 2, 4, 6, 9}, 0},
		// f=2 (b .8, K=8): order = [0 4 2 6 7 5 3 1], ranks with c > 2:
		// 1 3 4 5 6 -> positions 2 4 5 6 7: 7 kept. Paper: 8, dropping the
		// two lowest candidates 1 (.1) and 5 (.2).
		{Elastic, 0.8, refRowA, []int{0, 2, 4, 5, 6, 7, 9}, []int{0, 2, 3, 4, 6, 7, 8, 9}, 0},
		// f=1 (b .9): the reference drops entry 0 (despite sink 1); the
		// paper merges one candidate (the lowest, 1) into an anchor.
		{Elastic, 0.9, refRowA, []int{1, 2, 3, 4, 5, 6, 7, 8, 9}, []int{0, 2, 3, 4, 5, 6, 7, 8, 9}, 0},
		// f=0 (b .95, ceil(9.5) = 10): no plan under either rule.
		{Elastic, 0.95, refRowA, nil, nil, 0},
		// f=9 (b .1, ceil(b*N) = 1): the reference would keep sink entry 0
		// and the last entry, over its budget of 1; the sink is capped at max(0, 1-2) = 0, no
		// rank has c > 9, so only the last entry stays, as in the paper.
		{Elastic, 0.1, refRowA, []int{9}, []int{9}, 0},
		// f=3 (b .7, K=7), sink 7: the reference would keep 0..6 and 9, 8
		// entries; capped at K-2 = 5 there are m = 4 candidates 5..8
		// (.2 .6 .4 .5, order [0 2 3 1]) and no rank has c > 3: keep 0..4
		// and 9. The paper caps the sink at K-1 = 6: 0..5 and 9.
		{Elastic, 0.7, refRowA, []int{0, 1, 2, 3, 4, 9}, []int{0, 1, 2, 3, 4, 5, 9}, 7},
		// h2o f=5: entries 0..8 ascending: order = [0 1 5 3 7 8 6 4 2];
		// c > 5 at ranks 4 5 6 -> positions 4 5 6, plus 9. Paper: the best
		// 4 of 0..8 (2 4 6 8), plus 9.
		{H2O, 0.5, h2oRow, []int{4, 5, 6, 9}, []int{2, 4, 6, 8, 9}, 0},
		// h2o f=1: the reference evicts the lowest in [1, 9): entry 1; the
		// paper keeps the 8 best of 0..8, dropping entry 0.
		{H2O, 0.9, h2oRow, []int{0, 2, 3, 4, 5, 6, 7, 8, 9}, []int{1, 2, 3, 4, 5, 6, 7, 8, 9}, 0},
		{H2O, 0.95, h2oRow, nil, nil, 0},
		// h2o f=9: K-1 = 0, so only the last entry.
		{H2O, 0.1, h2oRow, []int{9}, []int{9}, 0},
	}
	for _, c := range cases {
		sink := c.sink
		if sink == 0 {
			sink = 1
		}
		t.Run(fmt.Sprintf("%s/%v/sink%d", c.pol, c.b, sink), func(t *testing.T) {
			for _, sel := range []Selection{ReferenceSelection, PaperSelection} {
				_, p := mustPlan(t, refCfg(c.pol, c.b, sink, -25, sel), 10, [][]float32{c.row})
				want := c.paper
				if sel == ReferenceSelection {
					want = c.ref
				}
				var got []int
				if p != nil {
					got = p.Layers[0].Keep
					if p.K != len(got) {
						t.Errorf("%s: K=%d but Keep has %d", sel, p.K, len(got))
					}
				}
				if !slices.Equal(got, want) || (p == nil) != (want == nil) {
					t.Errorf("%s: Keep = %v, want %v", sel, got, want)
				}
			}
		})
	}
}

// Rule: the elastic decode index. The reference computes it once as
// ceil(b*N) + distance (distance itself when > 0, not >= 0) from K, not
// from the K-1 entries it holds; when phase 1 did not run it keeps its
// initial value 0. There is no sink protection, and a negative index counts
// from the end (Python slicing). The paper clamps p = K+d (d < 0) or d into
// [sink, held-2].
func TestReferenceElasticDecodeIndex(t *testing.T) {
	cases := []struct {
		name       string
		b          float64
		d          int
		T, held    int // an over-budget step: held > ceil(b*T)
		ref, paper int
	}{
		{"d=-2 from K", 0.5, -2, 12, 7, 3, 3}, // ref: 5-2 though 4 held; paper: 5-2
		{"d=0 is not positive", 0.5, 0, 12, 7, 5, 1},
		{"d=3", 0.5, 3, 12, 7, 3, 3},
		{"negative counts from the end, clamped", 0.5, -25, 12, 7, 0, 1},
		{"negative counts from the end", 0.5, -25, 60, 40, 20, 1},
		{"-1 would keep the newest: clamped", 0.5, -6, 12, 7, 5, 1},
		{"f=1: initial index 0", 0.9, -2, 30, 29, 0, 7},
		{"f=0: initial index 0", 0.95, -2, 30, 30, 0, 8},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.held <= keepCount(c.b, c.T) {
				t.Fatalf("bad case: held %d is within ceil(%v*%d)", c.held, c.b, c.T)
			}
			for _, sel := range []Selection{ReferenceSelection, PaperSelection} {
				tr, _ := mustPlan(t, refCfg(Elastic, c.b, 1, c.d, sel), 10, [][]float32{refRowA})
				idx, err := tr.AfterDecode(c.T, c.held, nil)
				want := c.paper
				if sel == ReferenceSelection {
					want = c.ref
				}
				if err != nil || idx != want {
					t.Errorf("%s: AfterDecode(%d, %d) = %d, %v; want %d", sel, c.T, c.held, idx, err, want)
				}
			}
		})
	}
}

// Rule: the reference h2o ranks like elastic (rank r keeps position r when
// order[r] > f, no sink protection) and keeps K-1 plus the last entry.
func TestReferenceH2OKeepsRanksAsPositions(t *testing.T) {
	cases := []struct {
		name       string
		scores     [][]float32
		ref, paper []int
	}{
		// Means = row A. Entries 0..8 ascending: order = [1 5 3 7 8 6 4 2 0];
		// ranks 3 4 5 hold 7 8 6 (> 5). Paper: 0 (9), 2, 4, 6.
		{"A", [][]float32{refRowA}, []int{3, 4, 5, 9}, []int{0, 2, 4, 6, 9}},
		// The mean over layers is what is ranked: (2A + 0)/2 = A.
		{"A as a layer mean", [][]float32{scaled(refRowA, 2), make([]float32, 10)}, []int{3, 4, 5, 9}, []int{0, 2, 4, 6, 9}},
		// All tied: order = [0..8], ranks 6 7 8 stay. Paper: earliest 0..3.
		{"tied", [][]float32{refRowZ}, []int{6, 7, 8, 9}, []int{0, 1, 2, 3, 9}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, sel := range []Selection{ReferenceSelection, PaperSelection} {
				tr, p := mustPlan(t, refCfg(H2O, 0.5, 1, -25, sel), 10, c.scores)
				want := c.paper
				if sel == ReferenceSelection {
					want = c.ref
				}
				for l, lp := range p.Layers {
					if !slices.Equal(lp.Keep, want) || len(lp.Groups) != 0 {
						t.Errorf("%s layer %d: Keep = %v Groups = %v, want %v", sel, l, lp.Keep, lp.Groups, want)
					}
				}
				if st := tr.Stats(); st.Kept != len(want) || st.Merged != 0 || st.Evicted != 10-len(want) {
					t.Errorf("%s: Stats = %+v", sel, st)
				}
			}
		})
	}
}

func scaled(row []float32, f float32) []float32 {
	out := make([]float32, len(row))
	for i, v := range row {
		out[i] = v * f
	}
	return out
}

// Rule: the reference h2o does not re-index its accumulated scores after
// phase 1: slot j still holds prompt entry j's score while held entry j is
// another one, each step adds to the first held slots, and an eviction
// removes its slot. The paper's h2o keeps one score per held entry.
func TestReferenceH2ODecodeScoresStayMisaligned(t *testing.T) {
	// Phase 1 on row A keeps [3 4 5 9] (4 held) with slots = row A.
	// Step 1 (T=11, held 5) adds 1 to held index 1: slot 1 = .1+1 = 1.1.
	// Steps 2, 3 add nothing and stay within ceil(b*T) (6 <= 6, 7 <= 7).
	// Step 4 (T=14, held 8 > 7): lowest of slots 1..6 = [1.1 .8 .3 .7 .2 .6]
	// is slot 5 (.2), so held index 5 (generated token 11) goes; slots
	// become [.9 1.1 .8 .3 .7 .6 .4 .5 1].
	// Step 5 (T=15, held 8 <= 8). Step 6 (T=16, held 9 > 8): lowest of slots
	// 1..7 = [1.1 .8 .3 .7 .6 .4 .5] is slot 3.
	// The paper's h2o keeps [0 2 4 6 9] (5 held) with scores [.9 .8 .7 .6 1]
	// and new tokens start at 0: step 1 makes entry 2 1.8; step 2 (held 7 >
	// 6) evicts the lowest of [1, 6), the new token at index 5 (0), and so
	// do steps 4 and 6.
	steps := [][]float32{{0, 1, 0, 0, 0}, nil, nil, nil, nil, nil}
	cases := []struct {
		sel  Selection
		want []int
	}{
		{ReferenceSelection, []int{-1, -1, -1, 5, -1, 3}},
		{PaperSelection, []int{-1, 5, -1, 5, -1, 5}},
	}
	for _, c := range cases {
		t.Run(string(c.sel), func(t *testing.T) {
			tr, p := mustPlan(t, refCfg(H2O, 0.5, 1, -25, c.sel), 10, [][]float32{refRowA})
			held, T := p.K, 10
			var got []int
			for _, s := range steps {
				held++
				T++
				row := make([]float32, held)
				copy(row, s)
				idx, err := tr.AfterDecode(T, held, [][]float32{row})
				if err != nil {
					t.Fatal(err)
				}
				if idx >= 0 {
					held--
				}
				got = append(got, idx)
			}
			if !slices.Equal(got, c.want) {
				t.Fatalf("evictions %v, want %v", got, c.want)
			}
			// held must follow the previous step.
			if _, err := tr.AfterDecode(T+1, held+2, [][]float32{make([]float32, held+2)}); err == nil {
				t.Fatal("AfterDecode accepted a held count that skips a step")
			}
		})
	}
}

// Rule: compacted positions. Only the engine can relabel cells; the Spec
// says when it must.
func TestCompactPositions(t *testing.T) {
	cases := []struct {
		sel  Selection
		pol  Policy
		b    float64
		want bool
	}{
		{ReferenceSelection, Elastic, 0.5, true},
		{ReferenceSelection, H2O, 0.5, true},
		{ReferenceSelection, Local, 0.5, true}, // the positions come from the model, not the cache class
		{ReferenceSelection, Elastic, 1, false},
		{ReferenceSelection, Full, 0.5, false},
		{PaperSelection, Elastic, 0.5, false},
		{"", Elastic, 0.5, false},
	}
	for _, c := range cases {
		s := MustSpec(refCfg(c.pol, c.b, 1, -25, c.sel))
		if got := s.CompactPositions(); got != c.want {
			t.Errorf("%q %s %v: CompactPositions = %v, want %v", c.sel, c.pol, c.b, got, c.want)
		}
	}
	if (Spec{}).CompactPositions() {
		t.Error("zero Spec compacts positions")
	}
}

func TestSelectionDefaultsToPaper(t *testing.T) {
	for in, want := range map[Selection]Selection{"": PaperSelection, "paper": PaperSelection, "reference": ReferenceSelection} {
		if got := MustSpec(refCfg(Elastic, 0.5, 4, -25, in)).Selection(); got != want {
			t.Errorf("Selection %q: Spec.Selection() = %q, want %q", in, got, want)
		}
	}
	// Naming the paper selection gives the same Spec as naming none.
	named := MustSpec(refCfg(Elastic, 0.5, 4, -25, PaperSelection))
	if unnamed := MustSpec(refCfg(Elastic, 0.5, 4, -25, "")); named != unnamed || named.Config().Selection != "" {
		t.Errorf("paper Spec %+v differs from the unnamed one %+v", named.Config(), unnamed.Config())
	}
	if got := (Spec{}).Selection(); got != PaperSelection {
		t.Errorf("zero Spec: Selection() = %q", got)
	}
	// The server default's selection, chosen by measurement (docs/quality), is the paper's.
	if got := DefaultSpec().Selection(); got != PaperSelection || DefaultSpec() != MustSpec(refCfg(Elastic, DefaultBudget, 4, -25, PaperSelection)) {
		t.Errorf("DefaultSpec: Selection() = %q, want %q", got, PaperSelection)
	}
}

// bruteRefElastic is a slow, literal reading of the reference's selection
// for one layer: it computes each candidate's rank by counting, inverts it,
// and scans every anchor for each thrown position.
func bruteRefElastic(n, f, sink int, row []float32) LayerPlan {
	s := max(0, min(sink, n-f-2)) // the cap that keeps the plan within budget
	m := n - 1 - s
	order := make([]int, m)
	for c := range m {
		rank := 0
		for o := range m {
			if row[s+o] < row[s+c] || (row[s+o] == row[s+c] && o < c) {
				rank++
			}
		}
		order[rank] = c
	}
	var anchors, thrown []int
	for r := range m {
		if order[r] > f {
			anchors = append(anchors, s+r)
		} else {
			thrown = append(thrown, r)
		}
	}
	var keep []int
	for j := range s {
		keep = append(keep, j)
	}
	keep = append(append(keep, anchors...), n-1)
	lp := LayerPlan{Keep: keep}
	if len(anchors) == 0 || len(thrown) == 0 {
		return lp
	}
	lp.Groups = make([][]int, len(keep))
	for _, t := range thrown {
		best := 0
		for i, a := range anchors {
			if abs(a-t) < abs(anchors[best]-t) {
				best = i
			}
		}
		lp.Groups[s+best] = append(lp.Groups[s+best], t)
	}
	return lp
}

func TestReferenceElasticMatchesBruteForce(t *testing.T) {
	r := rand.New(rand.NewSource(21))
	for _, n := range []int{2, 3, 5, 10, 37, 200} {
		for _, b := range []float64{0.05, 0.3, 0.5, 0.8, 0.97} {
			for _, sink := range []int{0, 1, 4, 300} {
				for _, levels := range []int{0, 3} {
					scores := randomScores(r, 3, n, levels)
					cfg := refCfg(Elastic, b, sink, -25, ReferenceSelection)
					_, p := mustPlan(t, cfg, n, scores)
					f := n - keepCount(b, n)
					if f < 2 {
						continue // covered by TestReferenceKeepsKMinusOneAndNeedsTwoToForget
					}
					for l, row := range scores {
						want := bruteRefElastic(n, f, sink, row)
						if !reflect.DeepEqual(p.Layers[l], want) {
							t.Fatalf("%+v n=%d layer %d:\n got %+v\nwant %+v", cfg, n, l, p.Layers[l], want)
						}
						if len(want.Keep) != p.K {
							t.Fatalf("%+v n=%d layer %d holds %d, K=%d", cfg, n, l, len(want.Keep), p.K)
						}
					}
					if want := max(1, keepCount(b, n)-1); p.K != want {
						t.Fatalf("%+v n=%d: K=%d, want max(1, ceil(b*n)-1) = %d", cfg, n, p.K, want)
					}
				}
			}
		}
	}
}

// Merge and ApplyLayer agree on reference plans, whose groups hold anchors
// and sink entries.
func TestMergeMatchesApplyLayerOnReferencePlans(t *testing.T) {
	const layers, n, width = 4, 120, 6
	r := rand.New(rand.NewSource(8))
	selfMerged := 0
	for _, b := range []float64{0.2, 0.5, 0.9} {
		tr, err := NewTracker(MustSpec(refCfg(Elastic, b, 4, -25, ReferenceSelection)), layers)
		if err != nil {
			t.Fatal(err)
		}
		plan, err := tr.PlanPrefill(n, randomScores(r, layers, n, 0))
		if err != nil || plan == nil {
			t.Fatalf("b=%v: PlanPrefill = %v, %v", b, plan, err)
		}
		cellOf := r.Perm(n)
		src := newF32Store(layers, n, width, width, func() float32 { return float32(r.NormFloat64()) })
		dst := newF32Store(layers, plan.K, width, width, func() float32 { return float32(math.NaN()) })
		Merge(plan, src, dst, cellOf)
		for l, lp := range plan.Layers {
			for i, g := range lp.Groups {
				if slices.Contains(g, lp.Keep[i]) {
					selfMerged++
				}
			}
			for _, pair := range [][2]*f32Rows{{src.k[l], dst.k[l]}, {src.v[l], dst.v[l]}} {
				rows := promptRows(pair[0], cellOf)
				want, scale := ApplyLayer(lp, rows), ApplyLayer(lp, absRows(rows))
				for i := range lp.Keep {
					for d, v := range pair[1].cell(i) {
						if !(math.Abs(float64(v-want[i][d])) <= 1e-5*float64(scale[i][d])) {
							t.Fatalf("b=%v layer %d slot %d: Merge %v, ApplyLayer %v", b, l, i, v, want[i][d])
						}
					}
				}
			}
		}
	}
	if selfMerged == 0 {
		t.Fatal("no anchor merged into itself: the double-count path went untested")
	}
}

// The decode bound holds under the reference rules too, and the held
// entries stay in order with the newest kept.
func TestReferenceHeldNeverExceedsBudgetBound(t *testing.T) {
	for _, pol := range []Policy{Elastic, H2O, Local} {
		for _, b := range []float64{0.05, 0.5, 0.8, 0.95} {
			for _, sink := range []int{0, 1, 64} {
				for _, n := range []int{1, 3, 10, 40, 300} {
					for _, d := range []int{-25, 0, 10} {
						cfg := refCfg(pol, b, sink, d, ReferenceSelection)
						spec := MustSpec(cfg)
						s := newSim(t, spec, n, 2, int64(n))
						if len(s.pos) > spec.KeepCount(n) || (n > 1 && len(s.pos) == n && n-spec.KeepCount(n) >= 1) {
							t.Fatalf("%+v n=%d: %d held after phase 1", cfg, n, len(s.pos))
						}
						for range 300 {
							s.step()
							if len(s.pos) > spec.KeepCount(s.T) {
								t.Fatalf("%+v n=%d T=%d: held %d > ceil(b*T)", cfg, n, s.T, len(s.pos))
							}
							if !slices.IsSorted(s.pos) || s.pos[len(s.pos)-1] != s.T-1 {
								t.Fatalf("%+v: held positions out of order or newest lost", cfg)
							}
						}
						st := s.tr.Stats()
						if want := n + 300 - len(s.pos); st.Merged+st.Evicted != want {
							t.Fatalf("%+v n=%d: Merged+Evicted = %d, want %d", cfg, n, st.Merged+st.Evicted, want)
						}
					}
				}
			}
		}
	}
}
