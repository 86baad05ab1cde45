package elasticcache

import (
	"errors"
	"testing"
)

func TestSpecWith(t *testing.T) {
	str := func(s string) *string { return &s }
	f := func(v float64) *float64 { return &v }
	n := func(v int) *int { return &v }
	base := DefaultSpec()
	tests := []struct {
		name     string
		base     Spec
		o        Overrides
		want     Config // when errField is empty
		errField string
		errMsg   string
	}{
		{"nothing set keeps the base", base, Overrides{}, base.Config(), "", ""},
		{"every field", base, Overrides{Policy: str(" H2O "), Budget: f(0.5), Sink: n(2), Distance: n(7), Selection: str("Reference")},
			Config{Policy: H2O, Budget: 0.5, Sink: 2, Distance: 7, Selection: ReferenceSelection}, "", ""},
		{"paper selection is stored empty", MustSpec(Config{Policy: Elastic, Budget: 0.5, Selection: ReferenceSelection}), Overrides{Selection: str("paper")},
			Config{Policy: Elastic, Budget: 0.5}, "", ""},
		{"zero base reads as full at budget 1", Spec{}, Overrides{Sink: n(3)}, Config{Policy: Full, Budget: 1, Sink: 3}, "", ""},
		{"unknown policy", base, Overrides{Policy: str("LRU")}, Config{}, "policy", `unknown policy "LRU" (want full, elastic, h2o or local)`},
		{"policy refused before selection", base, Overrides{Policy: str("lru"), Selection: str("x")}, Config{}, "policy", ""},
		{"selection refused before budget", base, Overrides{Budget: f(2), Selection: str("x")}, Config{}, "selection", ""},
		{"budget", base, Overrides{Budget: f(0)}, Config{}, "budget", "0 is not in (0, 1]"},
		{"sink", base, Overrides{Sink: n(-1)}, Config{}, "sink", ""},
		{"distance", base, Overrides{Distance: n(1 << 30)}, Config{}, "distance", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.base.With(tt.o)
			if tt.errField == "" {
				if err != nil || got.Config() != tt.want {
					t.Fatalf("With = %+v, %v; want %+v", got.Config(), err, tt.want)
				}
				return
			}
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.Field != tt.errField || !got.IsZero() {
				t.Fatalf("With = %+v, %v; want a ConfigError for %s", got, err, tt.errField)
			}
			if tt.errMsg != "" && ce.Msg != tt.errMsg {
				t.Fatalf("message %q, want %q", ce.Msg, tt.errMsg)
			}
		})
	}
}

// Policies is the one list: every entry parses to itself, PolicyList names each
// in order, and nothing outside it is a policy.
func TestPoliciesIsTheOneList(t *testing.T) {
	if got, want := PolicyList(), "full, elastic, h2o or local"; got != want {
		t.Fatalf("PolicyList() = %q, want %q", got, want)
	}
	for _, p := range Policies {
		if got, err := ParsePolicy(string(p)); err != nil || got != p {
			t.Errorf("ParsePolicy(%q) = %q, %v", p, got, err)
		}
		if err := (Config{Policy: p, Budget: 1}).Validate(); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	if err := (Config{Policy: "lru", Budget: 1}).Validate(); err == nil {
		t.Error("Validate accepts a policy outside Policies")
	}
}
