package elasticcache

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// Policy names a cache compression policy.
type Policy string

// The supported policies.
const (
	Full    Policy = "full"
	Elastic Policy = "elastic"
	H2O     Policy = "h2o"
	Local   Policy = "local"
)

// Policies is every policy, in the order they are reported (the models list,
// the per-policy metrics, the engine's per-policy counters); the one list the
// server keeps. An array, so that a table indexed by policy has a constant
// length; do not assign to it.
var Policies = [...]Policy{Full, Elastic, H2O, Local}

// PolicyList is Policies as prose ("full, elastic, h2o or local"), for help
// texts and error messages.
func PolicyList() string {
	names := make([]string, len(Policies))
	for i, p := range Policies {
		names[i] = string(p)
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// Defaults and limits of Config.
const (
	DefaultBudget   = 0.8
	DefaultSink     = 4
	DefaultDistance = -25
	MaxSink         = 1024
	MaxDistance     = 100000
)

// ceilSlack is the relative tolerance used by keepCount: a product within
// ceilSlack*max(1,x) above an integer counts as that integer.
const ceilSlack = 1e-9

// ParsePolicy turns a user supplied name (case and surrounding blanks are
// ignored) into a Policy. Unknown names give a *ConfigError for "policy".
func ParsePolicy(s string) (Policy, error) {
	p := Policy(strings.ToLower(strings.TrimSpace(s)))
	if p.valid() {
		return p, nil
	}
	return "", unknownPolicy(s)
}

func (p Policy) valid() bool { return slices.Contains(Policies[:], p) }

func unknownPolicy(name string) *ConfigError {
	return &ConfigError{Field: "policy", Msg: fmt.Sprintf("unknown policy %q (want %s)", name, PolicyList())}
}

// Selection names the rule set that elastic and h2o use to choose entries.
type Selection string

// The supported selections. The empty Selection means PaperSelection.
const (
	// PaperSelection is the method as the paper states it (the default).
	PaperSelection Selection = "paper"
	// ReferenceSelection reproduces the authors' published kv_cache.py,
	// including its departures from the paper, for parity experiments; see
	// the package documentation for its rules.
	ReferenceSelection Selection = "reference"
	// NormalizedSelection is the paper's elastic rule with each prompt entry's
	// score divided by the number of prompt queries that can attend it (N-j for
	// entry j under a causal mask), so that an entry near the end of the prompt
	// is not ranked low only because few queries follow it. A variant beyond the
	// paper; h2o and local are as under PaperSelection.
	NormalizedSelection Selection = "normalized"
	// TextTailSelection is the paper's elastic rule with the text after the
	// prompt's last image (the question when it follows the image, and the chat
	// template's assistant prefix) kept whole, like the last entry: an entry
	// there has few queries after it, so its accumulated score is low although
	// the answer reads it first. The tail counts against the budget; a tail
	// that leaves no room falls back to the paper's rule. h2o and local are as
	// under PaperSelection.
	TextTailSelection Selection = "text-tail"
)

// ParseSelection turns a user supplied name (case and surrounding blanks are
// ignored) into a Selection; an empty or blank name is PaperSelection.
// Unknown names give a *ConfigError for "selection".
func ParseSelection(s string) (Selection, error) {
	switch v := Selection(strings.ToLower(strings.TrimSpace(s))); v {
	case "", PaperSelection:
		return PaperSelection, nil
	case ReferenceSelection, NormalizedSelection, TextTailSelection:
		return v, nil
	}
	return "", &ConfigError{Field: "selection", Msg: fmt.Sprintf("unknown selection %q (want paper, reference, normalized or text-tail)", s)}
}

func (s Selection) valid() bool {
	switch s {
	case "", PaperSelection, ReferenceSelection, NormalizedSelection, TextTailSelection:
		return true
	}
	return false
}

// Config is the cache setting of one request.
type Config struct {
	Policy   Policy  `json:"policy"`
	Budget   float64 `json:"budget"`   // fraction of entries kept, in (0,1]
	Sink     int     `json:"sink"`     // leading entries never evicted or merged
	Distance int     `json:"distance"` // elastic decode truncation offset
	// Selection is "paper" (or empty), "reference", "normalized" or "text-tail".
	Selection Selection `json:"selection,omitempty"`
	// EvictMerged is an evaluation-only ablation (not offered by the server):
	// elastic keeps the same anchors but evicts the entries it would merge, to
	// measure what merging buys over eviction at the same selection.
	EvictMerged bool `json:"-"`
}

// DefaultConfig is the server's default: elastic with the paper's selection
// (the empty Selection, as a Spec stores it), budget 0.8, sink 4 and distance
// -25, chosen on the bundled demo model by the rule of issue [V] in
// docs/quality ("Choosing the default"): in both prompt layouts, short answers
// within 1 point of full's and descriptions at ROUGE-L >= 0.95 of full's; the
// lowest such budget, then the simplest selection. Lower budgets cost long
// answers first; measure a model with elastic-eval before going lower.
func DefaultConfig() Config {
	return Config{Policy: Elastic, Budget: DefaultBudget, Sink: DefaultSink, Distance: DefaultDistance}
}

// ConfigError reports one invalid Config field.
type ConfigError struct {
	Field string // "policy", "budget", "sink", "distance" or "selection"
	Msg   string
}

func (e *ConfigError) Error() string {
	return "elasticcache: invalid " + e.Field + ": " + e.Msg
}

// Validate checks every field and returns a *ConfigError for the first bad one
// (in the order policy, budget, sink, distance, selection), or nil.
func (c Config) Validate() error {
	if !c.Policy.valid() {
		return unknownPolicy(string(c.Policy))
	}
	if math.IsNaN(c.Budget) || c.Budget <= 0 || c.Budget > 1 {
		return &ConfigError{Field: "budget", Msg: fmt.Sprintf("%v is not in (0, 1]", c.Budget)}
	}
	if c.Sink < 0 || c.Sink > MaxSink {
		return &ConfigError{Field: "sink", Msg: fmt.Sprintf("%d is not in [0, %d]", c.Sink, MaxSink)}
	}
	if c.Distance < -MaxDistance || c.Distance > MaxDistance {
		return &ConfigError{Field: "distance", Msg: fmt.Sprintf("%d is not in [%d, %d]", c.Distance, -MaxDistance, MaxDistance)}
	}
	if !c.Selection.valid() {
		return &ConfigError{Field: "selection", Msg: fmt.Sprintf("unknown selection %q (want paper, reference, normalized or text-tail)", string(c.Selection))}
	}
	return nil
}

// keepCount is ceil(b*n), at least 1 and at most n (0 when n <= 0).
// Products within a relative 1e-9 above an integer are taken as that integer.
func keepCount(b float64, n int) int {
	switch {
	case n <= 0:
		return 0
	case !(b > 0): // also NaN
		return 1
	case b >= 1:
		return n
	}
	x := b * float64(n)
	k := math.Ceil(x - ceilSlack*math.Max(1, x))
	if k < 1 {
		return 1
	}
	if k >= float64(n) {
		return n
	}
	return int(k)
}
