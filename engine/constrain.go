package engine

import (
	"errors"
	"strings"

	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// textOrJSON is the grammar of a Constraint with OrText: the converted schema (rule
// "root") or plain text that does not begin, after blanks, with "{". The converter
// names its start rule "root", so the union starts at a rule of its own.
const textOrJSON = `
es-top ::= root | es-text
es-text ::= es-head [^\x00]*
es-head ::= [^{ \t\r\n] | [ \t\r\n]+ [^{ \t\r\n]
`

// constrainedSampler turns req's Constraint into a grammar and builds the sampler
// chain around it. It runs on the submitting goroutine: the schema converter and
// the grammar parser read only the model's vocabulary.
func constrainedSampler(m *llama.Model, req *completion.Request) (*llama.Sampler, error) {
	gbnf, err := llama.SchemaToGrammar(req.Constraint.Schema)
	if err != nil {
		return nil, &completion.ConstraintError{Reason: "llama.cpp's JSON-schema converter refused the schema (check patterns, $ref targets and keyword types)"}
	}
	root := "root"
	if req.Constraint.OrText {
		gbnf += textOrJSON
		root = "es-top"
	}
	smp, err := llama.NewConstrainedSampler(m, llama.SamplerParams(req.Sampling), gbnf, root)
	if errors.Is(err, llama.ErrGrammar) {
		return nil, &completion.ConstraintError{Reason: "the grammar made from the schema does not parse"}
	}
	return smp, err
}

// tokenLogprob is tok's log-probability under logits (a softmax over the whole
// vocabulary) and the top most likely tokens, best first.
func tokenLogprob(m *llama.Model, logits []float32, tok llama.Token, top int) *completion.TokenLogprob {
	if len(logits) == 0 || int(tok) < 0 || int(tok) >= len(logits) {
		return nil
	}
	lse := logSumExp(logits)
	piece := func(t llama.Token) (string, []byte) {
		b := m.TokenPiece(t, false)
		return strings.ToValidUTF8(string(b), "\uFFFD"), b
	}
	out := &completion.TokenLogprob{Logprob: float64(logits[tok]) - lse}
	out.Token, out.Bytes = piece(tok)
	for _, t := range topTokens(logits, top) {
		alt := completion.TopLogprob{Logprob: float64(logits[t]) - lse}
		alt.Token, alt.Bytes = piece(t)
		out.Top = append(out.Top, alt)
	}
	return out
}

// topTokens returns the k tokens with the largest logits, largest first (ties:
// lower id first). k is small (at most completion.MaxTopLogprobs), so an insertion
// into a sorted list of k beats sorting the vocabulary.
func topTokens(logits []float32, k int) []llama.Token {
	k = min(k, len(logits))
	if k <= 0 {
		return nil
	}
	best := make([]llama.Token, 0, k)
	for i, v := range logits {
		if len(best) == k && v <= logits[best[k-1]] {
			continue
		}
		j := len(best)
		if j < k {
			best = append(best, 0)
		} else {
			j = k - 1
		}
		for j > 0 && logits[best[j-1]] < v {
			best[j] = best[j-1]
			j--
		}
		best[j] = llama.Token(i)
	}
	return best
}
