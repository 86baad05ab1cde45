package progress

import (
	"strings"
	"sync"
	"testing"
)

func TestNonTerminalPrintsTenthsOnly(t *testing.T) {
	var sb strings.Builder
	b := New(&sb, "ppl", 100)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				b.Add(1)
			}
		}()
	}
	wg.Wait()
	b.Printf("sample %d skipped", 3)
	b.Finish()
	out := sb.String()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 12 { // 0%, 10% ... 100%, and the message
		t.Fatalf("%d lines:\n%s", len(lines), out)
	}
	if !strings.HasPrefix(lines[0], "ppl: 0/100 (0%)") || !strings.HasPrefix(lines[10], "ppl: 100/100 (100%)") || lines[11] != "sample 3 skipped" {
		t.Fatalf("unexpected output:\n%s", out)
	}
	if strings.Contains(out, "\r") {
		t.Fatal("carriage return written to a non-terminal")
	}
}

// A bar without a writer still counts (clamped to the total) and prints nothing;
// a nil bar is a no-op, so callers need no checks.
func TestNilWriterCountsSilentlyAndNilBarIsANoOp(t *testing.T) {
	b := New(nil, "x", 3)
	b.Add(5)
	b.Printf("hidden")
	b.Finish()
	if b.done != 3 {
		t.Fatalf("done = %d after adding 5 of 3, want 3", b.done)
	}
	var nb *Bar
	for name, f := range map[string]func(){
		"Add": func() { nb.Add(1) }, "Printf": func() { nb.Printf("x") }, "Finish": func() { nb.Finish() },
	} {
		func() {
			defer func() {
				if v := recover(); v != nil {
					t.Errorf("nil bar %s panicked: %v", name, v)
				}
			}()
			f()
		}()
	}
}
