package engine

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync/atomic"
	"time"

	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// run is the decode loop. It returns when ctx ends (failing what is left) or, after
// Stop, when every request has finished.
func (e *Engine) run(ctx context.Context) {
	defer close(e.done)
	defer e.running.Store(false)
	for {
		e.admit()
		if e.activeCount() == 0 {
			e.mu.Lock()
			idle := e.closed && len(e.queue) == 0 && len(e.waiting) == 0
			e.mu.Unlock()
			if idle {
				return
			}
			select {
			case <-ctx.Done():
				e.failAll(completion.ErrShuttingDown)
				return
			case <-e.wake:
			}
			continue
		}
		if ctx.Err() != nil {
			e.failAll(completion.ErrShuttingDown)
			return
		}
		e.step()
	}
}

// step is one turn of the loop: end cancelled requests, encode one batch of one
// prompt, decode one token of every generating sequence. A panic outside the work
// on a single request fails the requests that were running, not the process.
func (e *Engine) step() {
	defer func() {
		if v := recover(); v != nil {
			stack := debug.Stack()
			for _, s := range e.slots {
				if s != nil {
					e.failPanic(s, v, stack)
				}
			}
		}
		e.updateCells()
	}()
	e.reapCancelled()
	e.prefillStep()
	e.decodeStep()
}

// generating reports whether some sequence is past its prompt and waiting for
// its next decode step.
func (e *Engine) generating() bool {
	for _, s := range e.slots {
		if s != nil && s.state == stateGenerating {
			return true
		}
	}
	return false
}

func (e *Engine) activeCount() int {
	n := 0
	for _, s := range e.slots {
		if s != nil {
			n++
		}
	}
	return n
}

// admit moves waiting requests into free slots, first come first served, when the
// cells their policy may hold fit next to the reservations already made.
func (e *Engine) admit() {
	e.drainQueue()
	for len(e.waiting) > 0 {
		s := e.waiting[0]
		if s.ctx.Err() != nil {
			e.end(s, completion.Event{Done: true, Err: s.ctx.Err()})
			continue
		}
		slot, common := e.pickSlot(s)
		if slot < 0 {
			return
		}
		if e.host.on() || e.disk.on() {
			common = e.restore(s, slot, common)
		}
		pi := e.poolOf(slot)
		elsewhere := common == 0 && e.prefills(s.req.Cache)
		if elsewhere && e.freePrefillStream() < 0 {
			return // every stream of the prefill context holds a prompt
		}
		e.plan(s, e.pools[pi].size(), elsewhere)
		keep := -1 // the held sequence s continues, whose cells its reservation counts
		if common > 0 {
			keep = slot
		} else {
			e.drop(slot)
		}
		if !e.reclaim(pi, keep, s.reserve) {
			return // wait for cells to be released
		}
		cache, err := e.seqCacheFor(s, slot, common)
		if err != nil {
			e.end(s, completion.Event{Done: true, Err: err})
			continue
		}
		e.enter(s, slot, pi, cache)
	}
}

// drainQueue moves everything submitted so far onto the loop's waiting list.
func (e *Engine) drainQueue() {
	for {
		select {
		case s := <-e.queue:
			e.waiting = append(e.waiting, s)
		default:
			return
		}
	}
}

func (e *Engine) poolOf(slot int) int {
	if len(e.pools) == 1 {
		return 0
	}
	return slot
}

func (e *Engine) updateCells() {
	n := 0
	var byPolicy [len(cachePolicies)]int64
	for _, s := range e.slots {
		if s != nil && !s.cache.away() { // a prompt in the prefill context holds no decode cells yet
			held := s.cache.held()
			n += held
			if i := slices.Index(cachePolicies[:], s.req.Cache.Policy()); i >= 0 {
				byPolicy[i] += int64(held)
			}
		}
	}
	e.cellsUsed.Store(int64(n))
	held := 0
	for _, h := range e.held {
		if h != nil {
			held += h.cache.held()
		}
	}
	e.cellsHeld.Store(int64(held))
	for i, c := range byPolicy {
		e.policyCells[i].Store(c)
	}
}

// prefillStep encodes one batch of prompt: the next chunk of the oldest unfinished
// prompt, alone while sequences generate (the pacer sizes the chunk) or when it
// cannot share a call (an image, a unified cache), else together with the other
// prompts of its context that can share the call (promptGroup).
func (e *Engine) prefillStep() {
	var s *seq
	for _, cand := range e.slots {
		if cand != nil && cand.state == stateEncoding && (s == nil || cand.started.Before(s.started)) {
			s = cand
		}
	}
	if s == nil {
		return
	}
	if g := e.promptGroup(s); len(g) > 1 {
		e.prefillTogether(g)
		return
	}
	e.guard(s, func() { e.prefill(s) })
}

// promptGroup is the prompts that share one call with s, the oldest: while no
// sequence generates (none waits for a decode step), every prompt encoded in its
// own stream of the context that encodes s's (the decode context, or the prefill
// context's streams) whose next chunk is text, in stream order; nil when s is not
// one of them. llama.cpp cuts such a call into ubatches of equal tokens per
// stream, so the prompts of a burst of requests go through the weights together,
// as one prompt's tokens do, instead of one after the other (and the first of
// them would then decode alone while the others' prompts wait their turn between
// its steps). Captured attention stays per stream (llama.CaptureSums).
func (e *Engine) promptGroup(s *seq) []*seq {
	if e.generating() || !sharesPromptCall(s) {
		return nil
	}
	var g []*seq
	for _, c := range e.slots {
		if c != nil && c.state == stateEncoding && sharesPromptCall(c) && c.cache.lctx == s.cache.lctx && len(g) < e.opts.BatchSize {
			g = append(g, c)
		}
	}
	return g
}

// sharesPromptCall reports whether s's next prompt chunk may go into a call with
// other sequences' (promptGroup): a text chunk, in a context with a stream per
// sequence (a unified cache places a shared call's tokens otherwise than
// cellPool.placeUBatch per stream expects).
func sharesPromptCall(s *seq) bool {
	c := s.cache
	return c != nil && !c.lctx.Params().Unified && s.chunks[s.chunkIdx].kind == llama.ChunkText
}

// prefillTogether encodes the next text chunks of the prompts of g
// (promptGroup) in one call, the batch shared between them (shareBatch).
func (e *Engine) prefillTogether(g []*seq) {
	var live []*seq
	for _, s := range g {
		if !e.guardBool(s, func() bool { return e.injected(s) }) {
			live = append(live, s)
		}
	}
	if len(live) == 0 {
		return
	}
	counts := shareBatch(e.opts.BatchSize, live)
	b := e.tokBatch
	b.Clear()
	caches := make([]*seqCache, len(live))
	rows := make([]int, len(live)) // each one's last token in the batch
	for i, s := range live {
		s.beginPrompt()
		ch := &s.chunks[s.chunkIdx]
		n := counts[i]
		last := s.chunkIdx == len(s.chunks)-1 && s.chunkOff+n == ch.n
		pos0 := e.textPos(s)
		for k := range n {
			b.Add(ch.tokens[s.chunkOff+k], pos0+k, s.cache.seq, last && k == n-1)
		}
		caches[i], rows[i] = s.cache, b.Len()-1
	}
	t0 := time.Now()
	if err := decodePrompts(live[0].cache.lctx, b, caches, counts); err != nil {
		for _, s := range live {
			e.fail(s, fmt.Errorf("engine: prompt decode: %w", err))
		}
		return
	}
	e.pace.prompt(b.Len(), time.Since(t0))
	e.promptCalls.Add(1)
	storeMax(&e.widestPromptCall, int64(len(live)))
	for i, s := range live {
		e.guard(s, func() { e.promptEncoded(s, counts[i], rows[i]) })
	}
}

// storeMax raises v to n (only the loop goroutine stores).
func storeMax(v *atomic.Int64, n int64) {
	if n > v.Load() {
		v.Store(n)
	}
}

// shareBatch splits a batch of size tokens between the current text chunks of ss
// (one call, nothing generating), each getting at least one token:
//   - a prompt whose whole remainder fits its even share takes it, so a short
//     prompt's first token is not held back by the longer ones;
//   - each other prompt gets half its even share of what is left;
//   - the rest goes to the prompts with the most left, a token each to all of
//     those level at the top at a time. A prompt that started alone (its request
//     came a call before the others of its burst) lets the others catch up, and
//     the burst's prompts finish in the same call and then decode together; left
//     to even shares it would finish first and generate while the rest of the
//     burst's prompts went in small chunks between its steps. Giving the whole top
//     level at once keeps their counts equal, as llama.cpp runs a ubatch with
//     equal tokens per stream (an odd token would cost a ubatch of its own).
func shareBatch(size int, ss []*seq) []int {
	n := len(ss)
	need, left := make([]int, n), make([]int, n) // this chunk's tokens, the prompt's entries still to encode
	order := make([]int, n)
	for i, s := range ss {
		need[i], left[i], order[i] = s.chunks[s.chunkIdx].n-s.chunkOff, s.nPrompt-s.nPast, i
	}
	slices.SortStableFunc(order, func(a, b int) int { return left[a] - left[b] })
	counts := make([]int, n)
	var rest []int
	for k, i := range order {
		// the share of each prompt not finished so far: size over those still to
		// place and those placed in rest
		if left[i] == need[i] && need[i] <= size/(n-k+len(rest)) {
			counts[i], size = need[i], size-need[i]
			continue
		}
		rest = append(rest, i)
	}
	if len(rest) == 0 {
		return counts
	}
	floor := max(size/(2*len(rest)), 1)
	for _, i := range rest {
		counts[i] = min(need[i], floor)
		size -= counts[i]
	}
	for size > 0 {
		top, level := -1, []int(nil)
		for _, i := range rest {
			if counts[i] == need[i] {
				continue
			}
			switch l := left[i] - counts[i]; {
			case l > top:
				top, level = l, []int{i}
			case l == top:
				level = append(level, i)
			}
		}
		if len(level) == 0 || len(level) > size {
			break
		}
		for _, i := range level {
			counts[i]++
		}
		size -= len(level)
	}
	return counts
}

// prefill schedules the next batch of s's prompt, decodes it through s's cache
// owner, and after the last batch lets the owner apply the prompt plan.
func (e *Engine) prefill(s *seq) {
	if e.injected(s) {
		return
	}
	s.beginPrompt()
	b, n, nonCausal, err := e.promptBatch(s, e.pace.chunk(e.generating()))
	if err != nil {
		e.fail(s, err)
		return
	}
	t0 := time.Now()
	if err := s.cache.decodePrompt(b, nonCausal); err != nil {
		e.fail(s, fmt.Errorf("engine: prompt decode: %w", err))
		return
	}
	e.pace.prompt(n, time.Since(t0))
	e.promptCalls.Add(1)
	e.promptEncoded(s, n, b.Len()-1)
}

// beginPrompt notes when s's prompt began to be encoded.
func (s *seq) beginPrompt() {
	if s.prefillStart.IsZero() {
		s.prefillStart = time.Now()
	}
}

// textPos is the position of s's next prompt token.
func (e *Engine) textPos(s *seq) int {
	if e.mrope() {
		return s.cache.position(s.nPast)
	}
	return s.nPast
}

// promptEncoded records that n more entries of s's prompt are in its cache; after
// the last one (output row of the call) it samples the first token, lets the
// cache owner apply the prompt plan and emits the token.
func (e *Engine) promptEncoded(s *seq, n, row int) {
	s.nPast += n
	ch := &s.chunks[s.chunkIdx]
	if s.chunkOff += n; s.chunkOff == ch.n {
		if e.mrope() {
			s.cache.imageDone(ch.n, ch.nPos)
		}
		ch.embd = nil
		s.chunkIdx++
		s.chunkOff = 0
	}
	if s.chunkIdx < len(s.chunks) {
		return
	}
	e.setState(s, stateGenerating)
	tok := e.next(s, row)
	s.prefillDur = time.Since(s.prefillStart)
	if e.beforeCompress != nil {
		e.beforeCompress(s.cache)
	}
	if err := s.cache.compress(); err != nil {
		var ie *InvariantError
		if errors.As(err, &ie) {
			e.broken.Add(1)
			err = &completion.InternalError{RequestID: s.req.ID, Err: err}
		}
		e.fail(s, fmt.Errorf("engine: %w", err))
		return
	}
	e.observe(s, true)
	s.decodeStart = time.Now()
	e.emit(s, tok)
}

// promptBatch fills a batch with the next n tokens (or image embeddings) of s's
// prompt, at most limit (the pacer's chunk); the last one of the prompt asks for
// logits. nonCausal is set for an image that the model attends without a causal
// mask: such an image is not cut into chunks (its first entries would not see its
// last ones).
func (e *Engine) promptBatch(s *seq, limit int) (b *llama.Batch, n int, nonCausal bool, err error) {
	ch := &s.chunks[s.chunkIdx]
	if ch.kind == llama.ChunkImage && e.vision.NonCausal() {
		limit = e.opts.BatchSize
	}
	n = min(e.opts.BatchSize, limit, ch.n-s.chunkOff)
	last := s.chunkIdx == len(s.chunks)-1 && s.chunkOff+n == ch.n
	switch ch.kind {
	case llama.ChunkText:
		b = e.tokBatch
		b.Clear()
		pos0 := e.textPos(s)
		for i := range n {
			b.Add(ch.tokens[s.chunkOff+i], pos0+i, s.cache.seq, last && i == n-1)
		}
	case llama.ChunkImage:
		if ch.embd == nil {
			if ch.embd, err = e.encodeImage(s, ch); err != nil {
				return nil, 0, false, err
			}
		}
		b = e.embdBatch
		b.Clear()
		w := e.vision.EmbdSize()
		for i := range n {
			r := s.chunkOff + i
			if e.mrope() {
				// the image's grid: every embedding at the image's first position,
				// with its row and column (llama.cpp mtmd-helper's M-RoPE layout)
				p0, nx := s.cache.position(s.nPast-s.chunkOff), ch.src.NX
				b.AddEmbdMRoPE(ch.embd[r*w:(r+1)*w], p0, p0+r/nx, p0+r%nx, s.cache.seq, last && i == n-1)
				continue
			}
			b.AddEmbd(ch.embd[r*w:(r+1)*w], s.nPast+i, s.cache.seq, last && i == n-1)
		}
		nonCausal = e.vision.NonCausal()
	}
	return b, n, nonCausal, nil
}

// decodeStep decodes the pending token of every generating sequence in one shared
// batch. Captured attention (h2o) stays per sequence: on a unified cache a query
// row attends only its own sequence's cells, and with a stream per sequence the
// capture sums each stream apart (llama.CaptureSums).
func (e *Engine) decodeStep() {
	t0 := time.Now()
	defer func() {
		if e.generating() {
			e.pace.decode(time.Since(t0))
		}
	}()
	var shared []*seq
	for _, s := range e.slots {
		if s == nil || s.state != stateGenerating {
			continue
		}
		if e.guardBool(s, func() bool { return e.injected(s) }) {
			continue
		}
		if s.cache.streamFull() {
			e.end(s, completion.Event{Done: true, FinishReason: completion.FinishLength})
			continue
		}
		shared = append(shared, s)
	}
	if len(shared) > 0 {
		e.decodeShared(shared)
	}
}

func (e *Engine) decodeShared(ss []*seq) {
	b := e.tokBatch
	b.Clear()
	caches := make([]*seqCache, len(ss))
	for i, s := range ss {
		b.Add(s.pending, s.cache.position(s.nPast), s.id, true)
		caches[i] = s.cache
	}
	if err := decodeShared(e.ctx, b, caches); err != nil {
		for _, s := range ss {
			e.fail(s, fmt.Errorf("engine: decode: %w", err))
		}
		return
	}
	storeMax(&e.widestDecodeCall, int64(len(ss)))
	for i, s := range ss {
		e.guard(s, func() { e.afterDecode(s, i) })
	}
}

// afterDecode samples the next token from output row, lets the cache owner act on
// the token just stored, and emits the sampled token.
func (e *Engine) afterDecode(s *seq, row int) {
	s.nPast++
	tok := e.next(s, row)
	if err := s.cache.afterToken(s.nPast); err != nil {
		e.fail(s, fmt.Errorf("engine: %w", err))
		return
	}
	e.observe(s, false)
	e.emit(s, tok)
}

// next samples the sequence's next token from output row, or, for a forced request,
// takes the next reference token and scores it.
func (e *Engine) next(s *seq, row int) llama.Token {
	if s.req.Force == nil {
		tok := s.sampler.Sample(s.cache.lctx, row)
		if s.req.Logprobs {
			s.logprob = tokenLogprob(e.model, s.cache.lctx.Logits(row), tok, s.req.TopLogprobs)
		}
		return tok
	}
	if s.nGen >= len(s.req.Force) {
		return e.model.Info().EOS
	}
	tok := llama.Token(s.req.Force[s.nGen])
	s.nll += NegLogProb(s.cache.lctx.Logits(row), tok)
	s.nllN++
	return tok
}

func (e *Engine) observe(s *seq, prefill bool) {
	if e.opts.Observe != nil {
		o := Observation{Slot: s.id, RequestID: s.req.ID, Prefill: prefill, T: s.nPast,
			Held: s.cache.held(), Attended: s.cache.lctx.LastAttendedRange(), Evicted: -1}
		if prefill {
			o.Plan = s.cache.plan
		} else {
			o.Evicted = s.cache.evicted
		}
		e.opts.Observe(o)
	}
}

// emit handles a sampled token: end of generation, stop strings, length, or streaming.
func (e *Engine) emit(s *seq, tok llama.Token) {
	if s.req.Force == nil && e.model.IsEOG(tok) {
		e.end(s, completion.Event{Done: true, FinishReason: completion.FinishStop})
		return
	}
	s.nGen++
	s.answer = append(s.answer, tok)
	text := s.utf8.Write(e.model.TokenPiece(tok, false))
	out, hit := s.stops.add(text)
	var lps []completion.TokenLogprob
	if s.logprob != nil {
		lps = []completion.TokenLogprob{*s.logprob}
		s.logprob = nil
	}
	if out != "" || lps != nil {
		s.box.push(completion.Event{Text: out, Logprobs: lps})
	}
	if hit || s.req.Force != nil && s.nGen >= len(s.req.Force) {
		s.stopHit = hit
		e.end(s, completion.Event{Done: true, FinishReason: completion.FinishStop})
		return
	}
	if s.nGen >= s.maxGen {
		e.end(s, completion.Event{Done: true, FinishReason: completion.FinishLength})
		return
	}
	s.pending = tok
}

// injected reports (and applies) a test fault for s.
func (e *Engine) injected(s *seq) bool {
	if e.opts.Fault == nil {
		return false
	}
	if err := e.opts.Fault(s.req.ID); err != nil {
		e.fail(s, fmt.Errorf("engine: %w", err))
		return true
	}
	return false
}

// guard runs one piece of the engine's work on s. A panic in it fails s alone
// (an *completion.InternalError, logged with its stack) and the loop goes on.
func (e *Engine) guard(s *seq, work func()) {
	defer func() {
		if v := recover(); v != nil {
			e.failPanic(s, v, debug.Stack())
		}
	}()
	work()
}

func (e *Engine) guardBool(s *seq, work func() bool) (r bool) {
	r = true // a panicking check counts as handled: s has failed
	e.guard(s, func() { r = work() })
	return r
}

// seqCacheFor gives admitted request s the cache of slot: the held sequence there,
// continued after its first common positions, or an empty one.
func (e *Engine) seqCacheFor(s *seq, slot, common int) (*seqCache, error) {
	pool, layers := e.pools[e.poolOf(slot)], e.cacheLayers
	if common == 0 {
		if s.reuse && slices.ContainsFunc(e.held, func(h *heldSeq) bool { return h != nil }) {
			e.reuseMisses.Add(1)
		}
		if e.prefills(s.req.Cache) {
			// Encoded in the prefill context, moved into the slot's stream by the plan.
			k := e.freePrefillStream()
			if k < 0 {
				return nil, errors.New("engine: no free stream in the prefill context") // admit checked
			}
			c, err := newSeqCache(e.pctx, k, e.ppools[k], s.req.Cache, layers, s.nPrompt, s.textFrom)
			if err == nil {
				c.home = &seqHome{lctx: e.ctx, seq: slot, nStream: e.opts.Parallel, pool: pool}
			}
			return c, err
		}
		return newSeqCache(e.ctx, slot, pool, s.req.Cache, layers, s.nPrompt, s.textFrom)
	}
	h := e.held[slot]
	e.held[slot] = nil
	cont := continueSeqCache
	if h.compressed {
		cont = continueCompressed
	} else if common < len(h.units) {
		e.toHost(h) // cut down to a shared prefix: the whole conversation may come back
	}
	c, err := cont(h.cache, s.req.Cache, s.nPrompt, s.textFrom, common, imageShift(s.chunks, common))
	if err != nil {
		h.cache.free()
		return nil, err
	}
	s.startAt(common)
	s.reusedFrom = cmp.Or(h.from, "slot")
	e.reuseHits.Add(1)
	e.reusedToks.Add(int64(common))
	return c, nil
}

// freePrefillStream is a stream of the prefill context that holds no request's
// prompt (its sequence id), -1 when every one does.
func (e *Engine) freePrefillStream() int {
	busy := make([]bool, len(e.ppools))
	for _, s := range e.slots {
		if s != nil && s.cache != nil && s.cache.away() {
			busy[s.cache.seq] = true
		}
	}
	return slices.Index(busy, false)
}

// encodeImage returns the embeddings of image chunk ch of s, from the image cache
// when the same picture was encoded before.
func (e *Engine) encodeImage(s *seq, ch *promptChunk) ([]float32, error) {
	if embd, ok := e.images.get(ch.key); ok {
		e.imageHits.Add(1)
		return embd, nil
	}
	embd, err := s.prompt.EncodeImage(ch.src)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	e.imageEncs.Add(1)
	e.images.put(ch.key, embd)
	return embd, nil
}
