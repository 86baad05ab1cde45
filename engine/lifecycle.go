package engine

import (
	"fmt"
	"runtime/debug"
	"slices"
	"time"

	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// reqState is where a request is in its life. A request goes
//
//	prepared → queued → encoding → generating → held or done
//
// and may end (done) from any state before held; end is the only way out, and
// setState the only writer of a request's state.
type reqState uint8

const (
	statePrepared   reqState = iota // made by Submit (prompt tokenized), not yet queued
	stateQueued                     // counted in the queue: Engine.queue, then the loop's waiting list
	stateEncoding                   // in a slot, its prompt being encoded
	stateGenerating                 // in a slot, decoding its answer
	stateHeld                       // ended; its cells kept in its slot for the conversation's next turn (hold)
	stateDone                       // ended; everything it held given back
)

var stateNames = [...]string{"prepared", "queued", "encoding", "generating", "held", "done"}

func (st reqState) String() string {
	if int(st) < len(stateNames) {
		return stateNames[st]
	}
	return fmt.Sprintf("state(%d)", int(st))
}

// ended reports whether the request has had its final event.
func (st reqState) ended() bool { return st == stateHeld || st == stateDone }

// follows reports whether a request may go from st to next.
func (st reqState) follows(next reqState) bool {
	switch {
	case st.ended():
		return false
	case next == stateDone:
		return true
	case next == stateHeld:
		return st == stateGenerating
	default:
		return next == st+1
	}
}

// setState moves s to state to, and shows the move to the test hook.
func (e *Engine) setState(s *seq, to reqState) {
	from := s.state
	s.state = to
	if e.onState != nil {
		e.onState(s, from, to)
	}
}

// enqueue queues prepared request s for the decode loop, unless the engine is
// stopping or the queue is full.
func (e *Engine) enqueue(s *seq) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case e.closed:
		return completion.ErrShuttingDown
	case e.queued.Add(1) > int64(e.opts.QueueSize):
		e.queued.Add(-1)
		return completion.ErrQueueFull
	}
	s.queuedAt = time.Now()
	e.setState(s, stateQueued)
	e.queue <- s // never blocks: the channel holds QueueSize and queued bounds it
	return nil
}

// enter puts queued request s, the first waiting, into slot (its pool pi) with
// cache, the cells its prompt is encoded into.
func (e *Engine) enter(s *seq, slot, pi int, cache *seqCache) {
	e.unqueue(s)
	s.id = slot
	s.cache = cache
	if s.sampler == nil { // a constrained request brings its own, made by prepare
		s.sampler = llama.NewSampler(llama.SamplerParams(s.req.Sampling))
	}
	s.started = time.Now()
	e.reserved[pi] += s.reserve
	e.slots[slot] = s
	e.busy.Add(1)
	e.setState(s, stateEncoding)
}

// end is the one teardown of a request, whatever ends it: its last token, a
// failure, a panic, its client going away, shutdown, or a refusal at Submit. It
// takes s off the waiting list or out of its slot and gives back its reservation;
// then completes ev, its final event (the text held back, usage, the cache
// report), keeps its cells in the slot for the conversation's next turn (hold) or
// frees them, frees its C objects and sends ev last. A request that has ended
// already is left as it is.
func (e *Engine) end(s *seq, ev completion.Event) {
	from := s.state
	if from.ended() {
		return
	}
	admitted := from == stateEncoding || from == stateGenerating
	switch {
	case from == stateQueued:
		e.unqueue(s)
	case admitted:
		e.slots[s.id] = nil
		e.busy.Add(-1)
		e.reserved[e.poolOf(s.id)] -= s.reserve
	}
	kept := false
	if admitted {
		var broken any
		if kept, broken = e.wrapUp(s, &ev); broken != nil {
			// The state of s was broken (by an earlier panic, most likely): it
			// ends with an internal error and nothing else.
			e.log.Error().Int("slot", s.id).Str("request_id", s.req.ID).Str("panic", fmt.Sprint(broken)).
				Bytes("stack", debug.Stack()).Msg("panic while ending a request")
			if ev.Err == nil {
				ev.Err = &completion.InternalError{RequestID: s.req.ID, Err: fmt.Errorf("panic: %v", broken)}
			}
			ev = completion.Event{Done: true, Err: ev.Err}
		}
	}
	if !kept && s.cache != nil {
		s.cache.free()
	}
	s.release()
	if admitted {
		// The caller may read Stats as soon as it has the final event: count first.
		e.updateCells()
	}
	to := stateDone
	if kept {
		to = stateHeld
	}
	e.setState(s, to)
	s.box.push(ev)
}

// wrapUp completes the final event of admitted request s and, when it finished
// well, keeps its cells for the next turn (hold), reporting whether it did. A
// panic here is returned rather than raised.
func (e *Engine) wrapUp(s *seq, ev *completion.Event) (kept bool, broken any) {
	defer func() {
		if v := recover(); v != nil {
			broken = v
		}
	}()
	if ev.Err == nil && !s.stopHit {
		// Release text held back for a possible stop string or an unfinished character.
		txt, hit := s.stops.add(s.utf8.Flush())
		if !hit {
			txt += s.stops.flush()
		}
		if txt != "" {
			s.box.push(completion.Event{Text: txt})
		}
	}
	ev.NLL, ev.NLLTokens = s.nll, s.nllN
	ev.QueueMs = ms(s.started.Sub(s.queuedAt))
	ev.Usage = completion.Usage{PromptTokens: s.nPrompt, CompletionTokens: s.nGen, TotalTokens: s.nPrompt + s.nGen, CachedTokens: s.cached}
	ev.KV = e.report(s)
	return ev.Err == nil && e.hold(s), nil
}

// unqueue takes queued request s off the waiting list (when it is there) and out
// of the queue's count.
func (e *Engine) unqueue(s *seq) {
	if i := slices.Index(e.waiting, s); i >= 0 {
		e.waiting = slices.Delete(e.waiting, i, i+1)
	}
	e.queued.Add(-1)
}

// reapCancelled ends requests whose client is gone or whose deadline passed.
func (e *Engine) reapCancelled() {
	for _, s := range e.slots {
		if s != nil && s.ctx.Err() != nil {
			e.end(s, completion.Event{Done: true, Err: s.ctx.Err()})
		}
	}
	for _, s := range slices.Clone(e.waiting) {
		if s.ctx.Err() != nil {
			e.end(s, completion.Event{Done: true, Err: s.ctx.Err()})
		}
	}
}

// failAll ends every request, running or waiting, with err (shutdown).
func (e *Engine) failAll(err error) {
	for _, s := range e.slots {
		if s != nil {
			e.end(s, completion.Event{Done: true, Err: err})
		}
	}
	e.drainQueue()
	for len(e.waiting) > 0 {
		e.end(e.waiting[0], completion.Event{Done: true, Err: err})
	}
}

// fail ends s with err, logged.
func (e *Engine) fail(s *seq, err error) {
	e.log.Error().Err(err).Int("slot", s.id).Str("request_id", s.req.ID).Msg("request failed")
	e.end(s, completion.Event{Done: true, Err: err})
}

// failPanic ends s, whose work panicked with v, with an internal error naming it.
func (e *Engine) failPanic(s *seq, v any, stack []byte) {
	e.log.Error().Int("slot", s.id).Str("request_id", s.req.ID).Str("panic", fmt.Sprint(v)).
		Bytes("stack", stack).Msg("panic while working on a request; it fails, the engine goes on")
	e.end(s, completion.Event{Done: true, Err: &completion.InternalError{RequestID: s.req.ID, Err: fmt.Errorf("panic: %v", v)}})
}
