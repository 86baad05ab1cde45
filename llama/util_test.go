package llama

import (
	"math"
	"testing"
	"unicode/utf8"
)

func TestUTF8BufferNeverSplitsACharacter(t *testing.T) {
	text := "aé日🙂z"
	raw := []byte(text)
	// Feed one byte at a time: every release must be valid UTF-8.
	var u UTF8Buffer
	var out string
	for _, b := range raw {
		s := u.Write([]byte{b})
		if !utf8.ValidString(s) {
			t.Fatalf("released invalid UTF-8 %q", s)
		}
		out += s
	}
	out += u.Flush()
	if out != text {
		t.Fatalf("got %q, want %q", out, text)
	}
}

func TestUTF8BufferFlushReplacesUnfinishedSequence(t *testing.T) {
	var u UTF8Buffer
	if s := u.Write([]byte{'a', 0xE6, 0x97}); s != "a" {
		t.Fatalf("released %q", s)
	}
	if u.Pending() != 2 {
		t.Fatalf("pending %d", u.Pending())
	}
	if s := u.Flush(); s != "\uFFFD\uFFFD" && s != "\uFFFD" {
		t.Fatalf("flush gave %q", s)
	}
}

func TestF16Conversion(t *testing.T) {
	cases := []struct {
		f float32
		h uint16
	}{
		{0, 0}, {1, 0x3C00}, {-2, 0xC000}, {65504, 0x7BFF}, {0.5, 0x3800},
		{float32(math.Inf(1)), 0x7C00}, {5.960464477539063e-08, 0x0001}, {1e6, 0x7C00},
	}
	for _, c := range cases {
		if got := F32ToF16(c.f); got != c.h {
			t.Errorf("F32ToF16(%g) = %#04x, want %#04x", c.f, got, c.h)
		}
		if c.f <= 65504 {
			if back := F16ToF32(c.h); back != c.f {
				t.Errorf("F16ToF32(%#04x) = %g, want %g", c.h, back, c.f)
			}
		}
	}
	// Every finite half survives a round trip.
	for h := uint16(0); h < 0x7C00; h++ {
		if got := F32ToF16(F16ToF32(h)); got != h {
			t.Fatalf("round trip of %#04x gave %#04x", h, got)
		}
	}
}
