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

func TestNilWriterAndNilBar(t *testing.T) {
	b := New(nil, "x", 3)
	b.Add(5)
	b.Printf("hidden")
	b.Finish()
	var nb *Bar
	nb.Add(1)
	nb.Printf("x")
	nb.Finish()
}
