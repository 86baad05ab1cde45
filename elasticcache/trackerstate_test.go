package elasticcache

import (
	"errors"
	"reflect"
	"testing"
)

// A tracker written with MarshalBinary reads back equal, every policy, planned or
// not; damaged state is refused with a TrackerStateError and changes nothing.
func TestTrackerStateRoundTrip(t *testing.T) {
	for _, p := range []Policy{Full, Elastic, H2O, Local} {
		c := DefaultConfig()
		c.Policy, c.Budget = p, 0.5
		if p == Full {
			c.Budget = 1
		}
		tr, err := NewTracker(MustSpec(c), 2)
		if err != nil {
			t.Fatal(err)
		}
		tr.planned, tr.promptN, tr.kept, tr.merged, tr.evicted, tr.sinkHeld, tr.point = true, 40, 20, 15, 5, 4, -3
		if p == H2O {
			tr.acc = []float64{0.5, 1.25, 3}
		}
		b, err := tr.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var got Tracker
		if err := got.UnmarshalBinary(b); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(&got, tr) {
			t.Fatalf("%s: read back %+v, wrote %+v", p, got, *tr)
		}
		for _, broken := range [][]byte{b[:len(b)-1], b[:7], append([]byte{9}, b[1:]...)} {
			keep := got
			var se *TrackerStateError
			if err := got.UnmarshalBinary(broken); !errors.As(err, &se) || !reflect.DeepEqual(got, keep) {
				t.Fatalf("%s: damaged state: %v", p, err)
			}
		}
	}
}
