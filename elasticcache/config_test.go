package elasticcache

import (
	"errors"
	"math"
	"testing"
)

func TestKeepCountTable(t *testing.T) {
	cases := []struct {
		b    float64
		n    int
		want int
	}{
		{0.5, 10, 5},
		{0.7, 10, 7},
		{0.07, 100, 7}, // 0.07*100 = 7.000000000000001 in float64
		{0.29, 100, 29},
		{0.57, 100, 57},
		{0.8, 1500, 1200},
		{0.3, 10, 3},
		{0.9, 10, 9},
		{0.1, 3, 1},
		{0.34, 3, 2},
		{0.5, 1, 1},
		{0.01, 1, 1},
		{0.5, 3, 2},
		{0.25, 7, 2},
		{1, 7, 7},
		{1, 1, 1},
		{0.999, 1000, 999},
		{0.999, 1001, 1000},
		{1e-9, 5, 1},
		{0.5, 0, 0},
		{0.5, -3, 0},
	}
	for _, c := range cases {
		if got := keepCount(c.b, c.n); got != c.want {
			t.Errorf("keepCount(b=%v, n=%d) = %d, want %d", c.b, c.n, got, c.want)
		}
		// Every budget above is valid, so a compressing Spec must agree.
		spec := MustSpec(Config{Policy: Elastic, Budget: c.b})
		if got := spec.KeepCount(c.n); got != c.want {
			t.Errorf("Spec{budget %v}.KeepCount(%d) = %d, want %d", c.b, c.n, got, c.want)
		}
	}
}

// Budgets p/100 against exact integer ceilings: any float rounding that
// leaks into the ceiling shows up here (0.07*100, 0.14*50, ...).
func TestKeepCountMatchesIntegerCeilForPercentBudgets(t *testing.T) {
	for pct := 1; pct <= 100; pct++ {
		b := float64(pct) / 100
		for n := 1; n <= 3000; n++ {
			want := max(1, (pct*n+99)/100)
			if got := keepCount(b, n); got != want {
				t.Fatalf("keepCount(b=%v, n=%d) = %d, want %d", b, n, got, want)
			}
		}
	}
}

func TestKeepCountStaysWithinOneAndN(t *testing.T) {
	for _, b := range []float64{1e-300, 1e-6, 0.001, 0.5, 0.999999, 1, math.Nextafter(1, 0)} {
		for _, n := range []int{1, 2, 3, 17, 1000, 1 << 20} {
			k := keepCount(b, n)
			if k < 1 || k > n {
				t.Errorf("keepCount(b=%v, n=%d) = %d, outside [1, n]", b, n, k)
			}
		}
	}
}

func TestParsePolicy(t *testing.T) {
	ok := map[string]Policy{"full": Full, "elastic": Elastic, "H2O": H2O, " local ": Local, "Elastic": Elastic}
	for in, want := range ok {
		got, err := ParsePolicy(in)
		if err != nil || got != want {
			t.Errorf("ParsePolicy(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "streaming", "elastic2", "reference"} {
		_, err := ParsePolicy(in)
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != "policy" {
			t.Errorf("ParsePolicy(%q) error = %v, want ConfigError for policy", in, err)
		}
	}
}

func TestParseSelection(t *testing.T) {
	ok := map[string]Selection{"": PaperSelection, " ": PaperSelection, "paper": PaperSelection, "Paper": PaperSelection, " REFERENCE ": ReferenceSelection}
	for in, want := range ok {
		got, err := ParseSelection(in)
		if err != nil || got != want {
			t.Errorf("ParseSelection(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"ref", "published", "elastic", "paper reference"} {
		got, err := ParseSelection(in)
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != "selection" || got != "" {
			t.Errorf("ParseSelection(%q) = %q, %v; want a ConfigError for selection", in, got, err)
		}
	}
}

func TestDefaultConfigIsElasticPaper08Sink4DistanceMinus25(t *testing.T) {
	c := DefaultConfig()
	want := Config{Policy: Elastic, Budget: 0.8, Sink: 4, Distance: -25} // the paper's selection, stored empty
	if c != want {
		t.Fatalf("DefaultConfig() = %+v, want %+v", c, want)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("default config invalid: %v", err)
	}
}

func TestValidateErrorsNameTheField(t *testing.T) {
	base := DefaultConfig()
	cases := []struct {
		name  string
		edit  func(*Config)
		field string // "" means valid
	}{
		{"default", func(*Config) {}, ""},
		{"budget one", func(c *Config) { c.Budget = 1 }, ""},
		{"sink zero", func(c *Config) { c.Sink = 0 }, ""},
		{"sink max", func(c *Config) { c.Sink = 1024 }, ""},
		{"distance positive", func(c *Config) { c.Distance = 100000 }, ""},
		{"distance most negative", func(c *Config) { c.Distance = -100000 }, ""},
		{"every policy: full", func(c *Config) { c.Policy = Full }, ""},
		{"every policy: h2o", func(c *Config) { c.Policy = H2O }, ""},
		{"every policy: local", func(c *Config) { c.Policy = Local }, ""},
		{"empty policy", func(c *Config) { c.Policy = "" }, "policy"},
		{"unknown policy", func(c *Config) { c.Policy = "snapkv" }, "policy"},
		{"upper-case policy", func(c *Config) { c.Policy = "ELASTIC" }, "policy"},
		{"budget zero", func(c *Config) { c.Budget = 0 }, "budget"},
		{"budget negative", func(c *Config) { c.Budget = -0.5 }, "budget"},
		{"budget above one", func(c *Config) { c.Budget = 1.0000001 }, "budget"},
		{"budget NaN", func(c *Config) { c.Budget = math.NaN() }, "budget"},
		{"budget +Inf", func(c *Config) { c.Budget = math.Inf(1) }, "budget"},
		{"sink negative", func(c *Config) { c.Sink = -1 }, "sink"},
		{"sink too large", func(c *Config) { c.Sink = 1025 }, "sink"},
		{"distance too small", func(c *Config) { c.Distance = -100001 }, "distance"},
		{"distance too large", func(c *Config) { c.Distance = 100001 }, "distance"},
		{"selection reference", func(c *Config) { c.Selection = ReferenceSelection }, ""},
		{"unknown selection", func(c *Config) { c.Selection = "published" }, "selection"},
		{"upper-case selection", func(c *Config) { c.Selection = "REFERENCE" }, "selection"},
		{"distance before selection", func(c *Config) { c.Distance = 100001; c.Selection = "x" }, "distance"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			tc.edit(&c)
			err := c.Validate()
			spec, specErr := c.Spec()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Validate(%+v) = %v, want nil", c, err)
				}
				if specErr != nil || spec.Config() != c {
					t.Fatalf("Spec(%+v) = %+v, %v; want the same setting, nil", c, spec.Config(), specErr)
				}
				return
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("Validate(%+v) = %v, want *ConfigError", c, err)
			}
			if ce.Field != tc.field {
				t.Fatalf("Validate(%+v) names field %q, want %q", c, ce.Field, tc.field)
			}
			if ce.Error() == "" || ce.Msg == "" {
				t.Fatalf("empty error text")
			}
			// Spec is the one validation point the engine and the Tracker
			// rely on: it must refuse exactly what Validate refuses, the same way.
			var sce *ConfigError
			if !errors.As(specErr, &sce) || *sce != *ce {
				t.Fatalf("Spec(%+v) = %v, want the *ConfigError %v", c, specErr, ce)
			}
			if !spec.IsZero() {
				t.Fatalf("Spec(%+v) returned a non-zero Spec with its error", c)
			}
		})
	}
}
