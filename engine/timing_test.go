package engine

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// finalEvent reads ch until its Done event.
func finalEvent(t *testing.T, ch <-chan completion.Event) completion.Event {
	t.Helper()
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatal("channel closed before the final event")
			}
			if ev.Done {
				return ev
			}
		case <-timeout:
			t.Fatal("no final event")
		}
	}
}

// With one slot, a request submitted while another runs waits for it: its
// final event reports that wait as QueueMs, and Stats splits the cells held by
// policy while a request runs.
//
// No assertion depends on how fast the machine is: B's wait is bounded by two
// instants the test reads on either side of it (after B's Submit returned, and
// when the loop fails A, which frees the slot B then takes), so QueueMs must
// cover at least that interval, which holds a sleep, and at most the time from
// before B's Submit to B's final event.
func TestQueueTimeAndCellsByPolicy(t *testing.T) {
	e := startEngine(t, Options{Parallel: 1})
	var stopA atomic.Bool
	var aStopped atomic.Pointer[time.Time] // when the loop failed A; read after A's final event
	errStopped := errors.New("stopped by the test")
	fault := func(id string) error {
		if id == "a" && stopA.Load() {
			now := time.Now()
			aStopped.Store(&now)
			return errStopped
		}
		return nil
	}
	e.onFault.Store(&fault)
	// A runs until the test fails it; a cancelled request would end without
	// a final event to read.
	beforeA := time.Now()
	chA, err := e.Submit(context.Background(), greedyReq("a", "go on forever", 0, cfg(elasticcache.Elastic, 0.5)))
	if err != nil {
		t.Fatal(err)
	}
	<-chA // A holds the slot and generates

	deadline := time.Now().Add(30 * time.Second)
	for {
		st := e.Stats()
		by := st.KVCellsByPolicy
		if len(by) != len(cachePolicies) {
			t.Fatalf("KVCellsByPolicy %v lacks a policy", by)
		}
		if by["full"] != 0 || by["h2o"] != 0 || by["local"] != 0 {
			t.Fatalf("cells reported for a policy nothing runs: %v", by)
		}
		// used and the split are published one after the other: retry until a
		// snapshot falls between two steps.
		if st.KVCellsUsed > 0 && by["elastic"] == st.KVCellsUsed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("elastic cells never matched the cells used: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}

	beforeB := time.Now()
	chB, err := e.Submit(context.Background(), greedyReq("b", "hello", 2, cfg(elasticcache.Full, 1)))
	if err != nil {
		t.Fatal(err)
	}
	queuedB := time.Now() // B is queued: Submit queues before it returns
	if q := e.Stats().QueueDepth; q != 1 {
		t.Fatalf("queue depth %d while B waits, want 1", q)
	}
	// B waits at least this long: A holds the only slot until it is failed.
	time.Sleep(20 * time.Millisecond)
	stopA.Store(true)
	a := finalEvent(t, chA)
	if !errors.Is(a.Err, errStopped) {
		t.Fatalf("A ended with %v", a.Err)
	}
	b := finalEvent(t, chB)
	if b.Err != nil {
		t.Fatal(b.Err)
	}
	doneB := time.Now()
	slotFreed := *aStopped.Load()
	if least := ms(slotFreed.Sub(queuedB)); b.QueueMs < least || least < 20 {
		t.Errorf("B waited from its Submit until A was failed (%v ms) but QueueMs = %v", least, b.QueueMs)
	}
	if most := ms(doneB.Sub(beforeB)); b.QueueMs > most {
		t.Errorf("B's QueueMs = %v, longer than its whole life (%v ms): not a wait measured from its Submit", b.QueueMs, most)
	}
	if a.QueueMs < 0 || a.QueueMs > ms(slotFreed.Sub(beforeA)) {
		t.Errorf("A's QueueMs = %v: not a wait measured from its Submit", a.QueueMs)
	}
	for p, n := range e.Stats().KVCellsByPolicy {
		if n != 0 {
			t.Errorf("%s still holds %d cells after every request ended", p, n)
		}
	}
}
