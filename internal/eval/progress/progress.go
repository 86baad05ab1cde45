// Package progress draws a one-line progress bar on a terminal (stderr), or,
// when the writer is not a terminal, prints a line at every tenth of the work
// so that logs stay short. It has no dependencies and is safe for concurrent use.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// Bar tracks done out of total steps.
type Bar struct {
	mu      sync.Mutex
	w       io.Writer
	label   string
	total   int
	done    int
	start   time.Time
	tty     bool
	lastPct int
	drawn   time.Time
	closed  bool
}

// New starts a bar on w (nil: a bar that prints nothing).
func New(w io.Writer, label string, total int) *Bar {
	b := &Bar{w: w, label: label, total: max(total, 1), start: time.Now(), lastPct: -1}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			b.tty = true
		}
	}
	b.draw(true)
	return b
}

// Add records n more steps.
func (b *Bar) Add(n int) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done = min(b.done+n, b.total)
	b.draw(false)
}

// Printf prints a message on its own line without breaking the bar.
func (b *Bar) Printf(format string, args ...any) {
	if b == nil || b.w == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.tty {
		fmt.Fprint(b.w, "\r\033[K")
	}
	fmt.Fprintf(b.w, strings.TrimRight(format, "\n")+"\n", args...)
	if b.tty && !b.closed {
		b.draw(true)
	}
}

// Finish ends the bar's line.
func (b *Bar) Finish() {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return
	}
	b.draw(true)
	b.closed = true
	if b.w != nil && b.tty {
		fmt.Fprintln(b.w)
	}
}

func (b *Bar) draw(force bool) {
	if b.w == nil || b.closed {
		return
	}
	pct := 100 * b.done / b.total
	elapsed := time.Since(b.start)
	if !b.tty {
		if pct/10 != b.lastPct/10 || force && pct != b.lastPct {
			b.lastPct = pct
			fmt.Fprintf(b.w, "%s: %d/%d (%d%%) %s\n", b.label, b.done, b.total, pct, elapsed.Round(time.Second))
		}
		return
	}
	if !force && time.Since(b.drawn) < 100*time.Millisecond && b.done < b.total {
		return
	}
	b.drawn = time.Now()
	const width = 30
	fill := width * b.done / b.total
	eta := ""
	if b.done > 0 && b.done < b.total {
		left := time.Duration(float64(elapsed) * float64(b.total-b.done) / float64(b.done))
		eta = " eta " + left.Round(time.Second).String()
	}
	fmt.Fprintf(b.w, "\r\033[K%s [%s%s] %d/%d %3d%% %s%s", b.label, strings.Repeat("#", fill), strings.Repeat(".", width-fill),
		b.done, b.total, pct, elapsed.Round(time.Second), eta)
}
