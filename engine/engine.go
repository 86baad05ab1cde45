// Package engine owns the llama context and its decode loop. One goroutine (Run)
// drives every sequence: it admits requests into free slots, prefills prompts in
// chunks between decode steps, batches the next token of every generating sequence,
// and applies the sequence's cache policy (elasticcache) through the llama KV hook.
package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// Options configures the engine.
type Options struct {
	Parallel int // sequences decoded together (slots)
	CtxSize  int // total KV cells
	// Unified shares all CtxSize cells between the slots, and admits a request when the
	// cells its policy lets it hold fit; otherwise each slot owns CtxSize/Parallel cells.
	Unified    bool
	BatchSize  int // most tokens decoded per llama_decode call
	UBatchSize int
	Threads    int
	FlashAttn  bool // faster attention; policies that need attention scores are refused
	QueueSize  int  // requests waiting for a slot before Submit answers ErrQueueFull
	// AllowBeyondTrain lets generation run past the model's training context.
	AllowBeyondTrain bool
	KVType           string
	Log              zerolog.Logger
	// Observe, when set, is called on the decode loop after each prefill plan and each
	// generation step (tests and diagnostics; it must not block).
	Observe func(Observation)
	// Fault, when set, is asked before each step of a request; an error fails that
	// request as a decode failure would (fault-injection tests).
	Fault func(requestID string) error
}

// Observation describes one sequence's cache right after a step.
type Observation struct {
	Slot      int
	RequestID string
	Prefill   bool // after the prefill plan; otherwise after a decode step
	T         int  // tokens processed (prompt + generated)
	Held      int  // cells the sequence holds
	Attended  int  // attention span (cells, padded) of the last graph
}

// Stats is a snapshot for /metrics.
type Stats struct {
	QueueDepth   int
	SlotsBusy    int
	SlotsTotal   int
	KVCellsUsed  int
	KVCellsTotal int
}

// Engine runs completions on one model.
type Engine struct {
	model  *llama.Model
	vision *llama.Vision
	ctx    *llama.Context
	opts   Options
	log    zerolog.Logger

	queue chan *seq
	wake  chan struct{}

	slots   []*seq // index = llama sequence id; nil when free
	waiting []*seq // taken off the queue, not yet admitted (FIFO)
	pools   []*cellPool
	// reserved cells per pool: what admitted sequences may hold at most
	reserved []int

	tokBatch  *llama.Batch
	embdBatch *llama.Batch

	bytesPerCell int64

	queued    atomic.Int64
	busy      atomic.Int64
	cellsUsed atomic.Int64
	ready     atomic.Bool
	closed    atomic.Bool

	done chan struct{}
}

// New creates the engine and its llama context. vision may be nil (text only).
func New(model *llama.Model, vision *llama.Vision, opts Options) (*Engine, error) {
	if opts.Parallel < 1 {
		opts.Parallel = 1
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 512
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 64
	}
	if opts.CtxSize < opts.Parallel*16 {
		return nil, fmt.Errorf("engine: ctx-size %d is too small for %d slots", opts.CtxSize, opts.Parallel)
	}
	ctx, err := llama.NewContext(model, llama.ContextParams{
		NCtx:      opts.CtxSize,
		NBatch:    opts.BatchSize,
		NUBatch:   opts.UBatchSize,
		NSeqMax:   opts.Parallel,
		Threads:   opts.Threads,
		FlashAttn: opts.FlashAttn,
		Capture:   !opts.FlashAttn,
		Unified:   opts.Unified,
		TypeK:     opts.KVType,
		TypeV:     opts.KVType,
	})
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	info := model.Info()
	elem := int64(2)
	if opts.KVType == "f32" {
		elem = 4
	}
	e := &Engine{
		model:        model,
		vision:       vision,
		ctx:          ctx,
		opts:         opts,
		log:          opts.Log,
		queue:        make(chan *seq, opts.QueueSize),
		wake:         make(chan struct{}, 1),
		slots:        make([]*seq, opts.Parallel),
		tokBatch:     llama.NewBatch(opts.BatchSize, 0, 1),
		bytesPerCell: int64(info.Layers) * 2 * int64(info.KVRowElems) * elem,
		done:         make(chan struct{}),
	}
	if opts.Unified {
		e.pools = []*cellPool{newCellPool(ctx.NCtx(), ctx.Params().NUBatch)}
	} else {
		for range opts.Parallel {
			e.pools = append(e.pools, newCellPool(ctx.NCtxSeq(), ctx.Params().NUBatch))
		}
	}
	e.reserved = make([]int, len(e.pools))
	if vision != nil {
		e.embdBatch = llama.NewBatch(opts.BatchSize, vision.EmbdSize(), 1)
	}
	e.ready.Store(true)
	return e, nil
}

// Close frees the context. Run must have returned.
func (e *Engine) Close() {
	e.tokBatch.Close()
	e.embdBatch.Close()
	e.ctx.Close()
}

// Context exposes the llama context (tests and benchmarks).
func (e *Engine) Context() *llama.Context { return e.ctx }

// Model returns the engine's model.
func (e *Engine) Model() *llama.Model { return e.model }

// HasVision reports whether images are accepted.
func (e *Engine) HasVision() bool { return e.vision != nil }

// SeqCells is the number of cells one slot can hold.
func (e *Engine) SeqCells() int { return e.ctx.NCtxSeq() }

// Ready reports whether the engine accepts work.
func (e *Engine) Ready() bool { return e.ready.Load() && !e.closed.Load() }

// Stats returns a snapshot of queue and cache use.
func (e *Engine) Stats() Stats {
	return Stats{
		QueueDepth:   int(e.queued.Load()),
		SlotsBusy:    int(e.busy.Load()),
		SlotsTotal:   e.opts.Parallel,
		KVCellsUsed:  int(e.cellsUsed.Load()),
		KVCellsTotal: e.ctx.NCtx(),
	}
}

// Submit prepares req (chat template, tokenization, image preprocessing) on the
// caller's goroutine and queues it. Events arrive on the returned channel until one
// has Done set; cancelling ctx stops the request and frees its slot.
func (e *Engine) Submit(ctx context.Context, req *Request) (<-chan Event, error) {
	if e.closed.Load() {
		return nil, ErrShuttingDown
	}
	s, err := e.prepare(req)
	if err != nil {
		return nil, err
	}
	s.ctx = ctx
	out := make(chan Event, 16)
	if e.queued.Add(1) > int64(e.opts.QueueSize) {
		e.queued.Add(-1)
		s.release()
		return nil, ErrQueueFull
	}
	e.queue <- s // never blocks: the channel holds QueueSize and queued bounds it
	e.signal()
	go s.box.forward(ctx, out)
	return out, nil
}

func (e *Engine) signal() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Shutdown stops admitting requests; running and queued ones finish normally.
func (e *Engine) Shutdown() {
	e.closed.Store(true)
	e.signal()
}

// Done is closed when Run has returned.
func (e *Engine) Done() <-chan struct{} { return e.done }

// prepare renders and tokenizes the prompt and checks it fits a slot.
func (e *Engine) prepare(req *Request) (*seq, error) {
	if err := req.Cache.Validate(); err != nil {
		var ce *elasticcache.ConfigError
		if errors.As(err, &ce) {
			return nil, &InputError{Param: "elastic_cache." + ce.Field, Code: "invalid_value", Msg: ce.Error()}
		}
		return nil, &InputError{Param: "elastic_cache", Code: "invalid_value", Msg: err.Error()}
	}
	if e.opts.FlashAttn && req.Cache.NeedsPrefillScores() && req.Cache.Budget < 1 {
		return nil, &InputError{Param: "elastic_cache.policy", Code: "unsupported_policy",
			Msg: fmt.Sprintf("policy %q needs attention scores, which this server (started with --flash-attn) does not compute", req.Cache.Policy)}
	}
	if len(req.Images) > 0 && e.vision == nil {
		return nil, &InputError{Param: "messages", Code: "images_not_supported",
			Msg: "this model has no vision encoder (start the server with --mmproj) and cannot take images"}
	}
	msgs := make([]llama.ChatMessage, len(req.Messages))
	for i, m := range req.Messages {
		msgs[i] = llama.ChatMessage{Role: m.Role, Content: m.Content}
	}
	text, err := e.model.ApplyChatTemplate("", msgs, true)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	s := &seq{req: req, box: newOutbox(), stops: stopScanner{stops: req.Stop}}
	if e.vision != nil && strings.Contains(text, ImageMarker) {
		p, err := e.vision.Tokenize(text, req.Images, true)
		if err != nil {
			if errors.Is(err, llama.ErrBadImage) {
				return nil, &InputError{Param: "messages", Code: "invalid_image", Msg: err.Error()}
			}
			return nil, &InputError{Param: "messages", Code: "invalid_value", Msg: err.Error()}
		}
		s.prompt = p
		for _, c := range p.Chunks {
			s.chunks = append(s.chunks, promptChunk{kind: c.Kind, tokens: c.Tokens, n: c.NTokens, src: c})
		}
	} else {
		if len(req.Images) > 0 {
			return nil, &InputError{Param: "messages", Code: "invalid_value", Msg: "images were given but the rendered prompt has no place for them"}
		}
		toks, err := e.model.Tokenize(text, true, true)
		if err != nil {
			return nil, &InputError{Param: "messages", Code: "invalid_value", Msg: err.Error()}
		}
		s.chunks = []promptChunk{{kind: llama.ChunkText, tokens: toks, n: len(toks)}}
	}
	for _, c := range s.chunks {
		s.nPrompt += c.n
	}
	if s.nPrompt == 0 {
		s.release()
		return nil, &InputError{Param: "messages", Code: "invalid_value", Msg: "the prompt is empty"}
	}
	if limit := e.pools[0].size() - 1; s.nPrompt > limit {
		s.release()
		return nil, PromptTooLong(s.nPrompt, limit)
	}
	return s, nil
}

// Run is the decode loop. It returns when ctx ends or, after Shutdown, when every
// request has finished.
func (e *Engine) Run(ctx context.Context) {
	defer close(e.done)
	defer e.ready.Store(false)
	for {
		e.admit()
		active := e.activeCount()
		if active == 0 {
			if e.closed.Load() && len(e.queue) == 0 && len(e.waiting) == 0 {
				return
			}
			select {
			case <-ctx.Done():
				e.failAll(ErrShuttingDown)
				return
			case <-e.wake:
			}
			continue
		}
		if ctx.Err() != nil {
			e.failAll(ErrShuttingDown)
			return
		}
		e.reapCancelled()
		e.prefillStep()
		e.decodeStep()
		e.updateCells()
	}
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
			e.dropWaiting(Event{Done: true, Err: s.ctx.Err()})
			continue
		}
		slot := -1
		for i := range e.slots {
			if e.slots[i] == nil {
				slot = i
				break
			}
		}
		if slot < 0 {
			return
		}
		pi := e.poolOf(slot)
		e.plan(s, e.pools[pi].size())
		if e.reserved[pi]+s.reserve > e.pools[pi].size() {
			return // wait for cells to be released
		}
		e.waiting = e.waiting[1:]
		e.queued.Add(-1)
		if err := e.start(slot, s); err != nil {
			s.box.push(Event{Done: true, Err: err})
			s.release()
			continue
		}
		s.pool = e.pools[pi]
		e.reserved[pi] += s.reserve
		e.slots[slot] = s
		e.busy.Add(1)
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

func (e *Engine) dropWaiting(ev Event) {
	s := e.waiting[0]
	e.waiting = e.waiting[1:]
	e.queued.Add(-1)
	s.box.push(ev)
	s.release()
}

func (e *Engine) poolOf(slot int) int {
	if len(e.pools) == 1 {
		return 0
	}
	return slot
}

// plan fixes how many tokens s may generate and how many cells that needs at most
// under its policy: the whole prompt while it is encoded, then ceil(b*T)+1.
func (e *Engine) plan(s *seq, poolSize int) {
	n := s.nPrompt
	perSlot := e.ctx.NCtx() / e.opts.Parallel
	g := s.req.MaxTokens
	if g <= 0 {
		g = max(perSlot-n, 1) // llama-server's default: until the slot's context is full
	}
	if lim := e.model.Info().CtxTrain - n; lim > 0 && !e.opts.AllowBeyondTrain {
		g = min(g, lim)
	}
	need := func(g int) int {
		if s.req.Cache.Policy == elasticcache.Full || s.req.Cache.Budget >= 1 {
			return n + g
		}
		return max(n, s.req.Cache.KeepCount(n+g)+1)
	}
	for g > 1 && need(g) > poolSize {
		// Shrink G until the reservation fits the pool: big steps while far over, then by one.
		over := need(g) - poolSize
		g -= max(1, min(over, g-1))
	}
	s.maxGen = max(g, 1)
	s.reserve = min(need(s.maxGen), poolSize)
}

func (e *Engine) start(id int, s *seq) error {
	tr, err := elasticcache.NewTracker(s.req.Cache, e.model.Info().Layers)
	if err != nil {
		return err
	}
	s.id = id
	s.tracker = tr
	s.sampler = llama.NewSampler(llama.SamplerParams(s.req.Sampling))
	s.started = time.Now()
	e.ctx.SeqClear(id)
	return nil
}

// reapCancelled ends requests whose client is gone or whose deadline passed.
func (e *Engine) reapCancelled() {
	for i, s := range e.slots {
		if s != nil && s.ctx.Err() != nil {
			e.finish(i, Event{Done: true, Err: s.ctx.Err()})
		}
	}
	kept := e.waiting[:0]
	for _, s := range e.waiting {
		if s.ctx.Err() != nil {
			e.queued.Add(-1)
			s.box.push(Event{Done: true, Err: s.ctx.Err()})
			s.release()
			continue
		}
		kept = append(kept, s)
	}
	e.waiting = kept
}

func (e *Engine) failAll(err error) {
	for i, s := range e.slots {
		if s != nil {
			e.finish(i, Event{Done: true, Err: err})
		}
	}
	e.drainQueue()
	for len(e.waiting) > 0 {
		e.dropWaiting(Event{Done: true, Err: err})
	}
}

// finish sends the final event, frees the slot's cells and its C objects.
func (e *Engine) finish(i int, ev Event) {
	s := e.slots[i]
	if ev.Err == nil && !s.stopHit {
		// Release text held back for a possible stop string or an unfinished character.
		txt, hit := s.stops.add(s.utf8.Flush())
		if !hit {
			txt += s.stops.flush()
		}
		if txt != "" {
			s.box.push(Event{Text: txt})
		}
	}
	ev.NLL, ev.NLLTokens = s.nll, s.nllN
	ev.Usage = Usage{PromptTokens: s.nPrompt, CompletionTokens: s.nGen, TotalTokens: s.nPrompt + s.nGen}
	ev.KV = e.report(s)
	s.box.push(ev)
	e.ctx.SeqClear(i)
	if s.pool != nil {
		s.pool.releaseAll(i)
		e.reserved[e.poolOf(i)] -= s.reserve
	}
	s.release()
	e.slots[i] = nil
	e.busy.Add(-1)
}

func (e *Engine) report(s *seq) *KVReport {
	st := s.tracker.Stats()
	total := s.nPast
	held := len(s.entryCell)
	r := &KVReport{
		Policy:        string(s.req.Cache.Policy),
		Budget:        reportBudget(s.req.Cache),
		PromptEntries: s.nPrompt,
		Kept:          st.Kept,
		Merged:        st.Merged,
		Evicted:       st.Evicted,
		PeakCells:     s.peakCells,
		FinalCells:    held,
		PrefillMs:     ms(s.prefillDur),
		CompressMs:    ms(s.compressDur),
	}
	if !s.decodeStart.IsZero() {
		r.DecodeMs = ms(time.Since(s.decodeStart))
	}
	if total > held {
		r.BytesSaved = int64(total-held) * e.bytesPerCell
	}
	return r
}

func (e *Engine) updateCells() {
	n := 0
	for _, s := range e.slots {
		if s != nil {
			n += len(s.entryCell)
		}
	}
	e.cellsUsed.Store(int64(n))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// placeBatch records where llama.cpp put the tokens of the batch just decoded: ids
// holds each token's sequence in batch order. Each pool places its own tokens in order.
func (e *Engine) placeBatch(ids []int) ([]int, error) {
	cells := make([]int, len(ids))
	for pi, p := range e.pools {
		var idx, seqs []int
		for i, id := range ids {
			if e.poolOf(id) == pi {
				idx = append(idx, i)
				seqs = append(seqs, id)
			}
		}
		if len(seqs) == 0 {
			continue
		}
		got, ok := p.place(seqs)
		if !ok {
			return nil, errors.New("engine: cell bookkeeping found no free cell where llama.cpp did")
		}
		for k, i := range idx {
			cells[i] = got[k]
		}
	}
	return cells, nil
}

// reportBudget is the budget in effect: full keeps everything whatever was configured.
func reportBudget(c elasticcache.Config) float64 {
	if c.Policy == elasticcache.Full {
		return 1
	}
	return c.Budget
}
