package engine

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// prefillStep encodes one batch of one prompt. A single sequence prefills at a time
// so that captured attention belongs to it alone.
func (e *Engine) prefillStep() {
	var s *seq
	for _, cand := range e.slots {
		if cand != nil && !cand.prefilled {
			if s == nil || cand.started.Before(s.started) {
				s = cand
			}
		}
	}
	if s == nil || e.injected(s) {
		return
	}
	if s.chunkIdx == 0 && s.chunkOff == 0 {
		s.prefillStart = time.Now()
		if s.req.Cache.NeedsPrefillScores() && s.req.Cache.Budget < 1 {
			s.scores = make([][]float32, e.model.Info().Layers)
			for l := range s.scores {
				s.scores[l] = make([]float32, s.nPrompt)
			}
		}
	}
	ch := &s.chunks[s.chunkIdx]
	n := min(e.opts.BatchSize, ch.n-s.chunkOff)
	last := s.chunkIdx == len(s.chunks)-1 && s.chunkOff+n == ch.n
	var b *llama.Batch
	switch ch.kind {
	case llama.ChunkText:
		b = e.tokBatch
		b.Clear()
		for i := 0; i < n; i++ {
			b.Add(ch.tokens[s.chunkOff+i], s.nPast+i, s.id, last && i == n-1)
		}
	case llama.ChunkImage:
		if ch.embd == nil {
			embd, err := s.prompt.EncodeImage(ch.src)
			if err != nil {
				e.fail(s, fmt.Errorf("engine: %w", err))
				return
			}
			ch.embd = embd
		}
		b = e.embdBatch
		b.Clear()
		w := e.vision.EmbdSize()
		for i := 0; i < n; i++ {
			r := s.chunkOff + i
			b.AddEmbd(ch.embd[r*w:(r+1)*w], s.nPast+i, s.id, last && i == n-1)
		}
		if e.vision.NonCausal() {
			e.ctx.SetCausal(false)
			defer e.ctx.SetCausal(true)
		}
	}
	capture := s.scores != nil
	if capture {
		e.ctx.CaptureReset()
		e.ctx.CaptureEnable(true)
	}
	err := e.ctx.Decode(b)
	if capture {
		e.ctx.CaptureEnable(false)
	}
	if err != nil {
		e.fail(s, fmt.Errorf("engine: prompt decode: %w", err))
		return
	}
	ids := make([]int, n)
	for i := range ids {
		ids[i] = s.id
	}
	cells, err := e.placeBatch(ids)
	if err != nil {
		e.fail(s, err)
		return
	}
	for i, c := range cells {
		s.record(c, s.nPast+i)
	}
	s.nPast += n
	if capture {
		if err := e.collectPrefillScores(s); err != nil {
			e.fail(s, err)
			return
		}
	}
	s.chunkOff += n
	if s.chunkOff == ch.n {
		ch.embd = nil
		s.chunkIdx++
		s.chunkOff = 0
	}
	if !last {
		return
	}
	s.prefilled = true
	tok := e.next(s, b.Len()-1)
	s.prefillDur = time.Since(s.prefillStart)
	t0 := time.Now()
	if err := e.compress(s); err != nil {
		e.fail(s, err)
		return
	}
	s.compressDur = time.Since(t0)
	s.scores = nil
	e.observe(s, true)
	s.decodeStart = time.Now()
	e.emit(s, tok)
}

func maxCell(cells []int) int {
	m := 0
	for _, c := range cells {
		m = max(m, c)
	}
	return m
}

// collectPrefillScores adds the columns captured for this batch to the sequence's
// scores, by prompt position.
func (e *Engine) collectPrefillScores(s *seq) error {
	sums, err := e.ctx.CaptureSums(maxCell(s.entryCell) + 1)
	if err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	for l := range sums {
		for i, c := range s.entryCell {
			s.scores[l][s.entryPos[i]] += sums[l][c]
		}
	}
	return nil
}

// compress applies the prefill plan: every layer keeps K rows (merged per the plan),
// written back as K contiguous cells.
func (e *Engine) compress(s *seq) error {
	plan, err := s.tracker.PlanPrefill(s.nPrompt, s.scores)
	if err != nil {
		return fmt.Errorf("engine: plan: %w", err)
	}
	if plan == nil {
		return nil
	}
	src, err := e.ctx.ReadSeqCache(s.id)
	if err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	if src.Cells() != s.nPrompt {
		return fmt.Errorf("engine: sequence holds %d cells, expected %d", src.Cells(), s.nPrompt)
	}
	// cellOfPos maps a prompt position to its cell in src (cell order = state order).
	cellOfPos := make([]int, s.nPrompt)
	for c, p := range src.Pos {
		if int(p) >= s.nPrompt {
			return fmt.Errorf("engine: unexpected position %d in the cache", p)
		}
		cellOfPos[p] = c
	}
	dst := ApplyPlan(src, plan, cellOfPos)
	pos := make([]int, plan.K)
	for i, p := range plan.Layers[0].Keep {
		pos[i] = p
		dst.Pos[i] = int32(p)
	}
	if err := e.ctx.WriteSeqCache(s.id, dst); err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	// llama.cpp removed the sequence, then placed the K cells as one ubatch.
	s.pool.releaseAll(s.id)
	ids := make([]int, plan.K)
	for i := range ids {
		ids[i] = s.id
	}
	cells, ok := s.pool.placeUBatch(ids)
	if !ok {
		return errors.New("engine: cell bookkeeping could not place the rewritten cache")
	}
	s.resetLayout(cells, pos)
	return nil
}

// ApplyPlan builds the compressed cache: cell i of layer l holds the mean of the rows
// of plan.Layers[l].Keep[i] and its merge group (a plain copy when the group is empty).
// Layers are independent, so they are merged in parallel.
func ApplyPlan(src *llama.SeqCache, plan *elasticcache.PrefillPlan, cellOfPos []int) *llama.SeqCache {
	dst := llama.NewSeqCacheLike(src, plan.K)
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for l := range plan.Layers {
		for _, part := range []struct{ in, out *llama.LayerRows }{{&src.K[l], &dst.K[l]}, {&src.V[l], &dst.V[l]}} {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				mergeLayer(part.in, part.out, src.Cells(), plan.K, plan.Layers[l], cellOfPos)
			}()
		}
	}
	wg.Wait()
	return dst
}

func mergeLayer(in, out *llama.LayerRows, nSrc, k int, lp elasticcache.LayerPlan, cellOfPos []int) {
	acc := make([]float32, in.RowElems)
	row := make([]float32, in.RowElems)
	for i, anchor := range lp.Keep {
		var group []int
		if i < len(lp.Groups) {
			group = lp.Groups[i]
		}
		if len(group) == 0 {
			out.CopyRow(k, i, in, nSrc, cellOfPos[anchor])
			continue
		}
		in.Row(nSrc, cellOfPos[anchor], acc)
		for _, g := range group {
			in.Row(nSrc, cellOfPos[g], row)
			for j, v := range row {
				acc[j] += v
			}
		}
		inv := 1 / float32(len(group)+1)
		for j := range acc {
			acc[j] *= inv
		}
		out.SetRow(k, i, acc)
	}
}

// decodeStep decodes the pending token of every generating sequence: one shared batch
// for policies without decode scores, one captured call each for those with them.
func (e *Engine) decodeStep() {
	var plain, captured []*seq
	for _, s := range e.slots {
		if s == nil || !s.prefilled || e.injected(s) {
			continue
		}
		if s.pool.free() == 0 {
			e.finishSeq(s, Event{Done: true, FinishReason: FinishLength})
			continue
		}
		if s.req.Cache.NeedsDecodeScores() && s.req.Cache.Budget < 1 {
			captured = append(captured, s)
		} else {
			plain = append(plain, s)
		}
	}
	if len(plain) > 0 {
		b := e.tokBatch
		b.Clear()
		for _, s := range plain {
			b.Add(s.pending, s.nPast, s.id, true)
		}
		ids := make([]int, len(plain))
		for i, s := range plain {
			ids[i] = s.id
		}
		err := e.ctx.Decode(b)
		var cells []int
		if err == nil {
			cells, err = e.placeBatch(ids)
		}
		if err != nil {
			for _, s := range plain {
				e.fail(s, fmt.Errorf("engine: decode: %w", err))
			}
		} else {
			for i, s := range plain {
				e.afterDecode(s, i, cells[i], nil)
			}
		}
	}
	for _, s := range captured {
		b := e.tokBatch
		b.Clear()
		b.Add(s.pending, s.nPast, s.id, true)
		e.ctx.CaptureReset()
		e.ctx.CaptureEnable(true)
		err := e.ctx.Decode(b)
		e.ctx.CaptureEnable(false)
		var cells []int
		if err == nil {
			cells, err = e.placeBatch([]int{s.id})
		}
		if err != nil {
			e.fail(s, fmt.Errorf("engine: decode: %w", err))
			continue
		}
		e.afterDecode(s, 0, cells[0], s)
	}
}

// afterDecode records the new cell, samples the next token, lets the policy evict,
// and emits the token. withScores is non-nil when this step's attention was captured.
func (e *Engine) afterDecode(s *seq, row, cell int, withScores *seq) {
	s.record(cell, s.nPast)
	s.nPast++
	tok := e.next(s, row)
	var scores [][]float32
	if withScores != nil {
		sums, err := e.ctx.CaptureSums(maxCell(s.entryCell) + 1)
		if err != nil {
			e.fail(s, fmt.Errorf("engine: %w", err))
			return
		}
		scores = make([][]float32, len(sums))
		for l := range sums {
			scores[l] = make([]float32, len(s.entryCell))
			for i, c := range s.entryCell {
				scores[l][i] = sums[l][c]
			}
		}
	}
	idx, err := s.tracker.AfterDecode(s.nPast, len(s.entryCell), scores)
	if err != nil {
		e.fail(s, fmt.Errorf("engine: policy: %w", err))
		return
	}
	if idx >= 0 {
		pos := s.evict(idx)
		if !e.ctx.SeqRemove(s.id, pos, pos+1) {
			e.fail(s, fmt.Errorf("engine: could not evict position %d", pos))
			return
		}
	}
	e.observe(s, false)
	e.emit(s, tok)
}

// next samples the sequence's next token from output row, or, for a forced request,
// takes the next reference token and scores it.
func (e *Engine) next(s *seq, row int) llama.Token {
	if s.req.Force == nil {
		return s.sampler.Sample(e.ctx, row)
	}
	if s.nGen >= len(s.req.Force) {
		return e.model.Info().EOS
	}
	tok := llama.Token(s.req.Force[s.nGen])
	s.nll += NegLogProb(e.ctx.Logits(row), tok)
	s.nllN++
	return tok
}

// NegLogProb is -log softmax(logits)[tok], computed stably.
func NegLogProb(logits []float32, tok llama.Token) float64 {
	mx := math.Inf(-1)
	for _, v := range logits {
		mx = math.Max(mx, float64(v))
	}
	sum := 0.0
	for _, v := range logits {
		sum += math.Exp(float64(v) - mx)
	}
	return mx + math.Log(sum) - float64(logits[tok])
}

func (e *Engine) observe(s *seq, prefill bool) {
	if e.opts.Observe != nil {
		e.opts.Observe(Observation{Slot: s.id, RequestID: s.req.ID, Prefill: prefill, T: s.nPast,
			Held: len(s.entryCell), Attended: e.ctx.LastAttendedRange()})
	}
}

// emit handles a sampled token: end of generation, stop strings, length, or streaming.
func (e *Engine) emit(s *seq, tok llama.Token) {
	if s.req.Force == nil && e.model.IsEOG(tok) {
		e.finishSeq(s, Event{Done: true, FinishReason: FinishStop})
		return
	}
	s.nGen++
	text := s.utf8.Write(e.model.TokenPiece(tok, false))
	out, hit := s.stops.add(text)
	if out != "" {
		s.box.push(Event{Text: out})
	}
	if hit || s.req.Force != nil && s.nGen >= len(s.req.Force) {
		s.stopHit = hit
		e.finishSeq(s, Event{Done: true, FinishReason: FinishStop})
		return
	}
	if s.nGen >= s.maxGen {
		e.finishSeq(s, Event{Done: true, FinishReason: FinishLength})
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

func (e *Engine) fail(s *seq, err error) {
	e.log.Error().Err(err).Int("slot", s.id).Str("request_id", s.req.ID).Msg("request failed")
	e.finishSeq(s, Event{Done: true, Err: err})
}

func (e *Engine) finishSeq(s *seq, ev Event) {
	if e.slots[s.id] != s {
		return
	}
	e.finish(s.id, ev)
}
