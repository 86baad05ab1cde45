package engine

import (
	"math"

	"github.com/elasticserve/elasticserve/llama"
)

// logSumExp is log(sum(exp(logits))), computed stably (the largest logit
// taken out first): the normalizer of a softmax over the vocabulary, which
// the forced tokens' NLL and the reported logprobs both divide by.
func logSumExp(logits []float32) float64 {
	mx := math.Inf(-1)
	for _, v := range logits {
		mx = math.Max(mx, float64(v))
	}
	sum := 0.0
	for _, v := range logits {
		sum += math.Exp(float64(v) - mx)
	}
	return mx + math.Log(sum)
}

// NegLogProb is -log softmax(logits)[tok], computed stably.
func NegLogProb(logits []float32, tok llama.Token) float64 {
	return logSumExp(logits) - float64(logits[tok])
}
