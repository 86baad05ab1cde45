package llama

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// The KV hook's cell operations (kvhook.cpp) checked against an oracle that does
// not share their code: the sequence state llama.cpp serializes, decoded by the
// hand-written codecs of kvstate.go, and elasticcache.ApplyLayer's float64 means.

// mergePlan is an elastic-like plan over n entries for nl layers: entries 0 and 1
// and the last are kept alone, every third entry from 2 (3 in odd layers, so that
// the layers keep different sets) is an anchor, and every other entry is averaged
// into the nearest anchor (ties: the earlier one).
func mergePlan(n, nl int) []elasticcache.LayerPlan {
	out := make([]elasticcache.LayerPlan, nl)
	for l := range out {
		keep := []int{0, 1}
		for i := 2 + l%2; i < n-1-(1-l%2); i += 3 { // as many anchors in every layer
			keep = append(keep, i)
		}
		keep = append(keep, n-1)
		groups := make([][]int, len(keep))
		for i := 2; i < n-1; i++ {
			if _, kept := slices.BinarySearch(keep, i); kept {
				continue
			}
			best := -1
			for k := 2; k < len(keep)-1; k++ {
				if best < 0 || abs(keep[k]-i) < abs(keep[best]-i) {
					best = k
				}
			}
			groups[best] = append(groups[best], i)
		}
		out[l] = elasticcache.LayerPlan{Keep: keep, Groups: groups}
	}
	return out
}

func abs(v int) int { return max(v, -v) }

// cellPlanOf turns per-layer plans over the sequence's cells (entry i is cells[i])
// into the hook's plan; positions and M-RoPE components are layer 0's kept entries'.
func cellPlanOf(part int, cells []Cell, layers []elasticcache.LayerPlan) *CellPlan {
	k := len(layers[0].Keep)
	p := &CellPlan{Part: part, N: k, First: -1, Sources: make([][][]int, len(layers)), Meta: make([]int, k), Pos: make([]int, k)}
	for l, lp := range layers {
		p.Sources[l] = make([][]int, k)
		for j, e := range lp.Keep {
			src := []int{cells[e].Index}
			if j < len(lp.Groups) {
				for _, g := range lp.Groups[j] {
					src = append(src, cells[g].Index)
				}
			}
			p.Sources[l][j] = src
		}
	}
	for j, e := range layers[0].Keep {
		p.Meta[j], p.Pos[j] = cells[e].Index, cells[e].Pos
	}
	return p
}

// stateRows decodes layer l's K or V rows of every cell of a state-read cache, in
// cell order.
func stateRows(sc *SeqCache, l int, v bool) [][]float32 {
	lr := &sc.K[l]
	if v {
		lr = &sc.V[l]
	}
	rows := make([][]float32, sc.Cells())
	for c := range rows {
		rows[c] = make([]float32, lr.RowElems)
		lr.Row(sc.Cells(), c, rows[c])
	}
	return rows
}

// withinRounding reports the first element of got that is further from want than
// one rounding of the cache type t allows: half a unit in the last place of an f16
// value (with a float32 accumulation margin), one quantization step of a q8_0 block.
func withinRounding(t int32, want, got []float32) (int, bool) {
	for b := 0; b < len(want); b += qk {
		blk := want[b:min(b+qk, len(want))]
		amax := float32(0)
		for _, x := range blk {
			amax = max(amax, abs32(x))
		}
		for i, w := range blk {
			var tol float64
			switch t {
			case typeQ8_0:
				tol = float64(amax)/127 + 1e-6
			default: // f16
				tol = math.Abs(float64(w))*math.Pow(2, -11)*1.01 + 6e-8
			}
			if math.Abs(float64(got[b+i]-w)) > tol {
				return b + i, false
			}
		}
	}
	return 0, true
}

func TestCellMergeMatchesFloat64Oracle(t *testing.T) {
	for _, arch := range []string{"", testmodel.ArchGemma3, testmodel.ArchQwen25VL, testmodel.ArchLLaVA16} {
		m := loadKVModel(t, arch)
		prompt := tokenizeOn(t, m, "USER: a prompt whose cells the hook merges into fewer cells, layer by layer ASSISTANT:")
		for _, p := range []ContextParams{
			{},
			{TypeK: "q8_0"},
			{TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true},
		} {
			for _, generic := range []bool{false, true} {
				c := newCtxOn(t, m, p)
				c.SetHookGeneric(generic) // the CPU's fused merge, or the graph other devices run
				path := map[bool]string{false: "fused", true: "generic"}[generic]
				t.Run(fmt.Sprintf("%s/%s/%s", cmp.Or(arch, "llama"), c.KVLayout(), path), func(t *testing.T) {
					decodeTokens(t, c, prompt, 0, 0)
					cells, err := c.SeqCells(0, 0)
					if err != nil {
						t.Fatal(err)
					}
					before, err := c.ReadSeqCache(0) // the oracle's rows: the serialized state
					if err != nil {
						t.Fatal(err)
					}
					layers, err := c.CacheLayers(0)
					if err != nil {
						t.Fatal(err)
					}
					if len(layers) != len(before.K) || len(cells) != len(prompt) {
						t.Fatalf("hook sees %d layers and %d cells, the state %d and %d", len(layers), len(cells), len(before.K), before.Cells())
					}
					lps := mergePlan(len(cells), len(layers))
					plan := cellPlanOf(0, cells, lps)
					first, err := c.RewriteCells(0, c, 0, plan)
					if err != nil {
						t.Fatal(err)
					}
					if first != 0 {
						t.Fatalf("rewrite started at cell %d, want 0 (the stream's first)", first)
					}
					after, err := c.ReadSeqCache(0)
					if err != nil {
						t.Fatal(err)
					}
					if after.Cells() != plan.N {
						t.Fatalf("the sequence holds %d cells, the plan wrote %d", after.Cells(), plan.N)
					}
					for l := range layers {
						for _, v := range []bool{false, true} {
							want := elasticcache.ApplyLayer(lps[l], stateRows(before, l, v))
							got := stateRows(after, l, v)
							typ := after.K[l].Type
							if v {
								typ = after.V[l].Type
							}
							for j := range want {
								if e, ok := withinRounding(typ, want[j], got[j]); !ok {
									t.Fatalf("layer %d V=%v cell %d elem %d: %g, the float64 mean is %g (%s)",
										l, v, j, e, got[j][e], want[j][e], typeName(typ))
								}
							}
							// ReadCellRows (ggml's dequantization) reads the same rows.
							idx := make([]int, plan.N)
							for j := range idx {
								idx[j] = j
							}
							hooked, err := c.ReadCellRows(0, 0, l, v, idx)
							if err != nil {
								t.Fatal(err)
							}
							for j := range got {
								if d := maxAbsDiff(got[j], hooked[j]); d > 1e-6 {
									t.Fatalf("layer %d V=%v cell %d: ReadCellRows differs from the state by %g", l, v, j, d)
								}
							}
						}
					}
					back, err := c.SeqCells(0, 0)
					if err != nil {
						t.Fatal(err)
					}
					for j, cell := range back {
						src := cells[lps[0].Keep[j]]
						if cell.Index != j || cell.Pos != src.Pos || cell.X != src.X || cell.Y != src.Y {
							t.Fatalf("cell %d reads back as %+v, the plan gave it %+v", j, cell, src)
						}
					}
					// The sequence decodes on, attending the shorter range.
					decodeTokens(t, c, []Token{prompt[1]}, len(prompt), 0)
					if c.SeqPosMax(0) != len(prompt) {
						t.Fatalf("after one more token the sequence ends at %d", c.SeqPosMax(0))
					}
				})
			}
		}
	}
}

// Moving a sequence into another context of the same layout copies its rows
// unconverted: the next token's logits are bit-identical to the source's. Into
// another layout (row types, V orientation) it continues as a direct decode there,
// within the error the types add (the bounds of the state-path test, measured the
// same way).
func TestCellMoveBetweenContexts(t *testing.T) {
	for _, arch := range []string{"", testmodel.ArchGemma3} {
		m := loadKVModel(t, arch)
		prompt := tokenizeOn(t, m, "USER: move this sequence to another cache layout ASSISTANT:")
		next := prompt[5]
		for _, c := range []struct {
			from, to ContextParams
			tol      float64 // 0: bit-identical to the source
		}{
			{ContextParams{}, ContextParams{NSeqMax: 2}, 0},
			{ContextParams{TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true}, ContextParams{TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true, NSeqMax: 2}, 0},
			{ContextParams{}, ContextParams{TypeK: "q8_0", NSeqMax: 2}, 0.25},
			{ContextParams{}, ContextParams{FlashAttn: true, NSeqMax: 2}, 0.012},
			{ContextParams{}, ContextParams{TypeK: "q8_0", TypeV: "q8_0", FlashAttn: true, NSeqMax: 2}, 0.22},
		} {
			src := newCtxOn(t, m, c.from)
			dst := newCtxOn(t, m, c.to)
			t.Run(fmt.Sprintf("%s/%s->%s", cmp.Or(arch, "llama"), src.KVLayout(), dst.KVLayout()), func(t *testing.T) {
				decodeTokens(t, src, prompt, 0, 0)
				for part := range src.CacheParts() {
					cells, err := src.SeqCells(part, 0)
					if err != nil {
						t.Fatal(err)
					}
					layers, _ := src.CacheLayers(part)
					plan := &CellPlan{Part: part, N: len(cells), First: -1, Sources: make([][][]int, len(layers))}
					for l := range layers {
						for _, cell := range cells {
							plan.Sources[l] = append(plan.Sources[l], []int{cell.Index})
						}
					}
					for _, cell := range cells {
						plan.Meta = append(plan.Meta, cell.Index)
						plan.Pos = append(plan.Pos, cell.Pos)
					}
					if _, err := src.RewriteCells(0, dst, 1, plan); err != nil {
						t.Fatal(err)
					}
				}
				if src.SeqPosMax(0) != -1 || dst.SeqPosMax(1) != len(prompt)-1 {
					t.Fatalf("after the move the source ends at %d, the destination at %d", src.SeqPosMax(0), dst.SeqPosMax(1))
				}
				ref := newCtxOn(t, m, c.to)
				var want []float32
				if c.tol == 0 {
					ref = newCtxOn(t, m, c.from)
				}
				decodeTokens(t, ref, prompt, 0, 0)
				want = decodeTokens(t, ref, []Token{next}, len(prompt), 0)
				got := decodeTokens(t, dst, []Token{next}, len(prompt), 1)
				d := maxAbsDiff(want, got)
				if d > c.tol {
					t.Fatalf("moved sequence's logits differ by %g (> %g)", d, c.tol)
				}
			})
		}
	}
}

// A plan the cache does not agree with is refused before anything changes.
func TestCellRewriteRefusesWhatItDoesNotUnderstand(t *testing.T) {
	m := loadKVModel(t, "")
	c := newCtxOn(t, m, ContextParams{NSeqMax: 2})
	prompt := tokenizeOn(t, m, "USER: refuse the bad plans ASSISTANT:")
	decodeTokens(t, c, prompt, 0, 0)
	cells, err := c.SeqCells(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := c.CacheLayers(0)
	good := cellPlanOf(0, cells, mergePlan(len(cells), len(layers)))
	bad := map[string]func(p *CellPlan){
		"a cell of another sequence": func(p *CellPlan) { p.Sources[0][1] = []int{len(cells) + 3} },
		"a slot without source":      func(p *CellPlan) { p.Sources[1][2] = nil },
		"too few layers":             func(p *CellPlan) { p.Sources = p.Sources[:1] },
		"a meta cell not its own":    func(p *CellPlan) { p.Meta[0] = -1 },
		"a run past the stream":      func(p *CellPlan) { p.First = c.NCtxSeq() - 1 },
	}
	before, err := c.ReadSeqCache(0)
	if err != nil {
		t.Fatal(err)
	}
	for name, breakIt := range bad {
		p := *good
		p.Sources = slices.Clone(good.Sources)
		for l := range p.Sources {
			p.Sources[l] = slices.Clone(good.Sources[l])
		}
		p.Meta = slices.Clone(good.Meta)
		breakIt(&p)
		_, err := c.RewriteCells(0, c, 0, &p)
		var he *HookError
		if !errors.As(err, &he) {
			t.Fatalf("%s: %v, want a HookError", name, err)
		}
		after, err := c.ReadSeqCache(0)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(before.Pos, after.Pos) || !slices.Equal(before.K[0].Data, after.K[0].Data) || !slices.Equal(before.V[1].Data, after.V[1].Data) {
			t.Fatalf("%s: the refused plan changed the sequence", name)
		}
	}
	if err := c.EvictCell(0, len(cells)+1); err == nil {
		t.Fatal("evicting a cell the sequence does not hold succeeded")
	}
}
