package dataset

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"

	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

// Entry is one sample in the LLaVA layout, as written by WriteSynthetic.
type Entry struct {
	ID            string `json:"id"`
	Image         string `json:"image"`
	Conversations []Turn `json:"conversations"`
	Kind          string `json:"kind,omitempty"`
}

// Turn is one conversation turn of an Entry.
type Turn struct {
	From  string `json:"from"`
	Value string `json:"value"`
}

// SynthOptions configure WriteSynthetic.
type SynthOptions struct {
	Dir    string // output folder (created)
	N      int    // pictures
	Seed   int64
	Shapes shapes.Options
	// Kinds selects the question types written for every picture (all when empty).
	Kinds []shapes.QAKind
	// HeldOut in [0, 1): the fraction of pictures (the last ones) written to
	// heldout.json; the others go to train.json. 0 writes everything to data.json.
	HeldOut float64
}

// SynthResult says what WriteSynthetic wrote.
type SynthResult struct {
	Files   []string       // JSON files, with their entry counts in Entries
	Entries map[string]int // file -> entries
	Images  int
}

// Entries turns synthetic samples into LLaVA entries, one per selected question
// kind and picture; the image path is images/<sample id>.png.
func Entries(samples []shapes.Sample, kinds []shapes.QAKind) []Entry {
	if len(kinds) == 0 {
		kinds = shapes.QAKinds
	}
	var out []Entry
	for _, s := range samples {
		for _, k := range kinds {
			qa, ok := s.QA(k)
			if !ok {
				continue
			}
			out = append(out, Entry{
				ID:    s.ID + "-" + string(k),
				Image: "images/" + s.ID + ".png",
				Conversations: []Turn{
					{From: "human", Value: ImageToken + "\n" + qa.Question},
					{From: "gpt", Value: qa.Answer},
				},
				Kind: string(k),
			})
		}
	}
	return out
}

// WriteSynthetic draws o.N pictures and writes the images folder and the JSON
// file(s) in the LLaVA layout.
func WriteSynthetic(o SynthOptions) (SynthResult, error) {
	res := SynthResult{Entries: map[string]int{}}
	if o.N <= 0 {
		return res, fmt.Errorf("dataset: the number of samples must be positive, not %d", o.N)
	}
	if o.HeldOut < 0 || o.HeldOut >= 1 || math.IsNaN(o.HeldOut) {
		return res, fmt.Errorf("dataset: held-out fraction %v is not in [0, 1)", o.HeldOut)
	}
	for _, k := range o.Kinds {
		if !slices.Contains(shapes.QAKinds, k) {
			return res, fmt.Errorf("dataset: unknown question kind %q (want %v)", k, shapes.QAKinds)
		}
	}
	samples, err := shapes.GenerateWith(o.Shapes, o.Seed, o.N)
	if err != nil {
		return res, err
	}
	imgDir := filepath.Join(o.Dir, "images")
	if err := os.MkdirAll(imgDir, 0o755); err != nil {
		return res, fmt.Errorf("dataset: %w", err)
	}
	for _, s := range samples {
		b, err := s.PNG()
		if err != nil {
			return res, fmt.Errorf("dataset: %s: %w", s.ID, err)
		}
		if err := os.WriteFile(filepath.Join(imgDir, s.ID+".png"), b, 0o644); err != nil {
			return res, fmt.Errorf("dataset: %w", err)
		}
	}
	res.Images = len(samples)
	type part struct {
		file    string
		samples []shapes.Sample
	}
	parts := []part{{"data.json", samples}}
	if o.HeldOut > 0 {
		if len(samples) < 2 {
			return res, fmt.Errorf("dataset: a held-out split needs at least 2 samples")
		}
		k := min(max(int(math.Round(o.HeldOut*float64(len(samples)))), 1), len(samples)-1)
		parts = []part{{"train.json", samples[:len(samples)-k]}, {"heldout.json", samples[len(samples)-k:]}}
	}
	for _, p := range parts {
		entries := Entries(p.samples, o.Kinds)
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false) // keep "<image>" readable
		enc.SetIndent("", "  ")
		if err := enc.Encode(entries); err != nil {
			return res, err
		}
		path := filepath.Join(o.Dir, p.file)
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			return res, fmt.Errorf("dataset: %w", err)
		}
		res.Files = append(res.Files, path)
		res.Entries[path] = len(entries)
	}
	return res, nil
}
