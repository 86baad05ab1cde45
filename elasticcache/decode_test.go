package elasticcache

import (
	"errors"
	"math/rand"
	"slices"
	"strings"
	"testing"
)

// sim drives a Tracker through a prompt and a decode, tracking the position
// of every held entry (slot order; for elastic, layer 0's kept positions).
type sim struct {
	t      testing.TB
	tr     *Tracker
	r      *rand.Rand
	layers int
	T      int
	pos    []int
}

// newSim plans an n-entry prompt with random scores where spec needs them.
func newSim(t testing.TB, spec Spec, n, layers int, seed int64) *sim {
	t.Helper()
	s := &sim{t: t, r: rand.New(rand.NewSource(seed)), layers: layers}
	tr, err := NewTracker(spec, layers)
	if err != nil {
		t.Fatal(err)
	}
	s.tr = tr
	var scores [][]float32
	if spec.PrefillScores() {
		scores = randomScores(s.r, layers, n, 0)
	}
	p, err := tr.PlanPrefill(n, scores)
	if err != nil {
		t.Fatal(err)
	}
	s.T = n
	if p == nil {
		for j := range n {
			s.pos = append(s.pos, j)
		}
	} else {
		s.pos = slices.Clone(p.Layers[0].Keep)
	}
	return s
}

// step appends one generated token and applies the tracker's answer.
func (s *sim) step() int {
	s.t.Helper()
	s.pos = append(s.pos, s.T)
	s.T++
	var scores [][]float32
	if s.tr.Spec().DecodeScores() {
		scores = randomScores(s.r, s.layers, len(s.pos), 0)
	}
	idx, err := s.tr.AfterDecode(s.T, len(s.pos), scores)
	if err != nil {
		s.t.Fatalf("AfterDecode(T=%d, held=%d): %v", s.T, len(s.pos), err)
	}
	if idx >= len(s.pos)-1 || idx < -1 {
		s.t.Fatalf("AfterDecode(T=%d, held=%d) = %d: out of range or the newest entry", s.T, len(s.pos), idx)
	}
	if idx >= 0 {
		s.pos = slices.Delete(s.pos, idx, idx+1)
	}
	return idx
}

func TestElasticDecodeEvictionIndex(t *testing.T) {
	cases := []struct {
		name     string
		n        int
		budget   float64
		sink     int
		distance int
		T, held  int
		want     int
	}{
		{"under the bound", 100, 0.5, 4, -25, 101, 51, -1},
		{"K+distance", 100, 0.5, 4, -25, 102, 52, 25},
		{"positive distance is absolute", 100, 0.5, 4, 10, 102, 52, 10},
		{"zero distance clamps to sink", 100, 0.5, 4, 0, 102, 52, 4},
		{"zero distance, no sink", 100, 0.5, 0, 0, 102, 52, 0},
		{"below sink clamps to sink", 100, 0.5, 4, -48, 102, 52, 4},
		{"far below clamps to sink", 100, 0.5, 4, -100000, 102, 52, 4},
		{"beyond the end clamps to held-2", 100, 0.5, 4, 100, 102, 52, 50},
		{"K-1 is the last prompt entry", 100, 0.5, 4, -1, 102, 52, 49},
		{"no compression: K is n", 3, 0.9, 1, -1, 11, 11, 2},
		{"no compression: sink is the whole prompt", 3, 0.9, 4, -25, 11, 11, 3},
		{"tiny budget: sink gave way in phase 1", 10, 0.1, 4, -25, 12, 3, 0},
		{"held-2 below sink", 10, 0.3, 4, 7, 14, 6, 4},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := Config{Policy: Elastic, Budget: c.budget, Sink: c.sink, Distance: c.distance}
			tr, _ := mustPlan(t, cfg, c.n, randomScores(rand.New(rand.NewSource(1)), 2, c.n, 0))
			got, err := tr.AfterDecode(c.T, c.held, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Fatalf("AfterDecode(T=%d, held=%d) = %d, want %d", c.T, c.held, got, c.want)
			}
		})
	}
}

// With a fixed truncation index p the first p entries never move and the
// rest is the most recent window.
func TestElasticDecodeKeepsFirstPAndSlidesTheRest(t *testing.T) {
	spec := MustSpec(Config{Policy: Elastic, Budget: 0.5, Sink: 4, Distance: -25})
	s := newSim(t, spec, 200, 2, 9) // K=100, p=75
	head := slices.Clone(s.pos[:75])
	for range 1000 {
		idx := s.step()
		if idx != -1 && idx != 75 {
			t.Fatalf("T=%d: evicted %d, want 75", s.T, idx)
		}
	}
	if !slices.Equal(s.pos[:75], head) {
		t.Fatalf("the first 75 entries changed")
	}
	tail := s.pos[75:]
	for i, p := range tail {
		if want := s.T - len(tail) + i; p != want {
			t.Fatalf("tail[%d] = position %d, want %d (most recent window)", i, p, want)
		}
	}
}

func TestH2OEvictsLowestAccumulatedScore(t *testing.T) {
	// Prompt means [4, 1, 2, 2, 0.5, 2]; n=6, budget 0.5 -> K=3, keep 0, 2, 5
	// with accumulated scores [4, 2, 2].
	prompt := [][]float32{
		{5, 1, 3, 2, 0.5, 1},
		{3, 1, 1, 2, 0.5, 3},
	}
	tr, p := mustPlan(t, Config{Policy: H2O, Budget: 0.5, Sink: 1}, 6, prompt)
	if want := []int{0, 2, 5}; !slices.Equal(p.Layers[0].Keep, want) {
		t.Fatalf("Keep = %v, want %v", p.Layers[0].Keep, want)
	}
	steps := []struct {
		T, held int
		scores  [][]float32
		want    int
	}{
		// means [1,0,2,1] -> acc [5,2,4,1]; ceil(3.5)=4, no eviction.
		{7, 4, [][]float32{{1, 0, 1, 1}, {1, 0, 3, 1}}, -1},
		// means [0,1,0,0,1] -> acc [5,3,4,1,1]; ceil(4)=4: lowest in [1,4) is 3.
		{8, 5, [][]float32{{0, 1, 0, 0, 2}, {0, 1, 0, 0, 0}}, 3},
		// acc [5,3,4,1,0]; ceil(4.5)=5, no eviction.
		{9, 5, [][]float32{{0, 0, 0, 0, 0}, {0, 0, 0, 0, 0}}, -1},
		// acc [5,3,4,1,0,0]; ceil(5)=5: lowest in [1,5) is 4 (the newest, 5, is never chosen).
		{10, 6, [][]float32{{0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}}, 4},
		// acc [5,3,4,1,0,0]; ceil(5.5)=6, no eviction.
		{11, 6, [][]float32{{0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}}, -1},
		// acc [5,3,4,1,0,0,9]: 4 and 5 tie at 0 -> the earlier, 4.
		{12, 7, [][]float32{{0, 0, 0, 0, 0, 0, 9}, {0, 0, 0, 0, 0, 0, 9}}, 4},
	}
	for _, st := range steps {
		got, err := tr.AfterDecode(st.T, st.held, st.scores)
		if err != nil {
			t.Fatalf("T=%d: %v", st.T, err)
		}
		if got != st.want {
			t.Fatalf("AfterDecode(T=%d, held=%d) = %d, want %d", st.T, st.held, got, st.want)
		}
	}
	// acc is now [5,3,4,1,0,9]. Make the sink entry the lowest: it stays,
	// and among [1,6) entry 4 (acc 0) goes. ceil(6.5)=7 < held 8 after two steps.
	if got, err := tr.AfterDecode(13, 7, [][]float32{{-20, 0, 0, 0, 0, 0, 1}, {-20, 0, 0, 0, 0, 0, 1}}); err != nil || got != -1 {
		t.Fatalf("T=13: %d, %v; want -1", got, err)
	}
	if got, err := tr.AfterDecode(14, 8, [][]float32{{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}}); err != nil || got != 4 {
		t.Fatalf("T=14: %d, %v; want 4 (sink 0 has acc -15 but is protected)", got, err)
	}
	if st := tr.Stats(); st.Evicted != 3+4 {
		t.Fatalf("Stats.Evicted = %d, want 7 (3 in phase 1, 4 during decode)", st.Evicted)
	}
}

// Checks every h2o decision against an independent accumulation. Integer
// scores over 4 layers keep every sum exact, so ties are real ties.
func TestH2OMatchesIndependentAccumulation(t *testing.T) {
	r := rand.New(rand.NewSource(21))
	const layers, n = 4, 120
	cfg := Config{Policy: H2O, Budget: 0.4, Sink: 4}
	spec := MustSpec(cfg)
	prompt := randomScores(r, layers, n, 6)
	tr, p := mustPlan(t, cfg, n, prompt)
	acc := make([]float64, 0)
	for _, j := range p.Layers[0].Keep {
		var m float64
		for l := range layers {
			m += float64(prompt[l][j])
		}
		acc = append(acc, m/layers)
	}
	T := n
	for range 600 {
		T++
		held := len(acc) + 1
		sc := randomScores(r, layers, held, 6)
		acc = append(acc, 0)
		for j := range held {
			var m float64
			for l := range layers {
				m += float64(sc[l][j])
			}
			acc[j] += m / layers
		}
		want := -1
		if held > spec.KeepCount(T) {
			want = 4
			for j := 5; j < held-1; j++ {
				if acc[j] < acc[want] {
					want = j
				}
			}
		}
		got, err := tr.AfterDecode(T, held, sc)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("T=%d: evicted %d, want %d (acc %v)", T, got, want, acc)
		}
		if got >= 0 {
			acc = slices.Delete(acc, got, got+1)
		}
	}
}

func TestLocalWindowSlides(t *testing.T) {
	for _, sink := range []int{0, 4} {
		spec := MustSpec(Config{Policy: Local, Budget: 0.25, Sink: sink})
		s := newSim(t, spec, 400, 2, 1) // K=100
		for range 800 {
			s.step()
			held := len(s.pos)
			if held != spec.KeepCount(s.T) {
				t.Fatalf("sink=%d T=%d: held %d, want %d", sink, s.T, held, spec.KeepCount(s.T))
			}
			for i := range sink {
				if s.pos[i] != i {
					t.Fatalf("sink=%d T=%d: sink entry %d lost: %v", sink, s.T, i, s.pos[:sink])
				}
			}
			for i, p := range s.pos[sink:] {
				if want := s.T - (held - sink) + i; p != want {
					t.Fatalf("sink=%d T=%d: window[%d] = %d, want %d", sink, s.T, i, p, want)
				}
			}
		}
	}
}

func TestBudgetOneNeverPlansOrEvicts(t *testing.T) {
	for _, pol := range []Policy{Full, Elastic, H2O, Local} {
		for _, n := range []int{1, 7, 577} {
			s := newSim(t, MustSpec(Config{Policy: pol, Budget: 1, Sink: 4, Distance: -25}), n, 3, 2)
			if len(s.pos) != n {
				t.Fatalf("%s n=%d: phase 1 changed the cache", pol, n)
			}
			for range 3000 {
				if idx := s.step(); idx != -1 {
					t.Fatalf("%s n=%d T=%d: evicted %d at budget 1", pol, n, s.T, idx)
				}
			}
			if st := s.tr.Stats(); st.Merged != 0 || st.Evicted != 0 || st.Kept != n {
				t.Fatalf("%s: Stats = %+v", pol, st)
			}
		}
	}
	// h2o at budget 1 also works without any scores.
	tr, p := mustPlan(t, Config{Policy: H2O, Budget: 1, Sink: 4}, 50, nil)
	if p != nil {
		t.Fatal("h2o budget 1 planned a change")
	}
	for T := 51; T < 200; T++ {
		if idx, err := tr.AfterDecode(T, T, nil); idx != -1 || err != nil {
			t.Fatalf("T=%d: %d, %v", T, idx, err)
		}
	}
}

func TestHeldNeverExceedsBudgetBoundDuringDecode(t *testing.T) {
	for _, pol := range []Policy{Full, Elastic, H2O, Local} {
		for _, b := range []float64{0.05, 0.2, 0.5, 0.8, 0.95} {
			for _, sink := range []int{0, 4, 64} {
				for _, n := range []int{1, 3, 40, 300} {
					for _, d := range []int{-25, 0, 10} {
						cfg := Config{Policy: pol, Budget: b, Sink: sink, Distance: d}
						spec := MustSpec(cfg)
						s := newSim(t, spec, n, 2, int64(n))
						// A full Spec keeps n of n, so one rule covers every policy.
						if len(s.pos) != spec.KeepCount(n) {
							t.Fatalf("%+v n=%d: %d held after phase 1, want %d", cfg, n, len(s.pos), spec.KeepCount(n))
						}
						for range 400 {
							s.step()
							limit := spec.KeepCount(s.T)
							if len(s.pos) > limit {
								t.Fatalf("%+v n=%d T=%d: held %d > ceil(b*T) = %d", cfg, n, s.T, len(s.pos), limit)
							}
							if !slices.IsSorted(s.pos) || s.pos[len(s.pos)-1] != s.T-1 {
								t.Fatalf("%+v: held positions out of order or newest lost", cfg)
							}
						}
						st := s.tr.Stats()
						if want := n + 400 - len(s.pos); st.Merged+st.Evicted != want {
							t.Fatalf("%+v n=%d: Merged+Evicted = %d, want %d", cfg, n, st.Merged+st.Evicted, want)
						}
					}
				}
			}
		}
	}
}

func TestTrackerRejectsMisuse(t *testing.T) {
	scores := func(layers, n int) [][]float32 { return randomScores(rand.New(rand.NewSource(1)), layers, n, 0) }
	cases := []struct {
		name string
		run  func() error
		want string
	}{
		{"zero layers", func() error { _, err := NewTracker(DefaultSpec(), 0); return err }, "nLayers"},
		{"plan twice", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			if _, err := tr.PlanPrefill(10, scores(2, 10)); err != nil {
				return nil
			}
			_, err := tr.PlanPrefill(10, scores(2, 10))
			return err
		}, "twice"},
		{"empty prompt", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			_, err := tr.PlanPrefill(0, nil)
			return err
		}, "prompt"},
		{"elastic without scores", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			_, err := tr.PlanPrefill(10, nil)
			return err
		}, "needs prompt scores"},
		{"h2o without scores", func() error {
			tr, _ := NewTracker(MustSpec(Config{Policy: H2O, Budget: 0.9, Sink: 4}), 2)
			_, err := tr.PlanPrefill(3, nil) // K=n, but decode will need them
			return err
		}, "needs prompt scores"},
		{"wrong layer count", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			_, err := tr.PlanPrefill(10, scores(3, 10))
			return err
		}, "layers"},
		{"wrong row length", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			_, err := tr.PlanPrefill(10, scores(2, 11))
			return err
		}, "entries"},
		{"NaN score", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			s := scores(2, 10)
			s[1][3] = float32(nanF())
			_, err := tr.PlanPrefill(10, s)
			return err
		}, "NaN"},
		{"decode before plan", func() error {
			tr, _ := NewTracker(DefaultSpec(), 2)
			_, err := tr.AfterDecode(11, 11, nil)
			return err
		}, "before PlanPrefill"},
		{"held above T", func() error {
			tr, _ := NewTracker(MustSpec(Config{Policy: Local, Budget: 0.5}), 2)
			tr.PlanPrefill(10, nil)
			_, err := tr.AfterDecode(11, 12, nil)
			return err
		}, "held"},
		{"h2o decode without scores", func() error {
			tr, _ := NewTracker(MustSpec(Config{Policy: H2O, Budget: 0.5}), 2)
			tr.PlanPrefill(10, scores(2, 10))
			_, err := tr.AfterDecode(11, 6, nil)
			return err
		}, "decode scores"},
		{"h2o held out of step", func() error {
			tr, _ := NewTracker(MustSpec(Config{Policy: H2O, Budget: 0.5}), 2)
			tr.PlanPrefill(10, scores(2, 10)) // holds 5
			_, err := tr.AfterDecode(11, 7, scores(2, 7))
			return err
		}, "tracker holds"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.run()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error = %v, want one mentioning %q", err, c.want)
			}
			var ce *ConfigError
			if errors.As(err, &ce) {
				t.Fatalf("misuse reported as a config error: %v", err)
			}
		})
	}
}

// Full ignores its budget, and the zero Spec (no setting chosen) is full.
func TestFullPolicyIgnoresEverything(t *testing.T) {
	for name, spec := range map[string]Spec{
		"full at budget 0.1": MustSpec(Config{Policy: Full, Budget: 0.1}),
		"zero Spec":          {},
	} {
		t.Run(name, func(t *testing.T) {
			tr, err := NewTracker(spec, 2)
			if err != nil {
				t.Fatal(err)
			}
			p, err := tr.PlanPrefill(100, nil)
			if err != nil || p != nil {
				t.Fatalf("PlanPrefill = %v, %v; want no change", p, err)
			}
			for T := 101; T < 300; T++ {
				if idx, err := tr.AfterDecode(T, T, nil); idx != -1 || err != nil {
					t.Fatalf("AfterDecode = %d, %v", idx, err)
				}
			}
			if st := tr.Stats(); st != (Stats{PromptEntries: 100, Kept: 100}) {
				t.Fatalf("Stats = %+v", st)
			}
		})
	}
}

func nanF() float64 {
	zero := 0.0
	return zero / zero
}
