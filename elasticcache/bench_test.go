package elasticcache

import (
	"math/rand"
	"testing"
)

func benchPlanPrefill(b *testing.B, pol Policy) {
	const layers, n = 32, 1500
	scores := randomScores(rand.New(rand.NewSource(1)), layers, n, 0)
	spec := MustSpec(Config{Policy: pol, Budget: 0.5, Sink: 4, Distance: -25})
	b.ReportAllocs()
	for b.Loop() {
		tr, err := NewTracker(spec, layers)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := tr.PlanPrefill(n, scores); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPlanPrefillElastic32x1500(b *testing.B) { benchPlanPrefill(b, Elastic) }
func BenchmarkPlanPrefillH2O32x1500(b *testing.B)     { benchPlanPrefill(b, H2O) }
