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
func newSeqCache(lctx *llama.Context, seq int, pool *cellPool, spec elasticcache.Spec, nLayers, nPrompt, textFrom int) (*seqCache, error) {
	tr, err := elasticcache.NewTracker(spec, nLayers)
	if err != nil {
		return nil, err
	}
	tr.SetTextTail(textFrom)
	lctx.SeqClear(seq)
	c := &seqCache{lctx: lctx, seq: seq, pool: pool, spec: spec, tracker: tr, nPrompt: nPrompt, textFrom: textFrom}
	if spec.PrefillScores() {
		c.scores = make([][]float32, nLayers)
		for l := range c.scores {
			c.scores[l] = make([]float32, nPrompt)
		}
	}
	return c, nil
}

// continueSeqCache turns held, a finished sequence whose cells hold positions
// 0..n-1 uncompressed, into the cache of a new request under spec whose prompt
// (nPrompt positions) starts with the same first common entries: the cells from
// position common on are removed, the rest stay, and the new request's prompt is
// encoded from common.
func continueSeqCache(held *seqCache, spec elasticcache.Spec, nLayers, nPrompt, textFrom, common int) (*seqCache, error) {
	if spec.PrefillScores() {
		// Its plan ranks every prompt entry by the attention of every prompt query;
		// the held entries' queries are not encoded again.
		return nil, fmt.Errorf("engine: a %s plan cannot continue held cells", spec.Policy())
	}
	tr, err := elasticcache.NewTracker(spec, nLayers)
	if err != nil {
		return nil, err
	}
	tr.SetTextTail(textFrom)
	if !held.lctx.SeqRemove(held.seq, common, -1) {
		return nil, fmt.Errorf("engine: could not remove positions from %d of sequence %d", common, held.seq)
	}
	c := &seqCache{lctx: held.lctx, seq: held.seq, pool: held.pool, spec: spec, tracker: tr, nPrompt: nPrompt, evicted: -1}
	for i, p := range held.pos {
		if p < common {
			c.cells = append(c.cells, held.cells[i])
			c.pos = append(c.pos, p)
		} else {
			c.pool.release(held.cells[i])
		}
	}
	c.peak = len(c.cells)
	return c, nil
}

// continueCompressed turns held, a finished conversation that its policy
// compressed, into the cache of the request that continues it exactly under the
// same setting: every held cell stays, and the new turn's nPrompt-from entries
// are encoded from position from and planned on their own (compressTurn).
func continueCompressed(held *seqCache, spec elasticcache.Spec, nLayers, nPrompt, textFrom, from int) (*seqCache, error) {
	if spec != held.spec {
		return nil, fmt.Errorf("engine: a conversation compressed under %s continues only under it", held.spec.Policy())
	}
	tr, err := elasticcache.NewTracker(spec, nLayers)
	if err != nil {
		return nil, err
	}
	if slices.Max(held.pos) >= from {
		return nil, fmt.Errorf("engine: held entries reach position %d, the new turn starts at %d", slices.Max(held.pos), from)
	}
	c := &seqCache{lctx: held.lctx, seq: held.seq, pool: held.pool, spec: spec, tracker: tr, nPrompt: nPrompt,
		evicted: -1, prev: held.tracker, segFrom: from, textFrom: textFrom,
		cells: slices.Clone(held.cells), pos: slices.Clone(held.pos)}
	c.peak = len(c.cells)
	if spec.PrefillScores() {
		c.scores = make([][]float32, nLayers)
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

// decode runs b, which holds only this sequence's tokens, at positions pos0..,
// records their cells, and captures their attention when the policy reads it in
// this phase (prompt or generation).
func (c *seqCache) decode(b *llama.Batch, pos0 int, prompt bool) error {
	capture := (prompt && c.scores != nil) || (!prompt && c.spec.DecodeScores())
	if capture {
		c.lctx.CaptureReset()
		c.lctx.CaptureEnable(true)
	}
	err := c.lctx.Decode(b)
	if capture {
		c.lctx.CaptureEnable(false)
	}
	if err != nil {
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
	sums, err := c.lctx.CaptureSums(slices.Max(c.cells) + 1)
	if err != nil {
		return err
	}
	if prompt {
		c.capturedRows += c.lctx.CaptureRows()
		for l := range sums {
			for i, cell := range c.cells {
				c.scores[l][c.pos[i]] += sums[l][cell]
			}
		}
		return nil
	}
	c.takeStep(sums)
	return nil
}

// takeStep keeps this decode step's attention per held entry from the captured
// column sums (per layer, indexed by cell). In a batch of several sequences on one
// unified cache each query row attends only its own sequence's cells, so a cell's
// sum comes from its own sequence's query alone.
func (c *seqCache) takeStep(sums [][]float32) {
	c.step = make([][]float32, len(sums))
	for l := range sums {
		c.step[l] = make([]float32, len(c.cells))
		for i, cell := range c.cells {
			c.step[l][i] = sums[l][cell]
		}
	}
}

var errBookkeeping = errors.New("cell bookkeeping found no free cell where llama.cpp did")

// placed records that the token at pos went into cell.
func (c *seqCache) placed(cell, pos int) {
	c.cells = append(c.cells, cell)
	c.pos = append(c.pos, pos)
	c.peak = max(c.peak, len(c.cells))
}

// compress applies the prompt plan once all nPrompt prompt entries are in the
// cache: every layer keeps K entries (merged per the plan), written back as K
// contiguous cells. Whatever the hook does not fully understand (cell count,
// layers, layout) is refused before the sequence is written.
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
	src, plan, err := c.readFor(plan, c.nPrompt)
	if err != nil {
		return err
	}
	cellOf := make([]int, c.nPrompt) // prompt position -> cell in src (state order)
	for i, p := range src.Pos {
		if int(p) >= c.nPrompt {
			return fmt.Errorf("kv hook: unexpected position %d in the cache", p)
		}
		cellOf[p] = i
	}
	dst := llama.NewSeqCacheLike(src, plan.K)
	elasticcache.Merge(plan, seqStore{src}, seqStore{dst}, cellOf)
	// Positions written back: layer 0's kept positions (see the type's comment), or
	// 0..K-1 when the setting reproduces the published code's compacted positions.
	keep := slices.Clone(plan.Layers[0].Keep)
	if c.spec.CompactPositions() {
		for i := range keep {
			keep[i] = i
		}
		c.shift = c.nPrompt - plan.K
	}
	return c.writeBack(dst, keep)
}

// readFor records plan as applied, reads the sequence's cells for it and checks,
// before anything is written, that they are the cells the engine recorded,
// in the plan's layers (for a sliding-window model, the plan of its full-attention
// layers, which readFor returns).
func (c *seqCache) readFor(plan *elasticcache.PrefillPlan, cells int) (*llama.SeqCache, *elasticcache.PrefillPlan, error) {
	c.plan = plan
	src, err := c.lctx.ReadSeqCache(c.seq)
	if err != nil {
		return nil, nil, err
	}
	plan = cachePlan(plan, src)
	if src.Cells() != cells || len(src.K) != len(plan.Layers) {
		return nil, nil, fmt.Errorf("kv hook: the sequence holds %d cells in %d layers, the plan is for %d in %d",
			src.Cells(), len(src.K), cells, len(plan.Layers))
	}
	if err := c.checkView(src.Pos); err != nil {
		return nil, nil, err
	}
	return src, plan, nil
}

// moveHome moves the sequence's cells unchanged into its home (nothing to do
// without one): a prompt the plan left as it was still decodes there.
func (c *seqCache) moveHome() error {
	if c.home == nil {
		return nil
	}
	src, err := c.lctx.ReadSeqCache(c.seq)
	if err != nil {
		return err
	}
	if err := c.checkView(src.Pos); err != nil {
		return err
	}
	keep := make([]int, len(src.Pos))
	for i, p := range src.Pos {
		keep[i] = int(p)
	}
	return c.writeBack(src, keep)
}

// writeBack replaces the sequence's cells with dst, whose rows hold the entries
// at positions keep (ascending), and records where llama.cpp put them. A sequence
// with a home is written there (rows converted to its layout) and leaves the
// prefill context.
func (c *seqCache) writeBack(dst *llama.SeqCache, keep []int) error {
	for i, p := range keep {
		dst.Pos[i] = int32(p)
	}
	if h := c.home; h != nil {
		c.home = nil
		c.lctx.SeqClear(c.seq)
		c.pool.releaseAll(c.seq)
		c.lctx, c.seq, c.pool = h.lctx, h.seq, h.pool
		dst = dst.Convert(c.lctx.KVLayout())
		// The state names the streams of the context it is restored into.
		for part := dst; part != nil; part = part.SWA {
			part.NStream, part.Stream = h.nStream, h.seq
		}
	}
	if err := c.lctx.WriteSeqCache(c.seq, dst); err != nil {
		return err
	}
	if lo, hi := c.lctx.SeqPosMin(c.seq), c.lctx.SeqPosMax(c.seq); lo != keep[0] || hi != keep[len(keep)-1] {
		return &InvariantError{What: "cells read back",
			Detail: fmt.Sprintf("after the rewrite the sequence spans positions [%d, %d], the plan wrote [%d, %d]", lo, hi, keep[0], keep[len(keep)-1])}
	}
	// llama.cpp removed the sequence, then placed the rows as one ubatch.
	c.pool.releaseAll(c.seq)
	cells, ok := c.pool.placeUBatch(slices.Repeat([]int{c.seq}, len(keep)))
	if !ok {
		return errBookkeeping
	}
	c.cells = append(c.cells[:0], cells...)
	c.pos = append(c.pos[:0], keep...)
	return nil
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

// checkView verifies that the cells llama.cpp holds for the sequence (positions
// in cell order, as read from its state) are the ones the engine recorded.
func (c *seqCache) checkView(cellPos []int32) error {
	order := make([]int, len(c.cells))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return c.cells[a] - c.cells[b] })
	if len(cellPos) != len(order) {
		return &InvariantError{What: "cells read back",
			Detail: fmt.Sprintf("llama.cpp holds %d cells, the engine recorded %d", len(cellPos), len(order))}
	}
	for k, i := range order {
		if int(cellPos[k]) != c.pos[i] {
			return &InvariantError{What: "cells read back",
				Detail: fmt.Sprintf("cell-order entry %d holds position %d, the engine recorded %d", k, cellPos[k], c.pos[i])}
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
	pos := c.pos[idx]
	c.evicted = pos
	c.pool.release(c.cells[idx])
	c.cells = slices.Delete(c.cells, idx, idx+1)
	c.pos = slices.Delete(c.pos, idx, idx+1)
	if !c.lctx.SeqRemove(c.seq, pos, pos+1) {
		return fmt.Errorf("could not evict position %d", pos)
	}
	return nil
}

// free empties the sequence and returns its cells to the pool.
func (c *seqCache) free() {
	c.lctx.SeqClear(c.seq)
	c.pool.releaseAll(c.seq)
	c.cells, c.pos = nil, nil
}

// seqStore and layerRows show a llama.SeqCache to elasticcache.Merge.
type seqStore struct{ *llama.SeqCache }

func (s seqStore) Layers() int { return len(s.K) }

func (s seqStore) Keys(l int) elasticcache.Rows { return layerRows{&s.SeqCache.K[l], s.Cells()} }

func (s seqStore) Values(l int) elasticcache.Rows { return layerRows{&s.SeqCache.V[l], s.Cells()} }

type layerRows struct {
	lr    *llama.LayerRows
	cells int
}

var _ elasticcache.Store = seqStore{}

func (r layerRows) Row(c int, dst []float32) { r.lr.Row(r.cells, c, dst) }

func (r layerRows) SetRow(c int, src []float32) { r.lr.SetRow(r.cells, c, src) }

func (r layerRows) CopyRow(c int, src elasticcache.Rows, from int) {
	s := src.(layerRows)
	r.lr.CopyRow(r.cells, c, s.lr, s.cells, from)
}

func (r layerRows) Width() int { return r.lr.RowElems }

// compressTurn applies the plan of a continued conversation's new turn (see
// elasticcache.Tracker.Continue): the held entries are written back unchanged,
// followed by the turn's kept entries, merged per the plan.
func (c *seqCache) compressTurn() error {
	n := c.nPrompt - c.segFrom
	var heldPos []int
	for _, p := range c.pos {
		if p < c.segFrom {
			heldPos = append(heldPos, p)
		}
	}
	slices.Sort(heldPos)
	var turn, heldScores [][]float32
	if c.scores != nil {
		turn = make([][]float32, len(c.scores))
		for l, row := range c.scores {
			turn[l] = row[c.segFrom:]
		}
		if c.spec.DecodeScores() {
			heldScores = make([][]float32, len(c.scores))
			for l, row := range c.scores {
				heldScores[l] = make([]float32, len(heldPos))
				for i, p := range heldPos {
					heldScores[l][i] = row[p]
				}
			}
		}
	}
	plan, err := c.tracker.Continue(c.prev, len(heldPos), n, turn, heldScores, max(c.textFrom-c.segFrom, 0))
	c.scores, c.prev = nil, nil
	if err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	if plan == nil {
		return nil
	}
	src, plan, err := c.readFor(plan, len(heldPos)+n)
	if err != nil {
		return err
	}
	cellOf := make(map[int]int, src.Cells()) // position -> cell in src (state order)
	for i, p := range src.Pos {
		cellOf[int(p)] = i
	}
	turnCell := make([]int, n)
	for j := range turnCell {
		i, ok := cellOf[c.segFrom+j]
		if !ok {
			return fmt.Errorf("kv hook: position %d of the new turn is not in the cache", c.segFrom+j)
		}
		turnCell[j] = i
	}
	h := len(heldPos)
	dst := llama.NewSeqCacheLike(src, h+plan.K)
	from, to := seqStore{src}, seqStore{dst}
	for i, p := range heldPos {
		for l := range dst.K {
			to.Keys(l).CopyRow(i, from.Keys(l), cellOf[p])
			to.Values(l).CopyRow(i, from.Values(l), cellOf[p])
		}
	}
	elasticcache.Merge(plan, from, offsetStore{to, h}, turnCell)
	keep := slices.Clone(heldPos)
	for _, j := range plan.Layers[0].Keep {
		keep = append(keep, c.segFrom+j)
	}
	return c.writeBack(dst, keep)
}

// offsetStore shows a Store whose rows start at cell off, so that a plan's K rows
// land after the held entries.
type offsetStore struct {
	seqStore
	off int
}

func (s offsetStore) Keys(l int) elasticcache.Rows {
	return offsetRows{s.seqStore.Keys(l).(layerRows), s.off}
}

func (s offsetStore) Values(l int) elasticcache.Rows {
	return offsetRows{s.seqStore.Values(l).(layerRows), s.off}
}

type offsetRows struct {
	layerRows
	off int
}

func (r offsetRows) Row(c int, dst []float32) { r.layerRows.Row(c+r.off, dst) }

func (r offsetRows) SetRow(c int, src []float32) { r.layerRows.SetRow(c+r.off, src) }

func (r offsetRows) CopyRow(c int, src elasticcache.Rows, from int) {
	r.layerRows.CopyRow(c+r.off, src, from)
}
