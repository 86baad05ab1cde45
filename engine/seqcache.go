package engine

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// seqCache owns one sequence's KV cache in the llama context: which cell holds
// which entry at which position, the attention captured for it, its policy state
// (elasticcache.Tracker), and every rewrite of its cells through the KV hook (the
// prompt plan's read → plan → merge → write, and decode-time eviction).
//
// Locking: none. The engine's decode loop is the only goroutine that calls it,
// as it is the only one that touches the llama context.
//
// Cell placement. A new token takes the cell llama.cpp's find_slot gives it, which
// the pool (cellPool) predicts; captured attention comes per cell, so the scores of
// entry i are read at cells[i].
//
// Positions after the prompt plan. Each layer keeps its own K entries, but cells are
// shared by all layers: cell i of layer l holds layer l's i-th kept entry (merged),
// and the K cells carry the positions of layer 0's kept entries, in ascending order.
// That is correct because a stored position is used only for the attention mask
// (and to name an entry for removal): RoPE was applied to every K row when it was
// encoded, so the rows keep their own positions inside, and every kept position
// lies below the first generated position, so every later query attends all K
// cells in every layer, whichever entry a layer put in them. The first Sink cells
// and the last one hold the same entries (sink tokens, last prompt token) in every
// layer, and a decode eviction removes one cell, the same index in every layer, as
// the method prescribes.
type seqCache struct {
	lctx    *llama.Context
	seq     int // llama sequence id
	pool    *cellPool
	spec    elasticcache.Spec
	tracker *elasticcache.Tracker
	nPrompt int
	// layers are the model layers of the cache the plans rewrite (the KV hook's
	// part 0): every layer, or a sliding-window model's full-attention layers. The
	// tracker sees their attention only (a window layer's columns index its own cache).
	layers []int
	// base is the number of entries held before this request's prompt was encoded
	// (a continued conversation's); entry i >= base is prompt index segFrom+i-base.
	base int

	cells []int // cell of each held entry, in position order
	pos   []int // position of each held entry
	peak  int
	// shift is T minus the position of the next token: 0 unless the prompt plan
	// relabelled the kept cells 0..K-1 (Spec.CompactPositions), then N-K, or an
	// M-RoPE model's images took fewer positions than cells (sum of n - nPos).
	shift int

	// prompt: attention received by each prompt position, per layer (nil when the
	// policy reads none); step: this decode step's attention per held entry.
	scores [][]float32
	step   [][]float32
	// query rows captured while the prompt was encoded (the capture's layer-0 count)
	capturedRows int

	compressDur time.Duration
	plan        *elasticcache.PrefillPlan // the prompt plan applied, nil when none
	evicted     int                       // position evicted by the last afterToken, -1 none

	// A continued compressed conversation: the tracker that compressed the held
	// entries, and the first position of the new turn (held entries lie below it).
	prev     *elasticcache.Tracker
	segFrom  int
	textFrom int // first prompt position after the prompt's last image (0: none)

	// home, when set, is where the sequence decodes: its prompt is encoded here
	// (the prefill context) and the prompt plan's cells are written there, converted
	// to that context's row layout; from then on lctx, seq and pool are home's.
	home *seqHome
}

// seqHome is a slot's sequence in the decode context, which holds it in stream
// seq of nStream (a stream per sequence).
type seqHome struct {
	lctx    *llama.Context
	seq     int
	nStream int
	pool    *cellPool
}

// newSeqCache empties sequence seq of lctx and prepares its cache for a prompt of
// nPrompt tokens under spec; textFrom is the first prompt position after the
// prompt's last image (0: none).
func newSeqCache(lctx *llama.Context, seq int, pool *cellPool, spec elasticcache.Spec, layers []int, nPrompt, textFrom int) (*seqCache, error) {
	tr, err := elasticcache.NewTracker(spec, len(layers))
	if err != nil {
		return nil, err
	}
	tr.SetTextTail(textFrom)
	lctx.SeqClear(seq)
	c := &seqCache{lctx: lctx, seq: seq, pool: pool, spec: spec, tracker: tr, nPrompt: nPrompt, textFrom: textFrom, layers: layers}
	if spec.PrefillScores() {
		c.scores = make([][]float32, len(layers))
		for l := range c.scores {
			c.scores[l] = make([]float32, nPrompt)
		}
	}
	return c, nil
}

// continueSeqCache turns held, a finished sequence whose cells hold its first
// entries uncompressed, into the cache of a new request under spec whose prompt
// (nPrompt entries) starts with the same first common entries: the cells of
// entries from common on are removed, the rest stay, and the new request's prompt
// is encoded from common. shift is how many positions fewer than entries the
// first common entries take (an M-RoPE model's images, imageShift): entry common
// goes to position common-shift.
func continueSeqCache(held *seqCache, spec elasticcache.Spec, nPrompt, textFrom, common, shift int) (*seqCache, error) {
	if spec.PrefillScores() {
		// Its plan ranks every prompt entry by the attention of every prompt query;
		// the held entries' queries are not encoded again.
		return nil, fmt.Errorf("engine: a %s plan cannot continue held cells", spec.Policy())
	}
	tr, err := elasticcache.NewTracker(spec, len(held.layers))
	if err != nil {
		return nil, err
	}
	tr.SetTextTail(textFrom)
	cut := common - shift
	if !held.lctx.SeqRemove(held.seq, cut, -1) {
		return nil, fmt.Errorf("engine: could not remove positions from %d of sequence %d", cut, held.seq)
	}
	c := &seqCache{lctx: held.lctx, seq: held.seq, pool: held.pool, spec: spec, tracker: tr, nPrompt: nPrompt, evicted: -1, layers: held.layers, shift: shift}
	for i, p := range held.pos {
		if p < cut {
			c.cells = append(c.cells, held.cells[i])
			c.pos = append(c.pos, p)
		} else {
			c.pool.release(held.cells[i])
		}
	}
	c.peak = len(c.cells)
	c.base = len(c.cells)
	return c, nil
}

// continueCompressed turns held, a finished conversation that its policy
// compressed, into the cache of the request that continues it exactly under the
// same setting: every held cell stays, and the new turn's nPrompt-from entries
// are encoded from entry from (at position from-shift, see continueSeqCache) and
// planned on their own (compressTurn).
func continueCompressed(held *seqCache, spec elasticcache.Spec, nPrompt, textFrom, from, shift int) (*seqCache, error) {
	if spec != held.spec {
		return nil, fmt.Errorf("engine: a conversation compressed under %s continues only under it", held.spec.Policy())
	}
	tr, err := elasticcache.NewTracker(spec, len(held.layers))
	if err != nil {
		return nil, err
	}
	if slices.Max(held.pos) >= from-shift {
		return nil, fmt.Errorf("engine: held entries reach position %d, the new turn starts at %d", slices.Max(held.pos), from-shift)
	}
	c := &seqCache{lctx: held.lctx, seq: held.seq, pool: held.pool, spec: spec, tracker: tr, nPrompt: nPrompt,
		evicted: -1, prev: held.tracker, segFrom: from, textFrom: textFrom, shift: shift,
		cells: slices.Clone(held.cells), pos: slices.Clone(held.pos), layers: held.layers, base: len(held.cells)}
	c.peak = len(c.cells)
	if spec.PrefillScores() {
		c.scores = make([][]float32, len(c.layers))
		for l := range c.scores {
			c.scores[l] = make([]float32, nPrompt)
		}
	}
	return c, nil
}

// held is the number of entries (cells) the sequence holds.
func (c *seqCache) held() int { return len(c.cells) }

// position is where the token that follows T processed tokens goes.
func (c *seqCache) position(T int) int { return T - c.shift }

// decodePrompt runs b, a batch of the sequence's prompt; nonCausal encodes it
// without the causal mask (an image some projectors ask to be attended whole).
func (c *seqCache) decodePrompt(b *llama.Batch, nonCausal bool) error {
	if nonCausal {
		c.lctx.SetCausal(false)
		defer c.lctx.SetCausal(true)
	}
	return c.decode(b, true)
}

// imageDone records that an M-RoPE image of n entries took nPos positions.
func (c *seqCache) imageDone(n, nPos int) { c.shift += n - nPos }

// streamFull reports whether the sequence's stream has no free cell for a token.
func (c *seqCache) streamFull() bool { return c.pool.free() == 0 }

// away reports whether the sequence is still in the prefill context, before its
// plan moves it home (it holds no cell of the decode context yet).
func (c *seqCache) away() bool { return c.home != nil }

// decode runs b, which holds only this sequence's tokens, records their cells,
// and captures their attention when the policy reads it in this phase (prompt or
// generation).
func (c *seqCache) decode(b *llama.Batch, prompt bool) error {
	capture := (prompt && c.scores != nil) || (!prompt && c.spec.DecodeScores())
	if err := decodeCapturing(c.lctx, b, capture); err != nil {
		return err
	}
	cells, ok := c.pool.place(slices.Repeat([]int{c.seq}, b.Len()))
	if !ok {
		return errBookkeeping
	}
	for i, cell := range cells {
		c.placed(cell, b.Pos(i)) // pos0+i, but for an M-RoPE image (its grid shares one position)
	}
	if !capture {
		return nil
	}
	sums, err := c.capturedSums()
	if err != nil {
		return err
	}
	if prompt {
		c.addPromptScores(sums, c.lctx.CaptureRows(c.seq))
		return nil
	}
	c.takeStep(sums)
	return nil
}

// addPromptScores adds the attention that rows more prompt queries gave each held
// entry (sums: per layer, indexed by cell).
func (c *seqCache) addPromptScores(sums [][]float32, rows int) {
	c.capturedRows += rows
	for l, il := range c.layers {
		for i, cell := range c.cells {
			c.scores[l][c.promptIndex(i)] += sums[il][cell]
		}
	}
}

// decodeShared decodes b in ctx: the pending token of each of caches, in order,
// one sequence each. It records each token's cell (each pool places its own
// sequences' tokens in batch order, as llama.cpp's find_slot does per stream) and
// this step's attention for the caches whose policy reads it.
func decodeShared(ctx *llama.Context, b *llama.Batch, caches []*seqCache) error {
	capture := slices.ContainsFunc(caches, func(c *seqCache) bool { return c.spec.DecodeScores() })
	if err := decodeCapturing(ctx, b, capture); err != nil {
		return err
	}
	cells := make([]int, len(caches))
	var pools []*cellPool
	for _, c := range caches {
		if !slices.Contains(pools, c.pool) {
			pools = append(pools, c.pool)
		}
	}
	for _, p := range pools {
		var idx, seqs []int
		for i, c := range caches {
			if c.pool == p {
				idx, seqs = append(idx, i), append(seqs, c.seq)
			}
		}
		got, ok := p.place(seqs)
		if !ok {
			return errBookkeeping
		}
		for k, i := range idx {
			cells[i] = got[k]
		}
	}
	for i, c := range caches {
		c.placed(cells[i], b.Pos(i))
		if c.spec.DecodeScores() {
			sums, err := c.capturedSums()
			if err != nil {
				return err
			}
			c.takeStep(sums)
		}
	}
	return nil
}

// decodePrompts decodes b in ctx, a context with a stream per sequence: the next
// counts[i] prompt tokens of caches[i], in stream order. llama.cpp cuts such a call
// into ubatches of equal tokens per stream (splitEqual); each pool places its
// sequence's tokens ubatch by ubatch, as find_slot does. The attention of the
// caches whose plan reads it is captured per stream.
func decodePrompts(ctx *llama.Context, b *llama.Batch, caches []*seqCache, counts []int) error {
	capture := slices.ContainsFunc(caches, func(c *seqCache) bool { return c.scores != nil })
	if err := decodeCapturing(ctx, b, capture); err != nil {
		return err
	}
	var seqs []int
	owner := make([]*seqCache, 0, b.Len())
	for i, c := range caches {
		for range counts[i] {
			seqs = append(seqs, c.seq)
			owner = append(owner, c)
		}
	}
	cells := make([]int, len(seqs))
	for _, ub := range splitEqual(seqs, caches[0].pool.ubat) {
		for _, c := range caches {
			var idx, mine []int
			for _, i := range ub {
				if owner[i] == c {
					idx, mine = append(idx, i), append(mine, c.seq)
				}
			}
			if len(idx) == 0 {
				continue
			}
			got, ok := c.pool.placeUBatch(mine)
			if !ok {
				return errBookkeeping
			}
			for k, i := range idx {
				cells[i] = got[k]
			}
		}
	}
	for i, c := range owner {
		c.placed(cells[i], b.Pos(i))
	}
	for _, c := range caches {
		if c.scores == nil {
			continue
		}
		sums, err := c.capturedSums()
		if err != nil {
			return err
		}
		c.addPromptScores(sums, ctx.CaptureRows(c.seq))
	}
	return nil
}

// capturedSums is the attention the last call captured in the sequence's stream,
// per layer, over the cells up to its highest.
func (c *seqCache) capturedSums() ([][]float32, error) {
	return c.lctx.CaptureSums(c.seq, slices.Max(c.cells)+1)
}

// decodeCapturing decodes b in ctx, with the attention of the call captured
// (from zero, per stream) when capture is set.
func decodeCapturing(ctx *llama.Context, b *llama.Batch, capture bool) error {
	if !capture {
		return ctx.Decode(b)
	}
	ctx.CaptureReset()
	ctx.CaptureEnable(true)
	defer ctx.CaptureEnable(false)
	return ctx.Decode(b)
}

// takeStep keeps this decode step's attention per held entry from the captured
// column sums (per layer, indexed by cell). In a batch of several sequences on one
// unified cache each query row attends only its own sequence's cells, so a cell's
// sum comes from its own sequence's query alone.
func (c *seqCache) takeStep(sums [][]float32) {
	c.step = make([][]float32, len(c.layers))
	for l, il := range c.layers {
		c.step[l] = make([]float32, len(c.cells))
		for i, cell := range c.cells {
			c.step[l][i] = sums[il][cell]
		}
	}
}

// promptIndex is where entry i's attention is summed while a prompt is encoded: a
// held entry's own index (i < base <= segFrom), else its place in the prompt. Not
// positions: an M-RoPE image's entries share one.
func (c *seqCache) promptIndex(i int) int {
	if i < c.base {
		return i
	}
	return c.segFrom + i - c.base
}

var errBookkeeping = errors.New("cell bookkeeping found no free cell where llama.cpp did")

// placed records that the token at pos went into cell.
func (c *seqCache) placed(cell, pos int) {
	c.cells = append(c.cells, cell)
	c.pos = append(c.pos, pos)
	c.peak = max(c.peak, len(c.cells))
}

// compress applies the prompt plan once all nPrompt prompt entries are in the
// cache: every layer keeps K entries (merged per the plan), written by the KV hook
// as K contiguous cells, in the slot's stream of the decode context when the
// sequence has a home there. Whatever the hook does not fully understand (cell
// count, layers, cells that are not the ones recorded) is refused before the
// sequence is touched.
func (c *seqCache) compress() error {
	t0 := time.Now()
	defer func() { c.compressDur = time.Since(t0) }()
	if err := c.checkCapture(); err != nil {
		return err
	}
	if c.prev != nil {
		return c.compressTurn()
	}
	plan, err := c.tracker.PlanPrefill(c.nPrompt, c.scores)
	c.scores = nil
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	if plan == nil {
		return c.moveHome()
	}
	c.plan = plan
	if len(c.cells) != c.nPrompt {
		return &InvariantError{What: "cells read back", Detail: fmt.Sprintf("the sequence holds %d entries for a prompt of %d", len(c.cells), c.nPrompt)}
	}
	w := c.newRewrite(plan.K, len(plan.Layers))
	for l, lp := range plan.Layers {
		for j, e := range lp.Keep {
			var group []int
			if j < len(lp.Groups) {
				group = lp.Groups[j]
			}
			w.slot(l, j, e, group...)
		}
	}
	// Positions: layer 0's kept entries' (see the type's comment), or 0..K-1 when the
	// setting reproduces the published code's compacted positions.
	for j, e := range plan.Layers[0].Keep {
		w.meta(j, e, c.pos[e])
		if c.spec.CompactPositions() {
			w.plan.Pos[j] = j
		}
	}
	if c.spec.CompactPositions() {
		c.shift = c.nPrompt - plan.K
	}
	return c.apply(w)
}

// rewrite is a plan for the KV hook over the sequence's entries (indices into
// cells), turned into cells as it is built.
type rewrite struct {
	c    *seqCache
	plan *llama.CellPlan
}

func (c *seqCache) newRewrite(n, layers int) *rewrite {
	p := &llama.CellPlan{N: n, First: -1, Sources: make([][][]int, layers), Meta: make([]int, n), Pos: make([]int, n)}
	for l := range p.Sources {
		p.Sources[l] = make([][]int, n)
	}
	return &rewrite{c: c, plan: p}
}

// slot makes cell j of layer l the mean of entry e and the entries of group.
func (w *rewrite) slot(l, j, e int, group ...int) {
	src := make([]int, 0, 1+len(group))
	src = append(src, w.c.cells[e])
	for _, g := range group {
		src = append(src, w.c.cells[g])
	}
	w.plan.Sources[l][j] = src
}

// meta gives cell j position pos and entry e's M-RoPE components.
func (w *rewrite) meta(j, e, pos int) {
	w.plan.Meta[j], w.plan.Pos[j] = w.c.cells[e], pos
}

// moveHome moves the sequence's cells unchanged into its home (nothing to do
// without one): a prompt the plan left as it was still decodes there.
func (c *seqCache) moveHome() error {
	if c.home == nil {
		return nil
	}
	order := make([]int, len(c.cells)) // entries in cell order: one run, copied as is
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return c.cells[a] - c.cells[b] })
	w := c.newRewrite(len(order), len(c.layers))
	for j, e := range order {
		for l := range c.layers {
			w.slot(l, j, e)
		}
		w.meta(j, e, c.pos[e])
	}
	return c.apply(w)
}

// apply hands w to the KV hook, after checking that llama.cpp holds the cells the
// engine recorded, and records where the cells went. A sequence with a home is
// written there (rows converted to its layout, a sliding-window model's window
// cache copied along) and leaves the prefill context.
func (c *seqCache) apply(w *rewrite) error {
	if len(w.plan.Sources) != len(c.layers) {
		return fmt.Errorf("kv hook: the plan has %d layers, the cache %d", len(w.plan.Sources), len(c.layers))
	}
	if err := c.checkCells(); err != nil {
		return err
	}
	dst, dstSeq, dstPool := c.lctx, c.seq, c.pool
	if h := c.home; h != nil {
		dst, dstSeq, dstPool = h.lctx, h.seq, h.pool
		dst.SeqClear(dstSeq)
		dstPool.releaseAll(dstSeq)
	}
	first, err := c.lctx.RewriteCells(c.seq, dst, dstSeq, w.plan)
	if err != nil {
		var he *llama.HookError
		if errors.As(err, &he) && he.Invalid() {
			return &InvariantError{What: "cells read back", Detail: he.Msg}
		}
		return err
	}
	if c.lctx.CacheParts() == 2 {
		if err := c.moveWindow(dst, dstSeq); err != nil {
			return err
		}
	}
	c.pool.releaseAll(c.seq)
	if c.home != nil {
		c.lctx, c.seq, c.pool, c.home = dst, dstSeq, dstPool, nil
	}
	cells := make([]int, w.plan.N)
	for j := range cells {
		cells[j] = first + j
	}
	c.pool.assign(c.seq, cells)
	c.cells = cells
	c.pos = slices.Clone(w.plan.Pos)
	return c.checkCells()
}

// moveWindow copies the sequence's sliding-window cache (part 1) into dstSeq of
// dst (which may be where it is), rows unchanged. Its positions follow the full-attention part's: when the
// plan compacted positions (the published code's setting), the window's last cell
// must still sit just before the next token, so every window position moves down
// by the same amount, which keeps the distances the window mask is computed from;
// a cell that would fall below 0 is put at 0 (it stays inside the window, as it
// was).
func (c *seqCache) moveWindow(dst *llama.Context, dstSeq int) error {
	cells, err := c.lctx.SeqCells(1, c.seq)
	if err != nil {
		return err
	}
	layers, err := c.lctx.CacheLayers(1)
	if err != nil || len(cells) == 0 {
		return err
	}
	p := &llama.CellPlan{Part: 1, N: len(cells), First: -1, Sources: make([][][]int, len(layers))}
	for l := range layers {
		for _, cell := range cells {
			p.Sources[l] = append(p.Sources[l], []int{cell.Index})
		}
	}
	last := 0
	for _, cell := range cells {
		last = max(last, cell.Pos)
	}
	down := last + 1 - c.position(c.nPrompt)
	if down == 0 && dst == c.lctx && dstSeq == c.seq {
		return nil // in place, positions unchanged
	}
	for _, cell := range cells {
		p.Meta = append(p.Meta, cell.Index)
		p.Pos = append(p.Pos, max(0, cell.Pos-down))
	}
	_, err = c.lctx.RewriteCells(c.seq, dst, dstSeq, p)
	return err
}

// InvariantError is a broken runtime invariant of the KV hook: what the engine
// captured or holds is not what it must be, so the plan would be built on wrong
// data. The request fails (as an internal error) and the engine counts it.
type InvariantError struct {
	What   string // which invariant: "captured rows", "column sums", "cells read back"
	Detail string
}

func (e *InvariantError) Error() string { return "kv invariant broken: " + e.What + ": " + e.Detail }

// columnSumTolerance bounds |sum_j s_l[j] - N| / N: every captured query row is a
// softmax (it sums to 1, to float32 rounding), so each layer's column sums add up
// to the number of prompt rows; the float32 accumulation over N rows and n_head
// heads loses far less than this.
const columnSumTolerance = 1e-3

// checkCapture verifies, before a plan is built on them, that the attention
// captured for the prompt covers every prompt row once and that each layer's
// columns add up to the number of rows (a silent all-zero or partial capture
// would otherwise look like a valid, uniform ranking).
func (c *seqCache) checkCapture() error {
	if c.scores == nil {
		return nil
	}
	rows := c.nPrompt - c.segFrom // a continued conversation encodes only its new turn
	if c.capturedRows != rows {
		return &InvariantError{What: "captured rows",
			Detail: fmt.Sprintf("%d query rows captured for a prompt of %d tokens", c.capturedRows, rows)}
	}
	n := float64(rows)
	for l, row := range c.scores {
		sum := 0.0
		for _, v := range row {
			sum += float64(v)
		}
		if !(math.Abs(sum-n) <= columnSumTolerance*n) { // also NaN
			return &InvariantError{What: "column sums",
				Detail: fmt.Sprintf("layer %d: captured attention sums to %g over %d prompt rows", l, sum, rows)}
		}
	}
	return nil
}

// checkCells verifies that the cells llama.cpp holds for the sequence (read from
// its cell table) are the ones the engine recorded, at the recorded positions.
func (c *seqCache) checkCells() error {
	got, err := c.lctx.SeqCells(0, c.seq)
	if err != nil {
		return &InvariantError{What: "cells read back", Detail: err.Error()}
	}
	order := make([]int, len(c.cells))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return c.cells[a] - c.cells[b] })
	if len(got) != len(order) {
		return &InvariantError{What: "cells read back",
			Detail: fmt.Sprintf("llama.cpp holds %d cells, the engine recorded %d", len(got), len(order))}
	}
	for k, i := range order {
		if got[k].Index != c.cells[i] || got[k].Pos != c.pos[i] {
			return &InvariantError{What: "cells read back",
				Detail: fmt.Sprintf("cell %d holds position %d, the engine recorded cell %d at %d", got[k].Index, got[k].Pos, c.cells[i], c.pos[i])}
		}
	}
	return nil
}

// afterToken lets the policy act once a generated token is in the cache; T counts
// the tokens processed so far. It evicts at most one entry.
func (c *seqCache) afterToken(T int) error {
	idx, err := c.tracker.AfterDecode(T, len(c.cells), c.step)
	c.step = nil
	c.evicted = -1
	if err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	if idx < 0 {
		return nil
	}
	// By cell: the entries of an M-RoPE image share one position.
	if err := c.lctx.EvictCell(c.seq, c.cells[idx]); err != nil {
		return err
	}
	c.evicted = c.pos[idx]
	c.pool.release(c.cells[idx])
	c.cells = slices.Delete(c.cells, idx, idx+1)
	c.pos = slices.Delete(c.pos, idx, idx+1)
	return nil
}

// free empties the sequence and returns its cells to the pool.
func (c *seqCache) free() {
	c.lctx.SeqClear(c.seq)
	c.pool.releaseAll(c.seq)
	c.cells, c.pos = nil, nil
}

// compressTurn applies the plan of a continued conversation's new turn (see
// elasticcache.Tracker.Continue): the held entries are written back unchanged,
// followed by the turn's kept entries, merged per the plan.
func (c *seqCache) compressTurn() error {
	n := c.nPrompt - c.segFrom
	// Entries: the held ones (the first base, in position order), then the turn's,
	// in prompt order.
	held := make([]int, c.base)
	for i := range held {
		held[i] = i
	}
	slices.SortStableFunc(held, func(a, b int) int { return c.pos[a] - c.pos[b] })
	h := len(held)
	if len(c.cells) != h+n {
		return &InvariantError{What: "cells read back", Detail: fmt.Sprintf("the sequence holds %d entries, %d held and %d of the turn expected", len(c.cells), h, n)}
	}
	var turn, heldScores [][]float32
	if c.scores != nil {
		turn = make([][]float32, len(c.scores))
		for l, row := range c.scores {
			turn[l] = row[c.segFrom:]
		}
		if c.spec.DecodeScores() {
			heldScores = make([][]float32, len(c.scores))
			for l, row := range c.scores {
				heldScores[l] = make([]float32, h)
				for j, e := range held {
					heldScores[l][j] = row[c.promptIndex(e)]
				}
			}
		}
	}
	plan, err := c.tracker.Continue(c.prev, h, n, turn, heldScores, max(c.textFrom-c.segFrom, 0))
	c.scores, c.prev = nil, nil
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	if plan == nil {
		return nil
	}
	c.plan = plan
	w := c.newRewrite(h+plan.K, len(plan.Layers))
	for j, e := range held {
		for l := range plan.Layers {
			w.slot(l, j, e)
		}
		w.meta(j, e, c.pos[e])
	}
	entry := func(j int) int { return h + j } // the entry of the turn's prompt index j
	for l, lp := range plan.Layers {
		for j, k := range lp.Keep {
			var group []int
			if j < len(lp.Groups) {
				for _, g := range lp.Groups[j] {
					group = append(group, entry(g))
				}
			}
			w.slot(l, h+j, entry(k), group...)
		}
	}
	for j, k := range plan.Layers[0].Keep {
		w.meta(h+j, entry(k), c.pos[entry(k)])
	}
	return c.apply(w)
}

// export copies the sequence's cells out of its context (the host tier): part 0's
// in entry order and, for a sliding-window model, its window cache's.
func (c *seqCache) export() (*llama.CellSnapshot, error) {
	cells := [][]int{c.cells}
	if c.lctx.CacheParts() == 2 {
		win, err := c.lctx.SeqCells(1, c.seq)
		if err != nil {
			return nil, err
		}
		idx := make([]int, len(win))
		for i, w := range win {
			idx[i] = w.Index
		}
		cells = append(cells, idx)
	}
	return c.lctx.ExportCells(c.seq, cells)
}

// importSeqCache writes snap's cells (an export) into sequence seq of lctx, which
// holds nothing, and returns their owner under spec, continuing tracker (nil: a
// new one). On error the sequence is left empty.
func importSeqCache(lctx *llama.Context, seq int, pool *cellPool, snap *llama.CellSnapshot, spec elasticcache.Spec,
	tracker *elasticcache.Tracker, layers []int) (*seqCache, error) {
	firsts, err := lctx.ImportCells(seq, snap)
	if err != nil {
		lctx.SeqClear(seq) // a compute failure may have written a part; the sequence held nothing
		return nil, err
	}
	c := &seqCache{lctx: lctx, seq: seq, pool: pool, spec: spec, tracker: tracker, layers: layers, evicted: -1}
	if c.tracker == nil {
		if c.tracker, err = elasticcache.NewTracker(spec, len(layers)); err != nil {
			lctx.SeqClear(seq)
			return nil, err
		}
	}
	for j, cell := range snap.Parts[0].Cells {
		c.cells = append(c.cells, firsts[0]+j)
		c.pos = append(c.pos, cell.Pos)
	}
	c.peak, c.nPrompt = len(c.cells), len(c.cells)
	pool.assign(seq, c.cells)
	if err := c.checkCells(); err != nil {
		c.free()
		return nil, fmt.Errorf("the restored cells disagree: %w", err)
	}
	return c, nil
}
