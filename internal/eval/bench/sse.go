package bench

import (
	"bufio"
	"errors"
	"io"
	"strings"
)

// sseReader reads server-sent events (the WHATWG event-stream format): "data:"
// lines are joined with "\n" until a blank line ends the event; comments
// (lines starting with ":") and other fields are skipped; CRLF, LF and CR line
// ends are all accepted.
type sseReader struct {
	r       *bufio.Reader
	pending byte // a '\n' to skip after a lone '\r'
}

func newSSEReader(r io.Reader) *sseReader { return &sseReader{r: bufio.NewReaderSize(r, 64<<10)} }

// maxEventBytes bounds one event's data, so a server that never ends a line
// cannot make the client buffer without limit.
const maxEventBytes = 16 << 20

// errEventTooLong is returned when one event's data passes maxEventBytes.
var errEventTooLong = errors.New("SSE event larger than 16 MiB")

// next returns the data of the next event that has a data field. At the end
// of the stream it returns io.EOF; an event cut off by the end (no blank line
// after it) is still returned once, as most clients do.
func (s *sseReader) next() (string, error) {
	var data strings.Builder
	hasData := false
	for {
		line, err := s.line()
		if err != nil {
			if errors.Is(err, io.EOF) && hasData {
				return data.String(), nil
			}
			return "", err
		}
		if line == "" {
			if hasData {
				return data.String(), nil
			}
			continue
		}
		if line[0] == ':' {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		if field != "data" {
			continue // event, id, retry: not used by chat completions
		}
		if hasData {
			data.WriteByte('\n')
		}
		hasData = true
		if data.Len()+len(value) > maxEventBytes {
			return "", errEventTooLong
		}
		data.WriteString(value)
	}
}

// line reads one line without its end. A last line without an end is
// returned with a nil error; io.EOF comes after it.
func (s *sseReader) line() (string, error) {
	var b strings.Builder
	for {
		c, err := s.r.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) && b.Len() > 0 {
				return b.String(), nil
			}
			return "", err
		}
		if s.pending == '\n' {
			s.pending = 0
			if c == '\n' {
				continue
			}
		}
		switch c {
		case '\n':
			return b.String(), nil
		case '\r':
			s.pending = '\n'
			return b.String(), nil
		}
		if b.Len() >= maxEventBytes {
			return "", errEventTooLong
		}
		b.WriteByte(c)
	}
}
