// Package rouge scores a candidate text against a reference with ROUGE-1,
// ROUGE-2 (clipped n-gram overlap) and ROUGE-L (longest common subsequence),
// each as precision, recall and F1.
//
// Tokenizer (Tokenize): the text is lowercased (Unicode simple case folding
// via unicode.ToLower) and split into maximal runs of letters and digits
// (unicode.IsLetter, unicode.IsDigit); every other rune (spaces, punctuation,
// symbols, control bytes) only separates tokens and is dropped. There is no
// stemming and no stop-word removal. "The red-circle, 2x!" gives
// [the red circle 2x].
//
// Scores:
//   - ROUGE-N: overlap = sum over distinct n-grams g of min(count_ref(g),
//     count_cand(g)); precision = overlap / candidate n-grams, recall =
//     overlap / reference n-grams.
//   - ROUGE-L: lcs = length of the longest common (not necessarily contiguous)
//     token subsequence; precision = lcs / candidate tokens, recall = lcs /
//     reference tokens.
//   - F1 = 2PR / (P + R), and 0 when P + R = 0.
//
// Degenerate case: when the reference or the candidate has no n-gram of the
// order scored (an empty text, or a one-token text for ROUGE-2), the score is
// 1 (P = R = F1 = 1) if the two token sequences are identical and 0 otherwise.
// A text compared with itself therefore always scores 1, which is what an
// evaluation against a reference generation needs. (Some implementations give
// 0 there; this package departs from them on purpose.)
package rouge

import (
	"strings"
	"unicode"
)

// Score is one ROUGE variant's precision, recall and F1, each in [0, 1].
type Score struct {
	Precision float64
	Recall    float64
	F1        float64
}

// Scores holds the three variants for one candidate.
type Scores struct {
	R1, R2, RL Score
}

// Tokenize lowercases s and returns its maximal runs of letters and digits.
func Tokenize(s string) []string {
	return strings.FieldsFunc(strings.ToLower(s), func(r rune) bool {
		return !unicode.IsLetter(r) && !unicode.IsDigit(r)
	})
}

// Compute scores candidate against reference with the package tokenizer.
func Compute(reference, candidate string) Scores {
	ref, cand := Tokenize(reference), Tokenize(candidate)
	return Scores{R1: N(ref, cand, 1), R2: N(ref, cand, 2), RL: L(ref, cand)}
}

// N is ROUGE-N over already tokenized texts (n >= 1).
func N(ref, cand []string, n int) Score {
	nr, nc := len(ref)-n+1, len(cand)-n+1
	if nr <= 0 || nc <= 0 {
		return degenerate(ref, cand)
	}
	counts := make(map[string]int, nr)
	for i := 0; i < nr; i++ {
		counts[gram(ref[i:i+n])]++
	}
	overlap := 0
	for i := 0; i < nc; i++ {
		g := gram(cand[i : i+n])
		if counts[g] > 0 {
			counts[g]--
			overlap++
		}
	}
	return score(float64(overlap)/float64(nc), float64(overlap)/float64(nr))
}

// L is ROUGE-L over already tokenized texts.
func L(ref, cand []string) Score {
	if len(ref) == 0 || len(cand) == 0 {
		return degenerate(ref, cand)
	}
	lcs := LCS(ref, cand)
	return score(float64(lcs)/float64(len(cand)), float64(lcs)/float64(len(ref)))
}

// LCS is the length of the longest common subsequence of a and b
// (dynamic programming in O(len(a)*len(b)) time, O(len(b)) memory).
func LCS(a, b []string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for i := range a {
		for j := range b {
			switch {
			case a[i] == b[j]:
				cur[j+1] = prev[j] + 1
			case prev[j+1] >= cur[j]:
				cur[j+1] = prev[j+1]
			default:
				cur[j+1] = cur[j]
			}
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// gram joins an n-gram into a map key; tokens never contain a space.
func gram(toks []string) string { return strings.Join(toks, " ") }

func score(p, r float64) Score {
	s := Score{Precision: p, Recall: r}
	if p+r > 0 {
		s.F1 = 2 * p * r / (p + r)
	}
	return s
}

func degenerate(ref, cand []string) Score {
	if len(ref) != len(cand) {
		return Score{}
	}
	for i := range ref {
		if ref[i] != cand[i] {
			return Score{}
		}
	}
	return Score{Precision: 1, Recall: 1, F1: 1}
}
