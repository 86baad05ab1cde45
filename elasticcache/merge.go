package elasticcache

import (
	"runtime"
	"sync"
)

// Rows is one layer's K or V rows of a sequence's cells, in the cache's own
// storage type (f16, bf16, f32), addressed by cell index.
type Rows interface {
	// Row decodes cell c into dst (len Width) as float32.
	Row(c int, dst []float32)
	// SetRow encodes src (len Width) into cell c.
	SetRow(c int, src []float32)
	// CopyRow copies cell from of src, which has the same storage type and
	// width, into cell c without conversion.
	CopyRow(c int, src Rows, from int)
	// Width is the number of values in one row.
	Width() int
}

// Store is a sequence's whole cache as the merge sees it.
type Store interface {
	Layers() int
	Keys(layer int) Rows
	Values(layer int) Rows
}

// Merge writes the phase 1 result of plan into dst: cell i of layer l (K and V)
// becomes the mean of src's rows of plan.Layers[l].Keep[i] and its merge group
// (a plain copy when the group is empty). cellOf maps a prompt index to its
// cell in src. dst must hold plan.K cells per layer with src's layout.
//
// This is the production form of ApplyLayer (the oracle the tests compare it
// with): it sums in float32 in the storage's row order and rounds once, to the
// storage type, when the row is written. Layers are independent and merged in
// parallel.
func Merge(plan *PrefillPlan, src, dst Store, cellOf []int) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for l := range plan.Layers {
		for _, part := range [][2]Rows{{src.Keys(l), dst.Keys(l)}, {src.Values(l), dst.Values(l)}} {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				mergeLayer(plan.Layers[l], part[0], part[1], cellOf)
			}()
		}
	}
	wg.Wait()
}

func mergeLayer(lp LayerPlan, in, out Rows, cellOf []int) {
	acc := make([]float32, in.Width())
	row := make([]float32, in.Width())
	for i, anchor := range lp.Keep {
		var group []int
		if i < len(lp.Groups) {
			group = lp.Groups[i]
		}
		if len(group) == 0 {
			out.CopyRow(i, in, cellOf[anchor])
			continue
		}
		in.Row(cellOf[anchor], acc)
		for _, g := range group {
			in.Row(cellOf[g], row)
			for j, v := range row {
				acc[j] += v
			}
		}
		inv := 1 / float32(len(group)+1)
		for j := range acc {
			acc[j] *= inv
		}
		out.SetRow(i, acc)
	}
}
