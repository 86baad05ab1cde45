// Package dataset reads evaluation sets for elastic-eval and writes the
// synthetic one.
//
// Two JSON layouts are accepted, entry by entry (a file may mix them):
//
//   - the LLaVA layout of the Elastic Cache reference repository:
//     [{"id": "...", "image": "file.png", "conversations": [
//     {"from": "human", "value": "<image>\nQuestion?"},
//     {"from": "gpt", "value": "Answer."}]}]
//     The first human turn is the prompt and the gpt turn after it the
//     answer; later turns are ignored. "user"/"assistant" are accepted as
//     roles too.
//   - a plain list: [{"question": "...", "answer": "...", "image": "file.png"}]
//     ("id" optional).
//
// Either may carry "kind" (e.g. "color", "describe"): elastic-eval scores
// accuracy on entries whose kind has a short exact answer, or, with no kind,
// on answers of 1 to 3 words. Image paths are resolved against the image
// folder (by default the JSON file's folder); absolute paths are kept. An
// entry without "image" is a text-only prompt.
//
// A malformed entry or a missing image file does not stop loading: the entry
// is recorded in Set.Skipped with its index, its id when known, and why.
package dataset

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ImageToken marks the image's place in a prompt, as in LLaVA data.
const ImageToken = "<image>"

// Sample is one evaluation item.
type Sample struct {
	Index  int    // position in the file (0-based)
	ID     string // the entry's id, or "#<index>" when it has none
	Prompt string // the question; contains ImageToken exactly once when Image is set
	Answer string // the reference answer
	Image  string // resolved image path, "" for a text-only prompt
	Kind   string // optional question type from the file
}

// Name identifies the sample in messages: `id "x" (entry 3)`.
func (s Sample) Name() string { return name(s.Index, s.ID) }

func name(index int, id string) string {
	if id == "" || id == "#"+strconv.Itoa(index) {
		return fmt.Sprintf("entry %d", index)
	}
	return fmt.Sprintf("id %q (entry %d)", id, index)
}

// Skip records an entry that was left out.
type Skip struct {
	Index  int
	ID     string
	Reason string
}

func (s Skip) String() string { return name(s.Index, s.ID) + ": " + s.Reason }

// Set is a loaded dataset.
type Set struct {
	Path    string
	Format  string // "llava", "plain", "mixed" or "empty"
	Samples []Sample
	Skipped []Skip
}

type turn struct {
	From  string `json:"from"`
	Value string `json:"value"`
}

type entry struct {
	ID            json.RawMessage `json:"id"`
	Image         *string         `json:"image"`
	Conversations []turn          `json:"conversations"`
	Question      *string         `json:"question"`
	Answer        *string         `json:"answer"`
	Kind          string          `json:"kind"`
}

// Load reads the JSON file at path; images are resolved against imageDir, or
// the file's folder when imageDir is "". Only an unreadable file or one that
// is not a JSON list is an error.
func Load(path, imageDir string) (*Set, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dataset: %w", err)
	}
	if imageDir == "" {
		imageDir = filepath.Dir(path)
	}
	set, err := Parse(data, imageDir)
	if err != nil {
		return nil, fmt.Errorf("dataset %s: %w", path, err)
	}
	set.Path = path
	return set, nil
}

// Parse is Load on bytes already read. Image files are checked to exist.
func Parse(data []byte, imageDir string) (*Set, error) {
	var raw []json.RawMessage
	if err := json.Unmarshal(bytes.TrimSpace(data), &raw); err != nil {
		return nil, fmt.Errorf("not a JSON list of samples: %w", err)
	}
	set := &Set{}
	formats := map[string]bool{}
	for i, r := range raw {
		s, format, err := parseEntry(i, r, imageDir)
		if err != nil {
			set.Skipped = append(set.Skipped, Skip{Index: i, ID: s.ID, Reason: err.Error()})
			continue
		}
		formats[format] = true
		set.Samples = append(set.Samples, s)
	}
	switch {
	case len(formats) > 1:
		set.Format = "mixed"
	case formats["llava"]:
		set.Format = "llava"
	case formats["plain"]:
		set.Format = "plain"
	default:
		set.Format = "empty"
	}
	return set, nil
}

func parseEntry(i int, r json.RawMessage, imageDir string) (Sample, string, error) {
	s := Sample{Index: i, ID: "#" + strconv.Itoa(i)}
	var e entry
	if err := json.Unmarshal(r, &e); err != nil {
		// Try to recover the id for the message.
		var m map[string]json.RawMessage
		if json.Unmarshal(r, &m) == nil {
			if id := idString(m["id"]); id != "" {
				s.ID = id
			}
		}
		return s, "", fmt.Errorf("malformed entry: %v", err)
	}
	if id := idString(e.ID); id != "" {
		s.ID = id
	}
	s.Kind = e.Kind
	var format string
	switch {
	case e.Conversations != nil:
		format = "llava"
		q, a, err := firstExchange(e.Conversations)
		if err != nil {
			return s, "", err
		}
		s.Prompt, s.Answer = q, a
	case e.Question != nil || e.Answer != nil:
		format = "plain"
		if e.Question == nil || strings.TrimSpace(*e.Question) == "" {
			return s, "", errors.New(`malformed entry: "question" is missing or empty`)
		}
		if e.Answer == nil || strings.TrimSpace(*e.Answer) == "" {
			return s, "", errors.New(`malformed entry: "answer" is missing or empty`)
		}
		s.Prompt, s.Answer = *e.Question, *e.Answer
	default:
		return s, "", errors.New(`malformed entry: it has neither "conversations" nor "question"/"answer"`)
	}
	s.Answer = strings.TrimSpace(s.Answer)
	n := strings.Count(s.Prompt, ImageToken)
	switch {
	case e.Image == nil || *e.Image == "":
		if n > 0 {
			return s, "", errors.New(`malformed entry: the prompt has ` + ImageToken + ` but there is no "image"`)
		}
	default:
		if n > 1 {
			return s, "", fmt.Errorf("malformed entry: the prompt has %d %s markers for one image", n, ImageToken)
		}
		if n == 0 {
			s.Prompt = ImageToken + "\n" + s.Prompt
		}
		p := *e.Image
		if !filepath.IsAbs(p) {
			p = filepath.Join(imageDir, p)
		}
		st, err := os.Stat(p)
		if err != nil {
			return s, "", fmt.Errorf("image %s not found", p)
		}
		if st.IsDir() {
			return s, "", fmt.Errorf("image %s is a folder", p)
		}
		s.Image = p
	}
	return s, format, nil
}

func firstExchange(turns []turn) (string, string, error) {
	for i, t := range turns {
		if !isRole(t.From, "human", "user") {
			continue
		}
		if strings.TrimSpace(strings.ReplaceAll(t.Value, ImageToken, "")) == "" {
			return "", "", fmt.Errorf("malformed entry: human turn %d is empty", i)
		}
		if i+1 >= len(turns) || !isRole(turns[i+1].From, "gpt", "assistant") {
			return "", "", fmt.Errorf("malformed entry: human turn %d is not followed by a gpt turn", i)
		}
		if strings.TrimSpace(turns[i+1].Value) == "" {
			return "", "", fmt.Errorf("malformed entry: gpt turn %d is empty", i+1)
		}
		return t.Value, turns[i+1].Value, nil
	}
	return "", "", errors.New("malformed entry: no human turn in conversations")
}

func isRole(from string, names ...string) bool {
	return slices.Contains(names, strings.ToLower(strings.TrimSpace(from)))
}

func idString(raw json.RawMessage) string {
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return strings.TrimSpace(string(raw)) // a number or another literal, as written
}

// Select returns at most n samples (all when n <= 0 or n >= len): a subset
// drawn with seed, kept in file order. The same seed gives the same subset.
func Select(samples []Sample, n int, seed int64) []Sample {
	if n <= 0 || n >= len(samples) {
		return samples
	}
	// Rank by a hash of (seed, index): stable across Go versions and platforms.
	idx := make([]int, len(samples))
	keys := make([]uint64, len(samples))
	for i := range idx {
		idx[i] = i
		keys[i] = mix(uint64(seed)*0x9E3779B97F4A7C15 + uint64(i))
	}
	slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(keys[a], keys[b]) })
	idx = idx[:n]
	slices.Sort(idx)
	out := make([]Sample, n)
	for i, j := range idx {
		out[i] = samples[j]
	}
	return out
}

// mix is the SplitMix64 finalizer.
func mix(z uint64) uint64 {
	z += 0x9E3779B97F4A7C15
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}
