package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// lives records every request's states, and checks at each request's end, on the
// goroutine that ends it, what the teardown must have given back.
type lives struct {
	t      *testing.T
	e      *testEngine
	mu     sync.Mutex
	states map[string][]reqState
}

// watchLives installs the state hook on e before any request is submitted (the
// hook is then read after Submit's queue send, which orders it).
func watchLives(t *testing.T, e *testEngine) *lives {
	l := &lives{t: t, e: e, states: map[string][]reqState{}}
	e.onState = l.saw
	return l
}

func (l *lives) saw(s *seq, from, to reqState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	id := s.req.ID
	if len(l.states[id]) == 0 {
		l.states[id] = []reqState{from}
	}
	if got := l.states[id][len(l.states[id])-1]; got != from || !from.follows(to) {
		l.t.Errorf("%s: %s -> %s after %v", id, from, to, l.states[id])
	}
	l.states[id] = append(l.states[id], to)
	if !to.ended() {
		return
	}
	if s.sampler != nil || s.prompt != nil {
		l.t.Errorf("%s ended %s with its C objects", id, to)
	}
	if from != stateEncoding && from != stateGenerating {
		return
	}
	// Admitted: the loop ends it, so its state may be read here.
	e := l.e
	if e.slots[s.id] == s {
		l.t.Errorf("%s ended %s still in slot %d", id, to, s.id)
	}
	for pi := range e.pools {
		want := 0
		for _, o := range e.slots {
			if o != nil && e.poolOf(o.id) == pi {
				want += o.reserve
			}
		}
		if e.reserved[pi] != want {
			l.t.Errorf("%s ended %s: pool %d reserves %d cells, its requests %d", id, to, pi, e.reserved[pi], want)
		}
	}
	c := s.cache
	switch {
	case to == stateHeld && (e.held[s.id] == nil || e.held[s.id].cache != c):
		l.t.Errorf("%s ended held, but slot %d does not hold its cells", id, s.id)
	case to == stateDone && (c.held() != 0 || c.lctx.SeqPosMax(c.seq) != -1):
		l.t.Errorf("%s ended done with %d cells (pos max %d)", id, c.held(), c.lctx.SeqPosMax(c.seq))
	}
}

// path returns the states id went through, the first being the one it started in.
func (l *lives) path(id string) []reqState {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]reqState(nil), l.states[id]...)
}

func (l *lives) expect(id string, want ...reqState) {
	l.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for got := l.path(id); len(got) == 0 || !got[len(got)-1].ended(); got = l.path(id) {
		if time.Now().After(deadline) {
			l.t.Fatalf("%s has not ended: %v", id, got)
		}
		time.Sleep(time.Millisecond)
	}
	if got := l.path(id); fmt.Sprint(got) != fmt.Sprint(want) {
		l.t.Errorf("%s went %v, want %v", id, got, want)
	}
}

// waitIdle waits until the engine holds no request, then checks its counts.
func waitIdle(t *testing.T, e *testEngine) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for st := e.Stats(); st.SlotsBusy != 0 || st.QueueDepth != 0 || st.KVCellsUsed != 0; st = e.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("not idle: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
}

// Every way a request ends goes through the one teardown (end): it leaves the
// request done (or held, its cells kept for the next turn), through legal states
// only, with its slot, reservation, cells and C objects given back.
func TestEveryEndingPathLeavesTheRequestEnded(t *testing.T) {
	const (
		P = statePrepared
		Q = stateQueued
		E = stateEncoding
		G = stateGenerating
		H = stateHeld
		D = stateDone
	)
	t.Run("finished", func(t *testing.T) {
		e := startEngine(t, Options{Parallel: 2, Reuse: true})
		l := watchLives(t, e)
		run(t, e, greedyReq("finished", "one", 4, cfg(elasticcache.Full, 1)))
		noReuse := false
		req := greedyReq("finished-not-held", "two", 4, cfg(elasticcache.Elastic, 0.5))
		req.Reuse = &noReuse
		run(t, e, req)
		waitIdle(t, e)
		l.expect("finished", P, Q, E, G, H)
		l.expect("finished-not-held", P, Q, E, G, D)
	})
	t.Run("failed", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			step   int // 1: the first prompt batch
			panics bool
			want   []reqState
		}{
			{"error-in-prompt", 1, false, []reqState{P, Q, E, D}},
			{"error-in-decode", 4, false, []reqState{P, Q, E, G, D}},
			{"panic-in-prompt", 1, true, []reqState{P, Q, E, D}},
			{"panic-in-decode", 4, true, []reqState{P, Q, E, G, D}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				e := startEngine(t, Options{Parallel: 2})
				l := watchLives(t, e)
				steps := 0 // the fault runs on the decode loop only
				fault := func(id string) error {
					if steps++; steps != tc.step {
						return nil
					}
					if tc.panics {
						panic("injected panic")
					}
					return errors.New("injected failure")
				}
				e.onFault.Store(&fault)
				ch, err := e.Submit(context.Background(), greedyReq(tc.name, "one", 8, cfg(elasticcache.Elastic, 0.5)))
				if err != nil {
					t.Fatal(err)
				}
				if r := collect(t, ch); r.err == nil || !strings.Contains(r.err.Error(), "injected") {
					t.Fatalf("%+v", r)
				}
				waitIdle(t, e)
				l.expect(tc.name, tc.want...)
			})
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		e := startEngine(t, Options{Parallel: 1})
		l := watchLives(t, e)
		genCtx, cancelGen := context.WithCancel(context.Background())
		gen, err := e.Submit(genCtx, greedyReq("cancelled-generating", "go on forever", 0, cfg(elasticcache.Full, 1)))
		if err != nil {
			t.Fatal(err)
		}
		<-gen // generating: the next request waits for the slot
		waitCtx, cancelWait := context.WithCancel(context.Background())
		waiting, err := e.Submit(waitCtx, greedyReq("cancelled-queued", "hi", 4, cfg(elasticcache.Full, 1)))
		if err != nil {
			t.Fatal(err)
		}
		cancelWait()
		for ev := range waiting { // closed when its context ends
			if ev.Text != "" || ev.Done && !errors.Is(ev.Err, context.Canceled) {
				t.Fatalf("queued: %+v", ev)
			}
		}
		cancelGen()
		for range gen {
		}
		waitIdle(t, e)
		l.expect("cancelled-queued", P, Q, D)
		l.expect("cancelled-generating", P, Q, E, G, D)
	})
	t.Run("refused", func(t *testing.T) {
		e := startEngine(t, Options{Parallel: 1, QueueSize: 1})
		l := watchLives(t, e)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		gen, err := e.Submit(ctx, greedyReq("running", "go on forever", 0, cfg(elasticcache.Full, 1)))
		if err != nil {
			t.Fatal(err)
		}
		<-gen
		if _, err := e.Submit(ctx, greedyReq("queued", "hi", 4, cfg(elasticcache.Full, 1))); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Submit(ctx, greedyReq("queue-full", "hi", 4, cfg(elasticcache.Full, 1))); !errors.Is(err, completion.ErrQueueFull) {
			t.Fatalf("queue full: %v", err)
		}
		var tl *completion.PromptTooLongError
		if _, err := e.Submit(ctx, greedyReq("too-long", strings.Repeat("x ", 3000), 4, cfg(elasticcache.Full, 1))); !errors.As(err, &tl) {
			t.Fatalf("too long: %v", err)
		}
		cancel()
		for range gen {
		}
		waitIdle(t, e)
		l.expect("queue-full", P, D)
		l.expect("too-long", P, D)
	})
	t.Run("shutdown", func(t *testing.T) {
		e := startEngine(t, Options{Parallel: 1})
		l := watchLives(t, e)
		gen, err := e.Submit(context.Background(), greedyReq("shutdown-generating", "go on forever", 0, cfg(elasticcache.Full, 1)))
		if err != nil {
			t.Fatal(err)
		}
		<-gen
		queued, err := e.Submit(context.Background(), greedyReq("shutdown-queued", "hi", 4, cfg(elasticcache.Full, 1)))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // no grace: fail what runs and waits
		e.Stop(ctx)
		for _, ch := range []<-chan completion.Event{gen, queued} {
			if r := collect(t, ch); !errors.Is(r.err, completion.ErrShuttingDown) {
				t.Fatalf("%+v", r)
			}
		}
		if st := e.Stats(); st.SlotsBusy != 0 || st.QueueDepth != 0 || st.KVCellsUsed != 0 {
			t.Fatalf("after Stop: %+v", st)
		}
		l.expect("shutdown-generating", P, Q, E, G, D)
		l.expect("shutdown-queued", P, Q, D)
	})
}
