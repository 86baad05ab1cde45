package engine

import "github.com/elasticserve/elasticserve/engine/completion"

// The engine speaks the types of package completion; these aliases keep its own
// code and its callers short.
type (
	Message  = completion.Message
	Part     = completion.Part
	Sampling = completion.Sampling
	Request  = completion.Request
	Usage    = completion.Usage
	KVReport = completion.KVReport
	Event    = completion.Event
	Result   = completion.Result

	TokenLogprob = completion.TokenLogprob
)

const (
	FinishStop   = completion.FinishStop
	FinishLength = completion.FinishLength
)

var (
	ErrQueueFull    = completion.ErrQueueFull
	ErrShuttingDown = completion.ErrShuttingDown
	DefaultSampling = completion.DefaultSampling
)
