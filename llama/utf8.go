package llama

import "unicode/utf8"

// UTF8Buffer turns a stream of token pieces into text that never splits a UTF-8
// sequence: bytes of an unfinished character wait for the next piece.
type UTF8Buffer struct {
	pending []byte
}

// Write adds a piece and returns the text that is complete so far.
func (u *UTF8Buffer) Write(piece []byte) string {
	u.pending = append(u.pending, piece...)
	n := completePrefix(u.pending)
	out := string(u.pending[:n])
	u.pending = append(u.pending[:0], u.pending[n:]...)
	return out
}

// Flush returns whatever is left, replacing an unfinished sequence with U+FFFD.
func (u *UTF8Buffer) Flush() string {
	if len(u.pending) == 0 {
		return ""
	}
	out := string(u.pending)
	u.pending = u.pending[:0]
	if !utf8.ValidString(out) {
		return string([]rune(out)) // invalid bytes become U+FFFD
	}
	return out
}

// Pending reports how many bytes wait for the rest of a character.
func (u *UTF8Buffer) Pending() int { return len(u.pending) }

// completePrefix is the length of b without a trailing incomplete (but so far valid)
// UTF-8 sequence. Invalid bytes are passed through so the stream never stalls.
func completePrefix(b []byte) int {
	// Look back at most 3 bytes for the start of a multi-byte sequence.
	for i := len(b) - 1; i >= 0 && i >= len(b)-3; i-- {
		c := b[i]
		if c < 0x80 {
			return len(b)
		}
		if c >= 0xC0 { // a lead byte
			need := 0
			switch {
			case c >= 0xF0:
				need = 4
			case c >= 0xE0:
				need = 3
			default:
				need = 2
			}
			if len(b)-i < need {
				return i
			}
			return len(b)
		}
	}
	return len(b)
}
