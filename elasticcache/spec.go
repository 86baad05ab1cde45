package elasticcache

// Spec is a validated cache setting: the only form the engine and the Tracker
// accept, so neither checks a setting again. Make one with Config.Spec (user
// input: config file, flags, a request's elastic_cache) or MustSpec (settings
// fixed in code). The zero Spec is full: it never changes the cache.
//
// A Spec also answers what its policy needs from the engine, so that no caller
// re-derives rules such as "a budget of 1 never compresses".
type Spec struct{ c Config }

// Spec validates c (see Validate) and returns it as a Spec. The paper
// selection is stored as the empty Selection, so a Spec that names it equals
// one that does not (and equals the Specs made before selections existed).
func (c Config) Spec() (Spec, error) {
	if err := c.Validate(); err != nil {
		return Spec{}, err
	}
	if c.Selection == PaperSelection {
		c.Selection = ""
	}
	return Spec{c: c}, nil
}

// MustSpec is Config.Spec for settings written in code; it panics on an invalid c.
func MustSpec(c Config) Spec {
	s, err := c.Spec()
	if err != nil {
		panic(err)
	}
	return s
}

// DefaultSpec is DefaultConfig as a Spec.
func DefaultSpec() Spec { return Spec{c: DefaultConfig()} }

// IsZero reports whether s is the zero Spec (no setting chosen).
func (s Spec) IsZero() bool { return s.c == Config{} }

// Config returns the setting as given (for overriding fields and validating
// again), except that the paper selection reads as the empty Selection.
func (s Spec) Config() Config {
	if s.IsZero() {
		return Config{Policy: Full, Budget: 1}
	}
	return s.c
}

// Policy is the setting's policy (Full for the zero Spec).
func (s Spec) Policy() Policy { return s.Config().Policy }

// Budget is the fraction of entries kept in effect: 1 for full, whatever was configured.
func (s Spec) Budget() float64 {
	if s.Policy() == Full {
		return 1
	}
	return s.c.Budget
}

// Sink is the number of leading entries never evicted or merged.
func (s Spec) Sink() int { return s.c.Sink }

// Distance is the elastic decode truncation offset.
func (s Spec) Distance() int { return s.c.Distance }

// Selection is the rule set elastic and h2o choose entries by: the one the
// setting names, PaperSelection when it names none (also for the zero Spec).
func (s Spec) Selection() Selection {
	if s.c.Selection == "" {
		return PaperSelection
	}
	return s.c.Selection
}

// reference reports whether the reference rules apply.
func (s Spec) reference() bool { return s.c.Selection == ReferenceSelection }

// CompactPositions reports whether the engine must give the sequence the
// positions the published code's evaluation gives it (ReferenceSelection
// with a budget below 1, any policy). There, LLaVA's forward pass gets no
// position ids, so a token's position is the number of entries the cache
// held before it, not T:
//
//   - when phase 1 rewrites the prompt (a non-nil PrefillPlan), cell i of
//     the result (Keep[i] of every layer) is written back with position i,
//     not Keep[i], and the stored rows are left as they are (their RoPE
//     rotation is not redone);
//   - every later token is placed at position = entries held just before
//     it. After a decode eviction that position is one already used by a
//     held cell (positions repeat). llama.cpp requires a new position to
//     follow the sequence's last one, and shifting the held cells' positions
//     (llama_memory_seq_add) re-rotates their keys on RoPE models, so the
//     engine reproduces only the relabelling at phase 1: later tokens follow
//     at K, K+1, ... and positions do not repeat after decode evictions, a
//     difference from the published code that the README states.
//
// It is false for PaperSelection: positions stay the original token indices.
func (s Spec) CompactPositions() bool { return s.reference() && s.Compresses() }

// KeepCount is ceil(Budget*n), at least 1 and at most n (0 when n <= 0).
func (s Spec) KeepCount(n int) int { return keepCount(s.Budget(), n) }

// Compresses reports whether the policy may ever change the cache: not full,
// and a budget below 1 (ceil(1*T) = T never evicts).
func (s Spec) Compresses() bool { return s.Budget() < 1 }

// PrefillScores reports whether the attention that every prompt entry receives
// must be captured while the prompt is encoded (elastic and h2o below budget 1).
// Capture needs flash attention off and one sequence per decode call.
func (s Spec) PrefillScores() bool {
	return s.Compresses() && (s.c.Policy == Elastic || s.c.Policy == H2O)
}

// DecodeScores reports whether every generated token's attention must be
// captured too (h2o below budget 1).
func (s Spec) DecodeScores() bool { return s.Compresses() && s.c.Policy == H2O }

// MaxCells is the most cells a sequence with an n-token prompt that generates
// g tokens holds at any time: n+g when nothing is compressed, otherwise the
// whole prompt while it is encoded and ceil(b*(n+g))+1 afterwards (the bound
// is checked after each new token is appended).
func (s Spec) MaxCells(n, g int) int {
	return max(n, s.MaxCellsAfterPrompt(n, g))
}

// MaxCellsAfterPrompt is the most cells the sequence of MaxCells holds once its
// prompt plan is applied: n+g when nothing is compressed, else ceil(b*(n+g))+1.
// It is what a sequence whose prompt is encoded elsewhere (a prefill context)
// holds where it decodes.
func (s Spec) MaxCellsAfterPrompt(n, g int) int {
	if !s.Compresses() {
		return n + g
	}
	return s.KeepCount(n+g) + 1
}
