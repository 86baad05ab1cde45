package llama

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// fillSeq decodes prompt into seq of c; an M-RoPE model gets a 2x3 grid of
// embeddings after the first three tokens (so that its cells carry x/y
// components). It returns the next position.
func fillSeq(t *testing.T, c *Context, m *Model, prompt []Token, seq int, mrope bool) int {
	t.Helper()
	if !mrope {
		decodeTokens(t, c, prompt, 0, seq)
		return len(prompt)
	}
	decodeTokens(t, c, prompt[:3], 0, seq)
	eb := NewBatchMRoPE(6, m.info.Embd, 1)
	defer eb.Close()
	row := make([]float32, m.info.Embd)
	for i := range 6 {
		for k := range row {
			row[k] = float32(math.Sin(float64(7*i+k))) * 0.5
		}
		eb.AddEmbdMRoPE(row, 3, 3+i/3, 3+i%3, seq, false)
	}
	if err := c.Decode(eb); err != nil {
		t.Fatal(err)
	}
	decodeTokens(t, c, prompt[3:], 6, seq) // the grid took max(2, 3) positions
	return 6 + len(prompt) - 3
}

func seqCellIndices(t *testing.T, c *Context, seq int) [][]int {
	t.Helper()
	out := make([][]int, c.CacheParts())
	for part := range out {
		cells, err := c.SeqCells(part, seq)
		if err != nil {
			t.Fatal(err)
		}
		for _, cell := range cells {
			out[part] = append(out[part], cell.Index)
		}
	}
	return out
}

// A sequence exported to host bytes and imported into another context holds the
// same rows, positions and M-RoPE components there, and the next token's logits
// are bit-identical to the source's.
func TestCellSnapshotRoundTrip(t *testing.T) {
	for _, arch := range []string{"", testmodel.ArchGemma3, testmodel.ArchQwen25VL} {
		m := loadKVModel(t, arch)
		mrope := arch == testmodel.ArchQwen25VL
		prompt := tokenizeOn(t, m, "USER: keep this conversation in host memory for later ASSISTANT:")
		for _, p := range []ContextParams{{}, {TypeK: "q8_0"}, {TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true}} {
			for _, generic := range []bool{false, true} {
				src := newCtxOn(t, m, p)
				q := p
				q.NSeqMax = 2
				dst := newCtxOn(t, m, q)
				// generic: a transposed V goes through the graph a GPU runs
				src.SetHookGeneric(generic)
				dst.SetHookGeneric(generic)
				path := map[bool]string{false: "host", true: "generic"}[generic]
				t.Run(fmt.Sprintf("%s/%s/%s", cmp.Or(arch, "llama"), src.KVLayout(), path), func(t *testing.T) {
					next := fillSeq(t, src, m, prompt, 0, mrope)
					cells := seqCellIndices(t, src, 0)
					snap, err := src.ExportCells(0, cells)
					if err != nil {
						t.Fatal(err)
					}
					if snap.Cells() != len(cells[0]) || snap.Bytes() <= 0 {
						t.Fatalf("snapshot of %d cells, %d bytes", snap.Cells(), snap.Bytes())
					}
					if generic { // both paths write the documented layout
						src.SetHookGeneric(false)
						plain, err := src.ExportCells(0, cells)
						src.SetHookGeneric(true)
						if err != nil {
							t.Fatal(err)
						}
						for part := range plain.Parts {
							for l := range plain.Parts[part].V {
								if !slices.Equal(plain.Parts[part].K[l], snap.Parts[part].K[l]) || !slices.Equal(plain.Parts[part].V[l], snap.Parts[part].V[l]) {
									t.Fatalf("part %d layer %d: the graph's bytes differ from the host copy's", part, l)
								}
							}
						}
					}
					firsts, err := dst.ImportCells(1, snap)
					if err != nil {
						t.Fatal(err)
					}
					for part := range cells {
						want, _ := src.SeqCells(part, 0)
						got, err := dst.SeqCells(part, 1)
						if err != nil {
							t.Fatal(err)
						}
						if len(got) != len(want) || got[0].Index != firsts[part] {
							t.Fatalf("part %d: %d cells from %d, want %d from %d", part, len(got), got[0].Index, len(want), firsts[part])
						}
						for i := range want {
							if got[i].Pos != want[i].Pos || got[i].X != want[i].X || got[i].Y != want[i].Y {
								t.Fatalf("part %d cell %d: %+v, the source's %+v", part, i, got[i], want[i])
							}
						}
						if mrope && part == 0 && !slices.ContainsFunc(got, func(c Cell) bool { return c.X > 3 }) {
							t.Fatal("no imported cell carries an M-RoPE column")
						}
						layers, _ := src.CacheLayers(part)
						dcells := make([]int, len(got))
						for i := range got {
							dcells[i] = got[i].Index
						}
						for l := range layers {
							for _, v := range []bool{false, true} {
								a, err := src.ReadCellRows(part, 0, l, v, cells[part])
								if err != nil {
									t.Fatal(err)
								}
								b, err := dst.ReadCellRows(part, 1, l, v, dcells)
								if err != nil {
									t.Fatal(err)
								}
								for i := range a {
									if !slices.Equal(a[i], b[i]) {
										t.Fatalf("part %d layer %d V=%v cell %d: rows differ", part, l, v, i)
									}
								}
							}
						}
					}
					want := decodeTokens(t, src, []Token{prompt[1]}, next, 0)
					got := decodeTokens(t, dst, []Token{prompt[1]}, next, 1)
					if d := maxAbsDiff(want, got); d != 0 {
						t.Fatalf("the imported sequence's next logits differ by %g", d)
					}
				})
			}
		}
	}
}

// An import into a cache of another layout, or without room, and an export of
// cells the sequence does not hold, are refused with a HookError and change
// nothing.
func TestCellSnapshotRefusals(t *testing.T) {
	m := loadKVModel(t, "")
	prompt := tokenizeOn(t, m, "USER: a conversation that only fits its own kind of cache ASSISTANT:")
	src := newCtxOn(t, m, ContextParams{})
	decodeTokens(t, src, prompt, 0, 0)
	cells := seqCellIndices(t, src, 0)
	snap, err := src.ExportCells(0, cells)
	if err != nil {
		t.Fatal(err)
	}
	var he *HookError
	if _, err := src.ExportCells(0, [][]int{{len(prompt) + 2}}); !errors.As(err, &he) {
		t.Fatalf("exporting a cell the sequence does not hold: %v, want a HookError", err)
	}
	for name, p := range map[string]ContextParams{
		"q8_0 K":         {TypeK: "q8_0"},
		"flash (V rows)": {FlashAttn: true},
		"no room":        {},
	} {
		dst := newCtxOn(t, m, p)
		if name == "no room" { // another sequence leaves one cell too few
			fill := slices.Repeat(prompt[1:2], dst.NCtxSeq()-len(prompt)+1)
			decodeTokens(t, dst, fill, 0, 0)
			defer dst.SeqClear(0)
		}
		if _, err := dst.ImportCells(0, snap); !errors.As(err, &he) {
			t.Fatalf("%s: %v, want a HookError", name, err)
		}
		if got, _ := dst.SeqCells(0, 0); len(got) != 0 && name != "no room" {
			t.Fatalf("%s: the refused import left %d cells", name, len(got))
		}
	}
	broken := *snap
	broken.Parts = []PartSnapshot{snap.Parts[0]}
	broken.Parts[0].K = slices.Clone(snap.Parts[0].K)
	broken.Parts[0].K[1] = broken.Parts[0].K[1][:7]
	dst := newCtxOn(t, m, ContextParams{})
	if _, err := dst.ImportCells(0, &broken); !errors.As(err, &he) {
		t.Fatalf("a truncated layer: %v, want a HookError", err)
	}
}
