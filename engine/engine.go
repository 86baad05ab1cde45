// Package engine owns the llama context and its decode loop. One goroutine drives
// every sequence: it admits requests into free slots, prefills prompts in chunks
// between decode steps, batches the next token of every generating sequence, and
// lets each sequence's cache owner (seqCache) apply its policy through the KV hook.
//
// Lifecycle: Start creates the context and starts the loop; Submit (or Complete)
// runs requests from any goroutine; Stop drains, stops the loop and frees the
// context. The server, the eval tool, the demo tools and the tests all use this.
package engine

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
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
	// KVType is the cache's row type: f16, bf16, f32, q8_0 or q4_0. K is stored in
	// it always; V only where flash attention is on (llama.cpp quantizes V only
	// then), f16 elsewhere.
	KVType string
	// PrefillCtx, when > 0, gives the engine a second llama context in which
	// prompts of compressing policies are encoded (attention captured), each in a
	// stream of PrefillCtx cells, then compressed and moved into their slot's stream
	// of the decode context, so that each stream needs only what a compressed
	// conversation holds. It needs per-slot streams (Unified false). 0: one
	// context; prompts are encoded where they decode.
	PrefillCtx int
	// PrefillStreams is how many prompts the prefill context holds at once, each in
	// its own stream of PrefillCtx cells (0: 1; at most Parallel). While nothing
	// generates, their text chunks share calls as the decode context's prompts do.
	PrefillStreams int
	// PrefillChunk is how many prompt tokens a loop turn encodes while other
	// sequences are generating (they wait for the call); 0 sizes it from measured
	// times, so that a stream's gap between tokens stays near two decode steps
	// (see pacer). With nothing generating, prompts go in BatchSize pieces.
	PrefillChunk int
	// DecodeFlashAttn turns flash attention on in the decode context only (with
	// PrefillCtx > 0): prompts are still encoded without it, so elastic and local
	// run; h2o, which reads attention at every decode step, is refused.
	DecodeFlashAttn bool
	// Reuse keeps a finished request's cells in its slot (until the slot or the cells
	// are needed) so that a later prompt that starts the same way continues from them
	// instead of encoding that part again. Requests may opt out (Request.Reuse).
	Reuse bool
	// ReuseCompressed also lets a request continue a held conversation that its
	// policy compressed, when it continues that conversation exactly under the same
	// setting: only the new turn is encoded and compressed (see
	// elasticcache.Tracker.Continue). Requests may ask for it (Request.Reuse true)
	// or refuse it either way.
	ReuseCompressed bool
	// ImageCacheBytes bounds the encoded images kept by content, so that a picture
	// sent again is not encoded again; 0 keeps none.
	ImageCacheBytes int64
	// HostCacheBytes bounds the host tier: held conversations that lose their slot
	// are copied to host memory (compressed ones compressed), least recently used
	// out first, and a later turn that continues one is restored into its slot's
	// stream instead of being encoded again. 0 turns it off. Needs Reuse.
	HostCacheBytes int64
	// CacheDir, when set, keeps conversations in files there so that they survive
	// a restart (the disk tier): those that leave the host tier (or their slot,
	// with the host tier off), and at Stop every conversation held in a slot or in
	// host memory. CacheDirBytes bounds the directory (0: unbounded). ModelID names
	// the model the files belong to (ModelIdentity of its GGUF files); a file of
	// another model is never read. A directory that cannot be used (another server
	// holds it, it cannot be created) leaves the tier off, logged (Stats.DiskCacheOff).
	CacheDir      string
	CacheDirBytes int64
	ModelID       [32]byte
	Log           zerolog.Logger
	// Observe, when set, is called on the decode loop after each prefill plan and each
	// generation step (tests and diagnostics; it must not block).
	Observe func(Observation)
	// Fault, when set, is asked before each step of a request; an error fails that
	// request as a decode failure would, and a panic as any panic in the engine's work
	// on one request would (fault-injection tests).
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
	// Plan is the prompt plan just applied (prefill observations only; nil when the
	// policy left the cache as it was). Read-only.
	Plan *elasticcache.PrefillPlan
	// Evicted is the position of the entry this decode step evicted, -1 for none.
	// Under Spec.CompactPositions, positions of kept prompt entries are their
	// indices 0..K-1, not their prompt positions.
	Evicted int
}

// cachePolicies (elasticcache.Policies, the one list) indexes Engine.policyCells:
// a fixed array lets the loop publish per-policy use every step without allocating.
var cachePolicies = elasticcache.Policies

// Engine runs completions on one model. Its fields are grouped by concern: the
// llama contexts, the requests' intake and lifecycle, the slots and their cells,
// the conversation memory beyond the slots, and the counters read by Stats.
type Engine struct {
	contexts
	intake
	slotTable
	memory
	counters

	pace *pacer // sizes prompt work per loop turn (decode loop only)
	opts Options
	log  zerolog.Logger

	// beforeCompress, when set (tests only), sees a sequence's cache right before its
	// prompt plan, on the decode loop.
	beforeCompress func(*seqCache)
	// onState, when set (tests only), sees every change of a request's state
	// (setState), on the goroutine that makes it.
	onState func(s *seq, from, to reqState)

	traces explainTraces // requests that asked for kv_cache.explain (explain.go)
}

// contexts are the model and its llama contexts, owned by the decode loop.
type contexts struct {
	model  *llama.Model
	vision *llama.Vision
	ctx    *llama.Context // the decode context
	// pctx is the prefill context (Options.PrefillCtx; nil without one): a prompt
	// in each of its Options.PrefillStreams streams (sequence id = stream); ppools
	// mirror each stream's cells.
	pctx *llama.Context
	// threads: the CPU threads ctx and pctx share (nil without a prefill context).
	threads *llama.ThreadPool
	ppools  []*cellPool
	// cacheLayers are the model layers of the cache the KV hook rewrites (part 0).
	cacheLayers []int

	tokBatch  *llama.Batch
	embdBatch *llama.Batch

	bytesPerCell int64
	nCtx         int
	seqCells     int
}

// intake is how requests enter (Submit) and how the loop starts and stops.
type intake struct {
	// mu orders Submit's enqueue against Stop: once closed is set, nothing more
	// enters the queue, so the loop's last drain sees every request.
	mu      sync.Mutex
	closed  bool
	queue   chan *seq
	wake    chan struct{}
	waiting []*seq // taken off the queue, not yet admitted (FIFO; decode loop)
	running atomic.Bool

	cancel   context.CancelFunc
	done     chan struct{}
	freeOnce sync.Once
}

// slotTable is the slots, the cells of their streams and what is reserved there
// (decode loop only).
type slotTable struct {
	slots []*seq     // index = llama sequence id; nil when free
	held  []*heldSeq // index = slot: a finished sequence kept for reuse, or nil
	clock uint64     // orders held sequences by last use
	pools []*cellPool
	// reserved cells per pool: what admitted sequences may hold at most
	reserved []int
}

// memory is what the engine keeps beyond the slots: image embeddings and held
// conversations in host memory and in files.
type memory struct {
	images  *imageCache
	host    *hostTier // held conversations out of their slots (loop goroutine; counters atomic)
	disk    *diskTier // conversations in files (nil: off); see diskTier for its locking
	diskOff bool      // CacheDir was set but could not be used
}

// counters are the gauges and counters Stats reads from any goroutine.
type counters struct {
	queued    atomic.Int64
	busy      atomic.Int64
	cellsUsed atomic.Int64
	// policyCells[i]: cells held by sequences running cachePolicies[i]
	policyCells [len(cachePolicies)]atomic.Int64
	broken      atomic.Int64 // KV invariant failures
	cellsHeld   atomic.Int64
	reuseHits   atomic.Int64
	reuseMisses atomic.Int64
	reusedToks  atomic.Int64
	reclaimed   atomic.Int64
	imageHits   atomic.Int64
	imageEncs   atomic.Int64
	promptCalls atomic.Int64 // llama_decode calls that encoded prompt entries
	// widestPromptCall is the most prompts one call has encoded (prefillTogether)
	widestPromptCall atomic.Int64
	// widestDecodeCall is the most sequences one decode step has carried
	widestDecodeCall atomic.Int64
}

// Start creates the engine's llama context on model and starts its decode loop.
// vision may be nil (text only). Stop it with Stop.
func Start(model *llama.Model, vision *llama.Vision, opts Options) (*Engine, error) {
	e, err := newEngine(model, vision, opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.running.Store(true)
	go e.run(ctx)
	return e, nil
}

func newEngine(model *llama.Model, vision *llama.Vision, opts Options) (*Engine, error) {
	opts, err := opts.settle()
	if err != nil {
		return nil, err
	}
	ctx, pctx, pool, cacheLayers, err := openContexts(model, opts)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		contexts: contexts{
			model:        model,
			vision:       vision,
			ctx:          ctx,
			pctx:         pctx,
			threads:      pool,
			cacheLayers:  cacheLayers,
			tokBatch:     llama.NewBatch(opts.BatchSize, 0, 1),
			bytesPerCell: ctx.KVBytesPerCell(),
			nCtx:         ctx.NCtx(),
			seqCells:     ctx.NCtxSeq(),
		},
		intake: intake{
			queue: make(chan *seq, opts.QueueSize),
			wake:  make(chan struct{}, 1),
			done:  make(chan struct{}),
		},
		slotTable: slotTable{
			slots: make([]*seq, opts.Parallel),
			held:  make([]*heldSeq, opts.Parallel),
		},
		memory: memory{
			images: newImageCache(opts.ImageCacheBytes),
			host:   &hostTier{limit: opts.HostCacheBytes},
		},
		pace: newPacer(opts.BatchSize, opts.PrefillChunk),
		opts: opts,
		log:  opts.Log,
	}
	e.opts.Observe = e.observer(opts.Observe)
	if opts.Unified {
		e.pools = []*cellPool{newCellPool(e.nCtx, ctx.Params().NUBatch)}
	} else {
		for range opts.Parallel {
			e.pools = append(e.pools, newCellPool(e.seqCells, ctx.Params().NUBatch))
		}
	}
	e.reserved = make([]int, len(e.pools))
	if pctx != nil {
		for range opts.PrefillStreams {
			e.ppools = append(e.ppools, newCellPool(pctx.NCtxSeq(), pctx.Params().NUBatch))
		}
	}
	e.openDisk()
	if vision != nil {
		e.embdBatch = llama.NewBatch(opts.BatchSize, vision.EmbdSize(), 1)
		if vision.MRoPE() {
			e.embdBatch.Close()
			e.embdBatch = llama.NewBatchMRoPE(opts.BatchSize, vision.EmbdSize(), 1)
		}
	}
	return e, nil
}

// settle fills the options left zero with their defaults and refuses the
// combinations the engine cannot run.
func (opts Options) settle() (Options, error) {
	if opts.Parallel < 1 {
		opts.Parallel = 1
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 512
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 64
	}
	if opts.Threads <= 0 {
		// llama.cpp's own default (4) spins more threads than a small machine has
		// cores, which stalls every step at ggml's barriers.
		opts.Threads = runtime.GOMAXPROCS(0) // Go sets it from the cgroup CPU quota
	}
	if opts.CtxSize < opts.Parallel*16 {
		return opts, fmt.Errorf("engine: ctx-size %d is too small for %d slots", opts.CtxSize, opts.Parallel)
	}
	if opts.PrefillCtx > 0 && opts.Unified {
		return opts, fmt.Errorf("engine: a prefill context needs per-slot streams (not a unified cache)")
	}
	if opts.DecodeFlashAttn && opts.PrefillCtx <= 0 {
		return opts, fmt.Errorf("engine: decode-only flash attention needs a prefill context")
	}
	if opts.PrefillStreams > 1 && opts.PrefillCtx <= 0 {
		return opts, fmt.Errorf("engine: %d prefill streams without a prefill context", opts.PrefillStreams)
	}
	// a prompt in the prefill context holds a slot: more streams than slots stay empty
	opts.PrefillStreams = min(max(opts.PrefillStreams, 1), opts.Parallel)
	return opts, nil
}

// openDisk turns the disk tier on (Options.CacheDir); a directory that cannot be
// used leaves it off, logged (Stats.DiskCacheOff).
func (e *Engine) openDisk() {
	opts := e.opts
	if opts.CacheDir == "" {
		return
	}
	d, err := openDiskTier(opts.CacheDir, opts.CacheDirBytes, opts.ModelID, opts.Log)
	if err != nil {
		e.diskOff = true
		opts.Log.Warn().Err(err).Str("dir", opts.CacheDir).Msg("disk tier off: the cache directory cannot be used")
		return
	}
	e.disk = d
	e.host.spill = d.put
}

// openContexts creates the decode context and, with Options.PrefillCtx, the
// prefill context on one shared thread pool (see llama.ThreadPool), and reads the
// layers the KV hook rewrites (a sliding-window model's full-attention ones). On
// error nothing it made is left open.
func openContexts(model *llama.Model, opts Options) (ctx, pctx *llama.Context, pool *llama.ThreadPool, layers []int, err error) {
	defer func() {
		if err != nil {
			ctx.Close()
			pctx.Close()
			pool.Close()
			ctx, pctx, pool = nil, nil, nil
		}
	}()
	decodeFA := opts.FlashAttn || opts.DecodeFlashAttn
	ctx, err = llama.NewContext(model, llama.ContextParams{
		NCtx:      opts.CtxSize,
		NBatch:    opts.BatchSize,
		NUBatch:   opts.UBatchSize,
		NSeqMax:   opts.Parallel,
		Threads:   opts.Threads,
		FlashAttn: decodeFA,
		Capture:   !decodeFA,
		Unified:   opts.Unified,
		TypeK:     opts.KVType,
		TypeV:     valueType(opts.KVType, decodeFA),
	})
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("engine: %w", err)
	}
	if opts.PrefillCtx > 0 {
		pctx, err = llama.NewContext(model, llama.ContextParams{
			NCtx:      opts.PrefillCtx * opts.PrefillStreams,
			NBatch:    opts.BatchSize,
			NUBatch:   opts.UBatchSize,
			NSeqMax:   opts.PrefillStreams,
			Threads:   opts.Threads,
			FlashAttn: opts.FlashAttn,
			Capture:   !opts.FlashAttn,
			Unified:   opts.PrefillStreams == 1,
			TypeK:     opts.KVType,
			TypeV:     valueType(opts.KVType, opts.FlashAttn),
		})
		if err != nil {
			return ctx, nil, nil, nil, fmt.Errorf("engine: prefill context: %w", err)
		}
		// Two contexts used in turn share one set of CPU threads.
		if pool, err = llama.NewThreadPool(opts.Threads); err != nil {
			return ctx, pctx, nil, nil, fmt.Errorf("engine: %w", err)
		}
		ctx.AttachThreadPool(pool)
		pctx.AttachThreadPool(pool)
	}
	layers, err = ctx.CacheLayers(0)
	if err != nil || ctx.CacheParts() == 0 {
		return ctx, pctx, pool, nil, fmt.Errorf("engine: the model's KV cache is not one the hook knows: %v", err)
	}
	return ctx, pctx, pool, layers, nil
}

// Stop stops admitting requests (Submit answers ErrShuttingDown), lets the running
// and queued ones finish until ctx ends, then fails the rest with ErrShuttingDown,
// waits for the decode loop and frees the llama context. Later calls only wait.
func (e *Engine) Stop(ctx context.Context) {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	e.signal()
	select {
	case <-e.done:
	case <-ctx.Done():
		e.cancel()
		<-e.done
	}
	e.freeOnce.Do(func() {
		e.persist()
		e.tokBatch.Close()
		e.embdBatch.Close()
		e.ctx.Close()
		if e.pctx != nil {
			e.pctx.Close()
		}
		e.threads.Close() // after the contexts computing on it
	})
}

// ContextSize describes one of the engine's llama contexts.
type ContextSize struct {
	Role         string // "decode" or "prefill"
	Cells        int    // all streams together
	Streams      int    // per-sequence streams (1: one shared pool)
	BytesPerCell int64  // K and V rows of every layer, in the context's row types
	Layout       string // row types and V orientation
	FlashAttn    bool
}

// Bytes is the context's KV memory.
func (c ContextSize) Bytes() int64 { return int64(c.Cells) * c.BytesPerCell }

// Contexts describes the decode context, then the prefill context when there is one.
func (e *Engine) Contexts() []ContextSize {
	streams := e.opts.Parallel
	if e.opts.Unified {
		streams = 1
	}
	out := []ContextSize{{Role: "decode", Cells: e.nCtx, Streams: streams, BytesPerCell: e.bytesPerCell,
		Layout: e.ctx.KVLayout().String(), FlashAttn: e.ctx.Params().FlashAttn}}
	if e.pctx != nil {
		out = append(out, ContextSize{Role: "prefill", Cells: e.pctx.NCtx(), Streams: len(e.ppools), BytesPerCell: e.pctx.KVBytesPerCell(),
			Layout: e.pctx.KVLayout().String(), FlashAttn: e.pctx.Params().FlashAttn})
	}
	return out
}

// SeqCells is the number of cells one slot can hold.
func (e *Engine) SeqCells() int { return e.seqCells }

// Ready reports whether the engine accepts work.
func (e *Engine) Ready() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.running.Load() && !e.closed
}

// Stats returns a snapshot of queue and cache use. It never touches the llama
// context, so it may be called at any time, even after Stop.
func (e *Engine) Stats() completion.Stats {
	st := completion.Stats{
		QueueDepth:   int(e.queued.Load()),
		SlotsBusy:    int(e.busy.Load()),
		SlotsTotal:   e.opts.Parallel,
		KVCellsUsed:  int(e.cellsUsed.Load()),
		KVCellsTotal: e.nCtx,

		KVInvariantFailures: int(e.broken.Load()),
		KVCellsByPolicy:     e.cellsByPolicy(),
		KVCellsHeld:         int(e.cellsHeld.Load()),
		ReuseHits:           int(e.reuseHits.Load()),
		ReuseMisses:         int(e.reuseMisses.Load()),
		ReusedTokens:        int(e.reusedToks.Load()),
		ReclaimedCells:      int(e.reclaimed.Load()),
		ImageCacheHits:      int(e.imageHits.Load()),
		ImageEncodes:        int(e.imageEncs.Load()),

		HostCache:    e.host.snapshot(),
		DiskCacheOff: e.diskOff,
	}
	if d := e.disk; d != nil {
		st.DiskCache = d.snapshot()
	}
	return st
}

func (e *Engine) cellsByPolicy() map[string]int {
	m := make(map[string]int, len(cachePolicies))
	for i, p := range cachePolicies {
		m[string(p)] = int(e.policyCells[i].Load())
	}
	return m
}

// Submit prepares req (chat template, tokenization, image preprocessing) on the
// caller's goroutine and queues it. Events arrive on the returned channel until one
// has Done set; cancelling ctx stops the request and frees its slot. Errors are
// those listed in package completion; nothing is queued when Submit fails.
func (e *Engine) Submit(ctx context.Context, req *completion.Request) (<-chan completion.Event, error) {
	if !e.Ready() {
		return nil, completion.ErrShuttingDown
	}
	var trace *explainTrace
	if req.Explain { // traced under an id no other running request has
		r := *req
		r.ID, trace = e.traces.start(req.ID)
		req = &r
	}
	s, err := e.prepare(req)
	if err == nil {
		if trace != nil {
			e.startExplain(s, trace)
		}
		s.ctx = ctx
		err = e.enqueue(s)
	}
	if err != nil {
		if s != nil {
			e.end(s, completion.Event{Done: true, Err: err})
		}
		if trace != nil {
			e.traces.take(req.ID, trace)
		}
		return nil, err
	}
	e.signal()
	out := make(chan completion.Event, 16)
	go func() {
		s.box.forward(ctx, out)
		if trace != nil { // a request dropped before its end leaves no trace behind
			e.traces.take(req.ID, trace)
		}
	}()
	return out, nil
}

// Complete submits req and waits for its end (see completion.Collect).
func (e *Engine) Complete(ctx context.Context, req *completion.Request) (completion.Result, error) {
	ch, err := e.Submit(ctx, req)
	if err != nil {
		return completion.Result{}, err
	}
	return completion.Collect(ctx, ch)
}

func (e *Engine) signal() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// prepare refuses what this engine cannot run, then renders and tokenizes the
// prompt and checks that it fits a slot. A request refused after it was made is
// returned with the error, for its teardown (end).
func (e *Engine) prepare(req *completion.Request) (*seq, error) {
	if err := e.supports(req.Cache); err != nil {
		return nil, err
	}
	s := &seq{request: request{req: req, box: newOutbox()}, generation: generation{stops: stopScanner{stops: req.Stop}},
		placement: placement{id: -1, reuse: e.opts.Reuse && (req.Reuse == nil || *req.Reuse) && req.Force == nil && !req.Explain}}
	s.reuseCompressed = s.reuse && (e.opts.ReuseCompressed || req.Reuse != nil)
	if err := e.tokenize(s); err != nil {
		return s, err
	}
	if s.nPrompt == 0 {
		return s, completion.ErrEmptyPrompt
	}
	if limit, raise := e.promptLimit(req.Cache); s.nPrompt > limit {
		return s, &completion.PromptTooLongError{Tokens: s.nPrompt, Limit: limit, Raise: raise}
	}
	if req.Constraint != nil {
		smp, err := constrainedSampler(e.model, req)
		if err != nil {
			return s, err
		}
		s.sampler = smp
	}
	return s, nil
}

// valueType is the V cache type for a context: kvType where flash attention is on,
// and where kvType is not quantized; f16 otherwise (llama.cpp refuses a quantized V
// without flash attention).
func valueType(kvType string, flashAttn bool) string {
	if !flashAttn && (kvType == "q8_0" || kvType == "q4_0") {
		return "f16"
	}
	return kvType
}

// prefills reports whether a fresh sequence under spec is encoded in the prefill
// context (and moved into its slot's stream after its prompt plan): only where
// there is one and spec compresses; full encodes where it decodes.
func (e *Engine) prefills(spec elasticcache.Spec) bool {
	return e.pctx != nil && spec.Compresses()
}

// promptLimit is the longest prompt a request under spec may send, and the
// setting that bounds it: one that fits a slot (a stream, or the shared pool),
// or, for a prompt encoded in the prefill context, one that fits it and whose
// compressed cells fit a stream with one generated token.
func (e *Engine) promptLimit(spec elasticcache.Spec) (int, string) {
	stream := e.pools[0].size()
	if !e.prefills(spec) {
		return stream - 1, "--ctx-size"
	}
	// MaxCells grows with the prompt: the longest prompt that fits, by bisection.
	lo, hi := 0, e.ppools[0].size()-1
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if spec.MaxCellsAfterPrompt(mid, 1) <= stream {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	if lo == e.ppools[0].size()-1 {
		return lo, "--prefill-ctx-size"
	}
	return lo, "--ctx-size (a stream holds the compressed prompt) or lower the budget"
}

// supports refuses a cache setting this engine cannot apply, before any sequence
// is touched.
func (e *Engine) supports(spec elasticcache.Spec) error {
	if r := unsupportedReason(e.model.Info(), e.opts.FlashAttn, e.opts.DecodeFlashAttn, spec); r != "" {
		return &completion.PolicyUnsupportedError{Policy: spec.Policy(), Reason: r}
	}
	return nil
}

// plan fixes how many tokens s may generate and how many cells that needs at most
// under its policy (Spec.MaxCells), shrinking the generation until it fits the pool.
func (e *Engine) plan(s *seq, poolSize int, elsewhere bool) {
	n := s.nPrompt
	perSlot := e.nCtx / e.opts.Parallel
	g := s.req.MaxTokens
	if g <= 0 {
		g = max(perSlot-n, 1) // llama-server's default: until the slot's context is full
	}
	if lim := e.model.Info().CtxTrain - n; lim > 0 { // never past the training context
		g = min(g, lim)
	}
	maxCells := s.req.Cache.MaxCells
	if elsewhere { // the prompt is encoded in the prefill context
		maxCells = s.req.Cache.MaxCellsAfterPrompt
	}
	for g > 1 && maxCells(n, g) > poolSize {
		// Big steps while far over, then by one.
		over := maxCells(n, g) - poolSize
		g -= max(1, min(over, g-1))
	}
	s.maxGen = max(g, 1)
	s.reserve = min(maxCells(n, s.maxGen), poolSize)
}

func (e *Engine) report(s *seq) *completion.KVReport {
	spec := s.req.Cache
	r := &completion.KVReport{
		Policy:        string(spec.Policy()),
		Budget:        spec.Budget(),
		PromptEntries: s.nPrompt,
		PrefillMs:     ms(s.prefillDur),
		Reused:        s.cached,
		ReusedFrom:    s.reusedFrom,
	}
	if spec.Compresses() {
		r.Selection = string(spec.Selection())
	}
	if c := s.cache; c != nil {
		st := c.tracker.Stats()
		r.Kept, r.Merged, r.Evicted = st.Kept, st.Merged, st.Evicted
		r.PeakCells, r.FinalCells = c.peak, c.held()
		r.CompressMs = ms(c.compressDur)
		if s.nPast > c.held() {
			r.BytesSaved = int64(s.nPast-c.held()) * e.bytesPerCell
		}
	}
	if !s.decodeStart.IsZero() {
		r.DecodeMs = ms(time.Since(s.decodeStart))
	}
	if s.req.Explain {
		r.Explain = e.explain(s)
	}
	return r
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
