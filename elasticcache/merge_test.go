package elasticcache

import (
	"fmt"
	"math"
	"math/rand"
	"slices"
	"testing"
)

// f32Rows is one layer's K or V rows stored as float32, one row per cell. It
// records how each cell was last written so a test can tell a CopyRow from a
// SetRow; Merge gives each Rows to a single goroutine, so no locking is needed.
type f32Rows struct {
	width  int
	data   []float32
	copied []bool // cell c was last written by CopyRow
	set    []bool // cell c was last written by SetRow
}

func newF32Rows(cells, width int, fill func() float32) *f32Rows {
	r := &f32Rows{width: width, data: make([]float32, cells*width), copied: make([]bool, cells), set: make([]bool, cells)}
	for i := range r.data {
		r.data[i] = fill()
	}
	return r
}

func (r *f32Rows) cell(c int) []float32 { return r.data[c*r.width : (c+1)*r.width] }

func (r *f32Rows) Row(c int, dst []float32) { copy(dst, r.cell(c)) }

func (r *f32Rows) SetRow(c int, src []float32) {
	copy(r.cell(c), src)
	r.set[c], r.copied[c] = true, false
}

func (r *f32Rows) CopyRow(c int, src Rows, from int) {
	copy(r.cell(c), src.(*f32Rows).cell(from))
	r.copied[c], r.set[c] = true, false
}

func (r *f32Rows) Width() int { return r.width }

// f32Store holds K and V per layer. K and V get different widths so that a
// merge that mixes them up fails loudly.
type f32Store struct{ k, v []*f32Rows }

func newF32Store(layers, cells, kWidth, vWidth int, fill func() float32) *f32Store {
	s := &f32Store{}
	for range layers {
		s.k = append(s.k, newF32Rows(cells, kWidth, fill))
		s.v = append(s.v, newF32Rows(cells, vWidth, fill))
	}
	return s
}

func (s *f32Store) Layers() int           { return len(s.k) }
func (s *f32Store) Keys(layer int) Rows   { return s.k[layer] }
func (s *f32Store) Values(layer int) Rows { return s.v[layer] }

// promptRows reads rows in prompt order (row j from cell cellOf[j]), the form
// ApplyLayer takes.
func promptRows(r *f32Rows, cellOf []int) [][]float32 {
	rows := make([][]float32, len(cellOf))
	for j, c := range cellOf {
		rows[j] = slices.Clone(r.cell(c))
	}
	return rows
}

func absRows(rows [][]float32) [][]float32 {
	out := make([][]float32, len(rows))
	for j, row := range rows {
		out[j] = make([]float32, len(row))
		for d, v := range row {
			out[j][d] = float32(math.Abs(float64(v)))
		}
	}
	return out
}

// Merge is the production form of ApplyLayer: on every layer, for K and V, it
// must produce the oracle's rows from cells laid out in any order, copy
// unmerged entries bit for bit, and leave its source alone.
func TestMergeMatchesApplyLayerOnEveryLayer(t *testing.T) {
	const (
		layers, n      = 4, 120
		kWidth, vWidth = 8, 5
		spare          = 7 // src cells no prompt entry maps to
	)
	for _, pol := range []Policy{Elastic, H2O, Local} {
		for _, b := range []float64{0.2, 0.5, 0.9} {
			t.Run(fmt.Sprintf("%s/%v", pol, b), func(t *testing.T) {
				r := rand.New(rand.NewSource(int64(len(pol))*100 + int64(b*100)))
				tr, err := NewTracker(MustSpec(Config{Policy: pol, Budget: b, Sink: 4, Distance: -25}), layers)
				if err != nil {
					t.Fatal(err)
				}
				plan, err := tr.PlanPrefill(n, randomScores(r, layers, n, 0))
				if err != nil || plan == nil {
					t.Fatalf("PlanPrefill = %v, %v; want a plan", plan, err)
				}
				// Only elastic chooses per layer; h2o and local share one Keep.
				if pol == Elastic && !layersDiffer(plan) {
					t.Fatal("every layer chose the same anchors: the test would not catch a layer mix-up")
				}

				// Cells shuffled relative to prompt positions, with spare
				// cells full of NaN: reading a cell cellOf does not name
				// (or reading cell j for entry j) spoils the result.
				perm := r.Perm(n + spare)
				cellOf := perm[:n]
				if slices.IsSorted(cellOf) {
					t.Fatal("cellOf is in prompt order")
				}
				src := newF32Store(layers, n+spare, kWidth, vWidth, func() float32 { return float32(r.NormFloat64()) })
				nan := float32(math.NaN())
				for _, rows := range slices.Concat(src.k, src.v) {
					for _, c := range perm[n:] {
						for d := range rows.width {
							rows.cell(c)[d] = nan
						}
					}
				}
				before := storeBits(src)
				// NaN in dst shows any cell Merge forgets to write.
				dst := newF32Store(layers, plan.K, kWidth, vWidth, func() float32 { return nan })

				Merge(plan, src, dst, cellOf)

				emptyGroups, merged := 0, 0
				for l, lp := range plan.Layers {
					for part, pair := range [][2]*f32Rows{{src.k[l], dst.k[l]}, {src.v[l], dst.v[l]}} {
						in, out := pair[0], pair[1]
						name := [2]string{"K", "V"}[part]
						rows := promptRows(in, cellOf)
						want := ApplyLayer(lp, rows)
						// Merge sums in float32, the oracle in float64: allow a
						// relative 1e-5 of the group's mean magnitude, so that
						// groups whose signs cancel are not held to more.
						scale := ApplyLayer(lp, absRows(rows))
						for i := range lp.Keep {
							got := out.cell(i)
							if len(groupOf(lp, i)) == 0 {
								emptyGroups++
								orig := rows[lp.Keep[i]]
								for d := range got {
									if math.Float32bits(got[d]) != math.Float32bits(orig[d]) {
										t.Fatalf("layer %d %s slot %d (entry %d, no group): got %v, want a bit copy of %v", l, name, i, lp.Keep[i], got, orig)
									}
								}
								if !out.copied[i] {
									t.Fatalf("layer %d %s slot %d (no group) was not written with CopyRow", l, name, i)
								}
								continue
							}
							merged++
							if !out.set[i] {
								t.Fatalf("layer %d %s slot %d (group %v) was not written with SetRow", l, name, i, groupOf(lp, i))
							}
							for d := range got {
								diff := math.Abs(float64(got[d]) - float64(want[i][d]))
								if !(diff <= 1e-5*float64(scale[i][d])) {
									t.Fatalf("layer %d %s slot %d [%d]: Merge %v, ApplyLayer %v (group %v)", l, name, i, d, got[d], want[i][d], groupOf(lp, i))
								}
							}
						}
					}
				}
				if emptyGroups == 0 {
					t.Fatal("no kept entry without a group: the copy path went untested")
				}
				if pol == Elastic && merged == 0 {
					t.Fatal("elastic merged nothing: the averaging path went untested")
				}
				if !slices.EqualFunc(storeBits(src), before, slices.Equal) {
					t.Fatal("Merge wrote to its source")
				}
			})
		}
	}
}

// layersDiffer reports whether at least two layers keep different entries.
func layersDiffer(p *PrefillPlan) bool {
	for _, lp := range p.Layers[1:] {
		if !slices.Equal(lp.Keep, p.Layers[0].Keep) {
			return true
		}
	}
	return false
}

// storeBits is every row of s (K then V, layer by layer) as float32 bits, so
// that NaN cells compare equal to themselves.
func storeBits(s *f32Store) [][]uint32 {
	var out [][]uint32
	for _, rows := range slices.Concat(s.k, s.v) {
		b := make([]uint32, len(rows.data))
		for i, x := range rows.data {
			b[i] = math.Float32bits(x)
		}
		out = append(out, b)
	}
	return out
}
