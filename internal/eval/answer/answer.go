// Package answer decides whether a generated text answers a short question
// correctly (colors, counts, positions, yes/no), for the accuracy column of
// elastic-eval.
//
// The rule, applied to a generated text g and a reference answer a:
//  1. Both are normalized (Normalize): the ROUGE tokenizer (lowercase, maximal
//     runs of letters and digits, everything else dropped), then the numbers 0
//     to 20 written with digits become words ("3" -> "three"), and the
//     articles "a", "an" and "the" are removed.
//  2. A reference that normalizes to nothing never matches.
//  3. A yes/no reference (exactly "yes" or "no" after normalization) matches
//     when the first "yes" or "no" token of g equals it, so "No, there is no
//     blue square" is right for "no" and "yes ... no" counts as "yes".
//  4. Any other reference matches when its tokens occur in g as one contiguous
//     run: equality is the special case where g says nothing else, and "The
//     circle is at the top left." contains "top left".
package answer

import (
	"strconv"

	"github.com/elasticserve/elasticserve/internal/eval/rouge"
)

var numberWords = []string{"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
	"eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"}

// Normalize returns the tokens compared by Correct.
func Normalize(s string) []string {
	toks := rouge.Tokenize(s)
	out := toks[:0]
	for _, t := range toks {
		switch t {
		case "a", "an", "the":
			continue
		}
		if n, err := strconv.Atoi(t); err == nil && n >= 0 && n < len(numberWords) {
			t = numberWords[n]
		}
		out = append(out, t)
	}
	return out
}

// Correct reports whether generated answers reference under the package rule.
func Correct(generated, reference string) bool {
	ref := Normalize(reference)
	if len(ref) == 0 {
		return false
	}
	gen := Normalize(generated)
	if len(ref) == 1 && (ref[0] == "yes" || ref[0] == "no") {
		for _, t := range gen {
			if t == "yes" || t == "no" {
				return t == ref[0]
			}
		}
		return false
	}
	for i := 0; i+len(ref) <= len(gen); i++ {
		match := true
		for j := range ref {
			if gen[i+j] != ref[j] {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}

// Short reports whether reference is short enough (1 to 3 normalized tokens)
// to be scored by Correct when a dataset does not say which questions have
// exact answers.
func Short(reference string) bool {
	n := len(Normalize(reference))
	return n >= 1 && n <= 3
}
