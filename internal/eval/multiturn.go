package eval

import (
	"context"
	"fmt"
	"strings"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/eval/answer"
)

// Conversation is one multi-turn image conversation: the picture goes with the
// first question, the later questions are text; Refs are each turn's reference
// answers ("" for a turn that is not scored, such as a description).
type Conversation struct {
	ID        string
	Image     []byte
	TextFirst bool // the first question comes before the picture
	Questions []string
	Refs      []string
	MaxTokens []int // per turn
}

// Memory modes of the multi-turn protocol.
const (
	// ReEncode sends every turn as a fresh request: the whole history is encoded
	// (and, under a compressing policy, compressed) again.
	ReEncode = "re-encode"
	// Memory continues the conversation from its held cells: only the new turn is
	// encoded (engine.Options.ReuseCompressed).
	Memory = "memory"
)

// TurnStats is what one setting and mode did on one turn, over all conversations.
type TurnStats struct {
	Scored, Correct int
	Continued       int     // turns that continued from held cells
	CachedTokens    int     // prompt tokens not encoded again
	PromptTokens    int     //
	FinalCells      int     // cells held when the turn ended
	PrefillMs       float64 // prompt encoding (and its plan), summed
}

// MultiTurnRow is one setting in one memory mode.
type MultiTurnRow struct {
	Config string
	Mode   string
	Turns  []TurnStats
}

// Accuracy is the share of scored turns answered correctly (turns from 1 on).
func (r MultiTurnRow) Accuracy() float64 {
	s, c := 0, 0
	for _, t := range r.Turns {
		s += t.Scored
		c += t.Correct
	}
	if s == 0 {
		return 0
	}
	return float64(c) / float64(s)
}

// MultiTurn runs every conversation under each setting, first re-encoding each
// turn, then continuing from held cells, one conversation at a time (greedy,
// one slot: reproducible). Each answer goes back into the history as generated.
func (r *Runner) MultiTurn(ctx context.Context, convs []Conversation, cfgs []elasticcache.Spec) ([]MultiTurnRow, error) {
	var rows []MultiTurnRow
	for _, cfg := range cfgs {
		for _, mode := range []string{ReEncode, Memory} {
			row, err := r.multiTurnRow(ctx, convs, cfg, mode)
			if err != nil {
				return nil, fmt.Errorf("%s, %s: %w", configName(cfg), mode, err)
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

func (r *Runner) multiTurnRow(ctx context.Context, convs []Conversation, cfg elasticcache.Spec, mode string) (MultiTurnRow, error) {
	e, err := engine.Start(r.model, r.vision, engine.Options{
		Parallel: 1, CtxSize: r.opts.CtxSize, BatchSize: r.opts.BatchSize, Threads: r.opts.Threads,
		KVType: r.opts.KVType, PrefillCtx: r.opts.PrefillCtx,
		Reuse: mode == Memory, ReuseCompressed: mode == Memory, ImageCacheBytes: 0, Log: r.log,
	})
	if err != nil {
		return MultiTurnRow{}, err
	}
	defer func() {
		stop, cancel := context.WithCancel(context.Background())
		cancel()
		e.Stop(stop)
	}()
	row := MultiTurnRow{Config: configName(cfg), Mode: mode}
	for _, c := range convs {
		var history []completion.Message
		if r.opts.System != "" {
			history = append(history, completion.Message{Role: "system", Parts: []completion.Part{completion.Text(r.opts.System)}})
		}
		for turn, q := range c.Questions {
			parts := []completion.Part{completion.Text(q)}
			if turn == 0 {
				img := completion.Image(c.Image)
				if c.TextFirst {
					parts = append(parts, img)
				} else {
					parts = append([]completion.Part{img}, parts...)
				}
			}
			history = append(history, completion.Message{Role: "user", Parts: parts})
			req := &completion.Request{ID: fmt.Sprintf("%s-t%d", c.ID, turn), Messages: history, MaxTokens: c.MaxTokens[turn],
				Sampling: greedy(r.opts.Seed), Cache: cfg}
			res, err := e.Complete(ctx, req)
			if err != nil {
				return row, fmt.Errorf("%s turn %d: %w", c.ID, turn, err)
			}
			for len(row.Turns) <= turn {
				row.Turns = append(row.Turns, TurnStats{})
			}
			st := &row.Turns[turn]
			fin := res.Final
			st.PromptTokens += fin.Usage.PromptTokens
			st.CachedTokens += fin.Usage.CachedTokens
			if fin.Usage.CachedTokens > 0 {
				st.Continued++
			}
			if fin.KV != nil {
				st.FinalCells += fin.KV.FinalCells
				st.PrefillMs += fin.KV.PrefillMs + fin.KV.CompressMs
			}
			if ref := c.Refs[turn]; ref != "" {
				st.Scored++
				if answer.Correct(res.Text, ref) {
					st.Correct++
				}
			}
			history = append(history, completion.Message{Role: "assistant", Parts: []completion.Part{completion.Text(res.Text)}})
		}
	}
	return row, nil
}

// MultiTurnMarkdown is the table of rows: per setting and mode, the accuracy of
// the scored turns, how many turns continued from held cells, the prompt tokens
// encoded, the cells held after the last turn and the prompt time per turn.
func MultiTurnMarkdown(rows []MultiTurnRow, convs int) string {
	var b strings.Builder
	b.WriteString("| setting | mode | accuracy | per turn | turns continued | prompt tokens encoded | cells after last turn | prompt ms / turn |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		cont, turns, enc, prompt := 0, 0, 0, 0
		ms := 0.0
		for _, t := range r.Turns {
			cont += t.Continued
			turns += convs
			enc += t.PromptTokens - t.CachedTokens
			prompt += t.PromptTokens
			ms += t.PrefillMs
		}
		last := r.Turns[len(r.Turns)-1]
		var per []string
		for _, t := range r.Turns {
			if t.Scored > 0 {
				per = append(per, fmt.Sprintf("%.0f", 100*float64(t.Correct)/float64(t.Scored)))
			} else {
				per = append(per, "-")
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %.1f%% | %s | %d/%d | %.0f%% | %.1f | %.1f |\n", r.Config, r.Mode, 100*r.Accuracy(), strings.Join(per, " / "), cont, turns,
			100*float64(enc)/float64(max(prompt, 1)), float64(last.FinalCells)/float64(max(convs, 1)), ms/float64(max(turns, 1)))
	}
	return b.String()
}
