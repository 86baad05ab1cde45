package engine

import "strings"

// stopScanner holds back generated text that could be the start of a stop string,
// so a stop string is never streamed to the client.
type stopScanner struct {
	stops []string
	text  strings.Builder // everything generated so far (after stop handling)
	sent  int             // bytes of text already released
}

// add appends new text. It returns the text safe to release and whether a stop
// string was found (the text then ends right before it).
func (s *stopScanner) add(piece string) (string, bool) {
	s.text.WriteString(piece)
	all := s.text.String()
	if len(s.stops) == 0 {
		out := all[s.sent:]
		s.sent = len(all)
		return out, false
	}
	// A stop string may start before the unsent part: search a window back.
	from := s.sent
	for _, st := range s.stops {
		from = min(from, max(0, s.sent-len(st)+1))
	}
	if idx, ok := firstStop(all[from:], s.stops); ok {
		end := from + idx
		if end < s.sent {
			end = s.sent
		}
		out := all[s.sent:end]
		s.sent = end
		return out, true
	}
	// Keep back the longest suffix that is a prefix of some stop string.
	hold := 0
	for _, st := range s.stops {
		for k := min(len(st)-1, len(all)-s.sent); k > hold; k-- {
			if strings.HasSuffix(all, st[:k]) {
				hold = k
				break
			}
		}
	}
	end := len(all) - hold
	out := all[s.sent:end]
	s.sent = end
	return out, false
}

// flush releases what was held back (generation ended without a stop string).
func (s *stopScanner) flush() string {
	all := s.text.String()
	out := all[s.sent:]
	s.sent = len(all)
	return out
}

func firstStop(s string, stops []string) (int, bool) {
	best, found := len(s), false
	for _, st := range stops {
		if st == "" {
			continue
		}
		if i := strings.Index(s, st); i >= 0 && i < best {
			best, found = i, true
		}
	}
	return best, found
}
