package engine

import "github.com/elasticserve/elasticserve/engine/completion"

// CountPrompt is the number of prompt tokens req takes, counted as Submit
// counts them (Usage.PromptTokens): its messages rendered with the chat
// template, each image's tokens, and its AnswerPrefix. Its errors are
// Submit's (*completion.ImageError, ErrNoVision, MarkerInTextError, ...); a
// prompt too long for a slot is still counted. It is safe to call from any
// goroutine while the loop runs, as Submit's own tokenization is.
func (e *Engine) CountPrompt(req *completion.Request) (int, error) {
	p, err := buildPrompt(e.model, e.vision, req.Messages, req.AnswerPrefix)
	if err != nil {
		return 0, err
	}
	if p.c != nil {
		p.c.Close()
	}
	return p.n, nil
}
