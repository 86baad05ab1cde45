package elasticcache

import (
	"strings"
	"testing"
)

func flatScores(layers, n int) [][]float32 {
	s := make([][]float32, layers)
	for l := range s {
		s[l] = make([]float32, n)
		for j := range s[l] {
			s[l][j] = float32((j*7+l)%11) + 0.5
		}
	}
	return s
}

func spec(t *testing.T, p Policy, b float64) Spec {
	t.Helper()
	c := DefaultConfig()
	c.Policy, c.Budget = p, b
	s, err := c.Spec()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A first turn: plan a prompt of n and decode g tokens.
func firstTurn(t *testing.T, sp Spec, layers, n, g int) (*Tracker, int) {
	t.Helper()
	tr, _ := NewTracker(sp, layers)
	if _, err := tr.PlanPrefill(n, flatScores(layers, n)); err != nil {
		t.Fatal(err)
	}
	held := tr.Stats().Kept
	for T := n + 1; T <= n+g; T++ {
		held++
		var sc [][]float32
		if sp.DecodeScores() {
			sc = flatScores(layers, held)
		}
		idx, err := tr.AfterDecode(T, held, sc)
		if err != nil {
			t.Fatal(err)
		}
		if idx >= 0 {
			held--
		}
	}
	return tr, held
}

func TestContinueKeepsEachTurnWithinItsBudget(t *testing.T) {
	const layers, n1, g1, n2, g2 = 3, 40, 10, 24, 12
	for _, p := range []Policy{Elastic, H2O, Local} {
		t.Run(string(p), func(t *testing.T) {
			sp := spec(t, p, 0.5)
			prev, held := firstTurn(t, sp, layers, n1, g1)
			next, _ := NewTracker(sp, layers)
			var heldScores [][]float32
			if p == H2O {
				heldScores = flatScores(layers, held)
			}
			plan, err := next.Continue(prev, held, n2, flatScores(layers, n2), heldScores, 0)
			if err != nil {
				t.Fatal(err)
			}
			if plan == nil || plan.K != sp.KeepCount(n2) || plan.N != n2 {
				t.Fatalf("turn plan %+v, want %d of %d kept", plan, sp.KeepCount(n2), n2)
			}
			for l, lp := range plan.Layers {
				if lp.Keep[len(lp.Keep)-1] != n2-1 {
					t.Fatalf("layer %d: the turn's last entry is not kept: %v", l, lp.Keep)
				}
			}
			cells := held + plan.K
			if got := next.Stats().Kept; got != cells {
				t.Fatalf("kept %d, want %d", got, cells)
			}
			// Decoding goes on within ceil(b*T) of the whole conversation.
			T := n1 + g1 + n2
			for range g2 {
				T++
				cells++
				var sc [][]float32
				if p == H2O {
					sc = flatScores(layers, cells)
				}
				idx, err := next.AfterDecode(T, cells, sc)
				if err != nil {
					t.Fatal(err)
				}
				if idx >= 0 {
					if idx < prev.Stats().Kept && idx < min(sp.Sink(), cells-2) {
						t.Fatalf("evicted sink entry %d", idx)
					}
					cells--
				}
				if bound := max(sp.KeepCount(T), held+plan.K+1); cells > bound {
					t.Fatalf("T=%d: %d cells over the bound %d", T, cells, bound)
				}
			}
		})
	}
}

func TestContinueRefuses(t *testing.T) {
	sp := spec(t, Elastic, 0.5)
	prev, held := firstTurn(t, sp, 2, 20, 4)
	other, _ := NewTracker(spec(t, Elastic, 0.3), 2)
	if _, err := other.Continue(prev, held, 8, flatScores(2, 8), nil, 0); err == nil || !strings.Contains(err.Error(), "setting") {
		t.Fatalf("another budget: %v", err)
	}
	fresh, _ := NewTracker(sp, 2)
	unplanned, _ := NewTracker(sp, 2)
	if _, err := fresh.Continue(unplanned, held, 8, flatScores(2, 8), nil, 0); err == nil {
		t.Fatal("continued an unplanned conversation")
	}
	h2o := spec(t, H2O, 0.5)
	hp, hheld := firstTurn(t, h2o, 2, 20, 4)
	hn, _ := NewTracker(h2o, 2)
	if _, err := hn.Continue(hp, hheld+1, 8, flatScores(2, 8), flatScores(2, hheld+1), 0); err == nil {
		t.Fatal("h2o continued with a held count its scores do not match")
	}
}
