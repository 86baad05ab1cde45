package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/elasticserve/elasticserve/internal/eval"
)

const cmdMultiTurn = "multiturn"

// multiTurn runs the multi-turn protocol on the demo model's held-out pictures.
func multiTurn(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	r, ro, err := openRunner(cmdMultiTurn, args, stderr)
	if err != nil {
		return err
	}
	defer r.Close()
	convs, err := heldoutConversations(ro.Data, ro.MaxSamples)
	if err != nil {
		return err
	}
	rows, err := r.MultiTurn(ctx, convs, r.Configs())
	if err != nil {
		return err
	}
	table := eval.MultiTurnMarkdown(rows, len(convs))
	fmt.Fprint(stdout, table)
	if ro.Out != "" {
		if err := os.MkdirAll(ro.Out, 0o755); err != nil {
			return err
		}
		path := filepath.Join(ro.Out, "multiturn.md")
		note := fmt.Sprintf("%d three-turn conversations from %s (a color or position question with the picture, the count, another color or position question; all scored).\n\n", len(convs), ro.Data)
		if err := os.WriteFile(path, []byte(note+table), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "wrote %s\n", path)
	}
	return nil
}

// heldoutConversations builds one conversation per picture of a held-out file
// (models/demo/heldout.json): the picture's first color or position question with
// the picture (laid out as the file says), then "How many shapes are there?",
// then its second color or position question; every turn is scored against its
// reference.
func heldoutConversations(path string, limit int) ([]eval.Conversation, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var file struct {
		Questions []struct {
			Image     string `json:"image"`
			Question  string `json:"question"`
			TextFirst bool   `json:"text_first"`
			Kind      string `json:"kind"`
			Reference string `json:"reference"`
		} `json:"questions"`
	}
	if err := json.Unmarshal(b, &file); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	type parts struct {
		describe, count int
		attrs           []int
		textFirst       bool
	}
	byImage := map[string]*parts{}
	var order []string
	for i, q := range file.Questions {
		p := byImage[q.Image]
		if p == nil {
			p = &parts{describe: -1, count: -1}
			byImage[q.Image] = p
			order = append(order, q.Image)
		}
		switch {
		case q.Kind == "describe" || strings.HasPrefix(q.Question, "Describe"):
			p.describe = i
		case strings.HasPrefix(q.Question, "How many"):
			p.count = i
		default:
			if len(p.attrs) == 0 {
				p.textFirst = q.TextFirst
			}
			p.attrs = append(p.attrs, i)
		}
	}
	var out []eval.Conversation
	for _, img := range order {
		p := byImage[img]
		if p.count < 0 || len(p.attrs) < 2 {
			continue
		}
		data, err := os.ReadFile(filepath.Join(filepath.Dir(path), img))
		if err != nil {
			return nil, err
		}
		q := file.Questions
		out = append(out, eval.Conversation{
			ID: strings.TrimSuffix(filepath.Base(img), filepath.Ext(img)), Image: data, TextFirst: p.textFirst,
			Questions: []string{q[p.attrs[0]].Question, q[p.count].Question, q[p.attrs[1]].Question},
			Refs:      []string{q[p.attrs[0]].Reference, q[p.count].Reference, q[p.attrs[1]].Reference},
			MaxTokens: []int{24, 24, 24},
		})
		if limit > 0 && len(out) == limit {
			break
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no picture has a describe, a count and a color or position question", path)
	}
	return out, nil
}
