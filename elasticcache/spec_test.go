package elasticcache

import (
	"errors"
	"fmt"
	"testing"
)

// Scores (and the unbatched decode they force) cost flash attention and
// batching, so a Spec asks for them only when its policy reads them AND it
// can compress: at budget 1 no policy needs anything.
func TestSpecNeedsScoresOnlyWhenItCompresses(t *testing.T) {
	cases := []struct {
		p                           Policy
		b                           float64
		compresses, prefill, decode bool
	}{
		{Full, 0.5, false, false, false},
		{Elastic, 0.5, true, true, false},
		{H2O, 0.5, true, true, true},
		{Local, 0.5, true, false, false},
		{Full, 1, false, false, false},
		{Elastic, 1, false, false, false},
		{H2O, 1, false, false, false},
		{Local, 1, false, false, false},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s/%v", c.p, c.b), func(t *testing.T) {
			s := MustSpec(Config{Policy: c.p, Budget: c.b, Sink: 4, Distance: -25})
			got := [3]bool{s.Compresses(), s.PrefillScores(), s.DecodeScores()}
			want := [3]bool{c.compresses, c.prefill, c.decode}
			if got != want {
				t.Fatalf("Compresses, PrefillScores, DecodeScores = %v, want %v", got, want)
			}
		})
	}
}

func TestSpecBudgetIsOneForFull(t *testing.T) {
	if b := MustSpec(Config{Policy: Full, Budget: 0.3}).Budget(); b != 1 {
		t.Errorf("full at budget 0.3: Budget() = %v, want 1", b)
	}
	if b := MustSpec(Config{Policy: Local, Budget: 0.3}).Budget(); b != 0.3 {
		t.Errorf("local at budget 0.3: Budget() = %v, want 0.3", b)
	}
	if k := MustSpec(Config{Policy: Full, Budget: 0.3}).KeepCount(10); k != 10 {
		t.Errorf("full at budget 0.3: KeepCount(10) = %d, want 10", k)
	}
}

// The zero Spec is what a request that chose nothing carries: it must act as
// full, not as a policy with budget 0.
func TestZeroSpecIsFullAtBudgetOne(t *testing.T) {
	var s Spec
	if !s.IsZero() {
		t.Fatal("Spec{}.IsZero() = false")
	}
	if s.Policy() != Full || s.Budget() != 1 {
		t.Fatalf("Spec{}: Policy %q Budget %v, want full 1", s.Policy(), s.Budget())
	}
	if c := s.Config(); c != (Config{Policy: Full, Budget: 1}) || c.Validate() != nil {
		t.Fatalf("Spec{}.Config() = %+v (%v), want a valid full setting", c, c.Validate())
	}
	if s.Compresses() || s.PrefillScores() || s.DecodeScores() {
		t.Fatal("Spec{} compresses or needs scores")
	}
	if k := s.KeepCount(37); k != 37 {
		t.Fatalf("Spec{}.KeepCount(37) = %d, want 37", k)
	}
	if m := s.MaxCells(100, 50); m != 150 {
		t.Fatalf("Spec{}.MaxCells(100, 50) = %d, want 150", m)
	}
}

func TestDefaultSpecIsTheValidatedDefaultConfig(t *testing.T) {
	s := DefaultSpec()
	if s.IsZero() || s != MustSpec(DefaultConfig()) || s.Config() != DefaultConfig() {
		t.Fatalf("DefaultSpec() = %+v, want DefaultConfig as a Spec", s.Config())
	}
	if s.Sink() != DefaultSink || s.Distance() != DefaultDistance || s.Budget() != DefaultBudget {
		t.Fatalf("DefaultSpec(): sink %d distance %d budget %v", s.Sink(), s.Distance(), s.Budget())
	}
}

func TestMustSpecPanicsWithTheConfigError(t *testing.T) {
	defer func() {
		err, _ := recover().(error)
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != "budget" {
			t.Fatalf("MustSpec panicked with %v, want a *ConfigError for budget", err)
		}
	}()
	MustSpec(Config{Policy: Elastic, Budget: 0})
}

func TestMaxCells(t *testing.T) {
	cases := []struct {
		p       Policy
		b       float64
		n, g    int
		want    int
		comment string
	}{
		{Full, 0.5, 100, 50, 150, "full keeps everything"},
		{Elastic, 1, 100, 50, 150, "budget 1 keeps everything"},
		{Elastic, 0.5, 100, 50, 100, "the prompt while it is encoded"},
		{Elastic, 0.5, 100, 300, 201, "ceil(0.5*400)+1"},
		{H2O, 0.3, 10, 1000, 304, "ceil(0.3*1010)+1"},
		{Local, 0.25, 10, 0, 10, "no generation"},
		{Local, 0.07, 100, 0, 100, "ceil(7.000000000000001) is 7"},
	}
	for _, c := range cases {
		s := MustSpec(Config{Policy: c.p, Budget: c.b, Sink: 4})
		if got := s.MaxCells(c.n, c.g); got != c.want {
			t.Errorf("%s b=%v MaxCells(%d, %d) = %d, want %d (%s)", c.p, c.b, c.n, c.g, got, c.want, c.comment)
		}
	}
	for _, b := range []float64{0.05, 0.3, 0.5, 0.99, 1} {
		s := MustSpec(Config{Policy: Elastic, Budget: b})
		for _, n := range []int{1, 2, 17, 577} {
			for _, g := range []int{0, 1, 9, 1000} {
				want := n + g
				if b < 1 {
					want = max(n, keepCount(b, n+g)+1)
				}
				if got := s.MaxCells(n, g); got != want {
					t.Fatalf("b=%v MaxCells(%d, %d) = %d, want %d", b, n, g, got, want)
				}
			}
		}
	}
}

// MaxCells sizes a sequence's cell reservation, so it must bound what the
// Tracker actually lets a sequence hold: the prompt before phase 1, and each
// step's count right after the new token is appended, before any eviction.
func TestMaxCellsBoundsCellsHeldAtAnyTime(t *testing.T) {
	const g = 300
	for _, pol := range []Policy{Full, Elastic, H2O, Local} {
		for _, b := range []float64{0.05, 0.3, 0.8, 1} {
			for _, n := range []int{1, 3, 40, 500} {
				spec := MustSpec(Config{Policy: pol, Budget: b, Sink: 4, Distance: -25})
				s := newSim(t, spec, n, 2, int64(n))
				peak := n
				for range g {
					held := len(s.pos) + 1 // after the append, before the step's eviction
					s.step()
					peak = max(peak, held)
				}
				limit := spec.MaxCells(n, g)
				if peak > limit {
					t.Fatalf("%s b=%v n=%d: held %d cells, MaxCells = %d", pol, b, n, peak, limit)
				}
				if !spec.Compresses() && peak != limit {
					t.Fatalf("%s b=%v n=%d: held %d cells without compression, want MaxCells = %d", pol, b, n, peak, limit)
				}
			}
		}
	}
}
