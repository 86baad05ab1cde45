package rouge

import (
	"math"
	"reflect"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-12 }

func checkScore(t *testing.T, name string, got Score, p, r, f float64) {
	t.Helper()
	if !near(got.Precision, p) || !near(got.Recall, r) || !near(got.F1, f) {
		t.Errorf("%s: got P=%.6f R=%.6f F=%.6f, want P=%.6f R=%.6f F=%.6f", name, got.Precision, got.Recall, got.F1, p, r, f)
	}
}

func TestTokenize(t *testing.T) {
	got := Tokenize("The Red-Circle, 2x!  ÉTÉ\n\tend.")
	want := []string{"the", "red", "circle", "2x", "été", "end"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	if got := Tokenize(" ,.;\x00 "); len(got) != 0 {
		t.Fatalf("punctuation only gave %q", got)
	}
}

// The hand-computed cases below are worked out in the comments.
func TestHandComputed(t *testing.T) {
	// ref  = the cat sat on the mat      (6 tokens, 5 bigrams)
	// cand = the cat was on the mat      (6 tokens, 5 bigrams)
	// unigrams: the x2, cat, on, mat match; "was" does not -> 5/6 both ways.
	// bigrams: "the cat", "on the", "the mat" match -> 3/5 both ways.
	// LCS: the cat on the mat = 5 -> 5/6 both ways.
	s := Compute("The cat sat on the mat.", "the cat was on the mat")
	checkScore(t, "substitution R1", s.R1, 5.0/6, 5.0/6, 5.0/6)
	checkScore(t, "substitution R2", s.R2, 3.0/5, 3.0/5, 3.0/5)
	checkScore(t, "substitution RL", s.RL, 5.0/6, 5.0/6, 5.0/6)

	// ref  = red circle at the top left        (6 tokens, 5 bigrams)
	// cand = a red square at top left corner   (7 tokens, 6 bigrams)
	// unigrams in common: red, at, top, left = 4 -> P 4/7, R 4/6, F 8/13.
	// bigrams in common: "top left" = 1 -> P 1/6, R 1/5, F 2/11.
	// LCS: red at top left = 4 -> same as ROUGE-1 here.
	s = Compute("red circle at the top left", "a red square at top left corner")
	checkScore(t, "lengths R1", s.R1, 4.0/7, 4.0/6, 8.0/13)
	checkScore(t, "lengths R2", s.R2, 1.0/6, 1.0/5, 2.0/11)
	checkScore(t, "lengths RL", s.RL, 4.0/7, 4.0/6, 8.0/13)

	// Reordering: every unigram matches, but the order does not.
	// ref  = the cat sat on the mat
	// cand = on the mat the cat sat
	// bigrams of cand: on the, the mat, mat the, the cat, cat sat; 4 are in ref -> 4/5.
	// LCS: "the cat sat" or "on the mat" = 3 -> 3/6.
	s = Compute("the cat sat on the mat", "on the mat the cat sat")
	checkScore(t, "reorder R1", s.R1, 1, 1, 1)
	checkScore(t, "reorder R2", s.R2, 0.8, 0.8, 0.8)
	checkScore(t, "reorder RL", s.RL, 0.5, 0.5, 0.5)

	// Clipping: "the" is counted at most as often as it occurs in the reference.
	// ref = the cat (2), cand = the the the the (4): overlap 1 -> P 1/4, R 1/2, F 1/3.
	// bigrams: "the the" x3 vs "the cat" -> 0. LCS = 1 -> same as ROUGE-1.
	s = Compute("the cat", "the the the the")
	checkScore(t, "clip R1", s.R1, 0.25, 0.5, 1.0/3)
	checkScore(t, "clip R2", s.R2, 0, 0, 0)
	checkScore(t, "clip RL", s.RL, 0.25, 0.5, 1.0/3)

	// Disjoint texts score 0.
	s = Compute("blue square", "red circle")
	checkScore(t, "disjoint R1", s.R1, 0, 0, 0)
	checkScore(t, "disjoint RL", s.RL, 0, 0, 0)
}

func TestDegenerateCases(t *testing.T) {
	s := Compute("", "")
	checkScore(t, "empty/empty R1", s.R1, 1, 1, 1)
	checkScore(t, "empty/empty RL", s.RL, 1, 1, 1)
	s = Compute("", "word")
	checkScore(t, "empty ref", s.R1, 0, 0, 0)
	s = Compute("word", "...")
	checkScore(t, "empty cand", s.RL, 0, 0, 0)
	// One token each: no bigrams, so ROUGE-2 is 1 for identical texts, 0 otherwise.
	checkScore(t, "yes/yes R2", Compute("Yes.", "yes").R2, 1, 1, 1)
	checkScore(t, "yes/no R2", Compute("yes", "no").R2, 0, 0, 0)
	// Two tokens vs one: the candidate has no bigram and differs.
	checkScore(t, "short cand R2", Compute("red circle", "red").R2, 0, 0, 0)
}

func TestSelfScoreIsOne(t *testing.T) {
	for _, txt := range []string{"a", "the the the", "A large red circle is at the top left. A small blue square is in the center.", "x y x y x"} {
		s := Compute(txt, txt)
		for name, sc := range map[string]Score{"R1": s.R1, "R2": s.R2, "RL": s.RL} {
			checkScore(t, txt+" "+name, sc, 1, 1, 1)
		}
	}
}

func TestLCS(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"a b c d", "a c d", 3},
		{"a b c b d a b", "b d c a b a", 4}, // textbook example: BCBA
		{"", "a b", 0},
		{"a", "b", 0},
	} {
		if got := LCS(Tokenize(c.a), Tokenize(c.b)); got != c.want {
			t.Errorf("LCS(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := LCS(Tokenize(c.b), Tokenize(c.a)); got != c.want {
			t.Errorf("LCS is not symmetric for %q, %q", c.a, c.b)
		}
	}
}
