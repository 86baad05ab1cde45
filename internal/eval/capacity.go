package eval

import (
	"fmt"
	"strings"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// Shape is what a model's KV cache costs per cell: its layers and the K (= V)
// elements one layer stores per cell (KV heads x head size).
type Shape struct {
	Name    string
	Layers  int
	KVWidth int
}

// KVSetting is the row types of a decode context: K always in TypeK; V in TypeV,
// which llama.cpp quantizes only with flash attention on.
type KVSetting struct {
	Name         string
	TypeK, TypeV string
}

// DefaultKVSettings are the decode layouts the server offers: f16; q8_0 keys with
// f16 values (flash attention off, the CPU default); q8_0 and q4_0 keys and values
// (flash attention on, the GPU default).
var DefaultKVSettings = []KVSetting{
	{"f16", "f16", "f16"},
	{"q8_0 K (flash attention off)", "q8_0", "f16"},
	{"q8_0 K+V (flash attention on)", "q8_0", "q8_0"},
	{"q4_0 K+V (flash attention on)", "q4_0", "q4_0"},
}

// BytesPerCell is what one cell costs across every layer, K and V.
func (s Shape) BytesPerCell(kv KVSetting) (int64, error) {
	k, err := llama.KVRowBytes(kv.TypeK, s.KVWidth)
	if err != nil {
		return 0, err
	}
	v, err := llama.KVRowBytes(kv.TypeV, s.KVWidth)
	if err != nil {
		return 0, err
	}
	return int64(s.Layers) * int64(k+v), nil
}

// CapacityRow is how many conversations of one length fit a memory under one
// cache setting and one row layout.
type CapacityRow struct {
	Policy        string
	KV            string
	Cells         int   // what the admission rule reserves for one conversation
	StreamCells   int   // the stream that holds it: Cells rounded up to 256 (llama.cpp)
	StreamBytes   int64 // its decode-stream memory
	Conversations int   // whole streams in the memory
}

// StreamGranularity is the cell multiple llama.cpp sizes each per-sequence
// stream in.
const StreamGranularity = 256

// Capacity applies the server's admission rule (a decode stream holds
// Spec.MaxCellsAfterPrompt(prompt, gen) cells: the whole conversation under
// full, ceil(b*(prompt+gen))+1 when the prompt plan compresses it in the prefill
// context; streams come in multiples of StreamGranularity cells) to memBytes of
// decode-context KV, for each setting and layout. The prefill context (one
// sequence, the prompt's cells) is a fixed cost besides.
func Capacity(shape Shape, prompt, gen int, memBytes int64, specs []elasticcache.Spec, kvs []KVSetting) ([]CapacityRow, error) {
	var out []CapacityRow
	for _, kv := range kvs {
		per, err := shape.BytesPerCell(kv)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", shape.Name, err)
		}
		for _, spec := range specs {
			cells := spec.MaxCellsAfterPrompt(prompt, gen)
			stream := (cells + StreamGranularity - 1) / StreamGranularity * StreamGranularity
			b := int64(stream) * per
			out = append(out, CapacityRow{Policy: specName(spec), KV: kv.Name, Cells: cells, StreamCells: stream, StreamBytes: b,
				Conversations: int(memBytes / b)})
		}
	}
	return out, nil
}

func specName(spec elasticcache.Spec) string {
	if !spec.Compresses() {
		return "full"
	}
	return fmt.Sprintf("%s %g", spec.Policy(), spec.Budget())
}

// CapacityMarkdown renders rows as a table with one column per KV layout.
func CapacityMarkdown(rows []CapacityRow, kvs []KVSetting) string {
	var b strings.Builder
	b.WriteString("| policy | cells per conversation | stream cells |")
	for _, kv := range kvs {
		fmt.Fprintf(&b, " %s |", kv.Name)
	}
	b.WriteString("\n|---|---:|---:|")
	for range kvs {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	byPolicy := map[string][]CapacityRow{}
	var order []string
	for _, r := range rows {
		if _, ok := byPolicy[r.Policy]; !ok {
			order = append(order, r.Policy)
		}
		byPolicy[r.Policy] = append(byPolicy[r.Policy], r)
	}
	for _, p := range order {
		rs := byPolicy[p]
		fmt.Fprintf(&b, "| %s | %d | %d |", p, rs[0].Cells, rs[0].StreamCells)
		for _, r := range rs {
			fmt.Fprintf(&b, " %d |", r.Conversations)
		}
		b.WriteString("\n")
	}
	return b.String()
}
