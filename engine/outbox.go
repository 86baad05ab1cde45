package engine

import (
	"context"
	"sync"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// outbox decouples the decode loop from slow readers: the loop never blocks on a
// client. Pending text events are merged while the reader is behind.
type outbox struct {
	mu     sync.Mutex
	items  []completion.Event
	notify chan struct{}
}

func newOutbox() *outbox { return &outbox{notify: make(chan struct{}, 1)} }

func (o *outbox) push(ev completion.Event) {
	o.mu.Lock()
	if n := len(o.items); n > 0 && !ev.Done && !o.items[n-1].Done && o.items[n-1].Err == nil {
		o.items[n-1].Text += ev.Text
		o.items[n-1].Logprobs = append(o.items[n-1].Logprobs, ev.Logprobs...)
	} else {
		o.items = append(o.items, ev)
	}
	o.mu.Unlock()
	select {
	case o.notify <- struct{}{}:
	default:
	}
}

func (o *outbox) drain() []completion.Event {
	o.mu.Lock()
	defer o.mu.Unlock()
	items := o.items
	o.items = nil
	return items
}

// forward copies events to out until the final one, or until ctx ends.
func (o *outbox) forward(ctx context.Context, out chan<- completion.Event) {
	defer close(out)
	for {
		select {
		case <-o.notify:
		case <-ctx.Done():
			return
		}
		for _, ev := range o.drain() {
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			}
			if ev.Done {
				return
			}
		}
	}
}
