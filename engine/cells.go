package engine

import "slices"

// cellPool mirrors how llama.cpp's KV cache (v0.17.4, llama_kv_cache::find_slot with
// cont=false, apply_ubatch, seq_rm) places tokens in the cells of one stream. The engine
// needs to know which cell holds which entry because captured attention comes per cell.
// A unified cache has one pool for every sequence; otherwise each sequence has its own.
// A test compares this bookkeeping with the cells llama.cpp reports.
type cellPool struct {
	owner []int // sequence id per cell, -1 when free
	used  int
	head  int
	ubat  int // tokens per ubatch: llama.cpp places each ubatch separately
}

func newCellPool(size, ubatch int) *cellPool {
	p := &cellPool{owner: make([]int, size), ubat: max(ubatch, 1)}
	for i := range p.owner {
		p.owner[i] = -1
	}
	return p
}

func (p *cellPool) size() int { return len(p.owner) }

func (p *cellPool) free() int { return len(p.owner) - p.used }

// place assigns cells to the tokens of one llama_decode call, given in batch order by
// the sequence each belongs to, split into ubatches as llama.cpp splits them.
func (p *cellPool) place(seqs []int) ([]int, bool) {
	out := make([]int, 0, len(seqs))
	for start := 0; start < len(seqs); start += p.ubat {
		cells, ok := p.placeUBatch(seqs[start:min(start+p.ubat, len(seqs))])
		if !ok {
			return nil, false
		}
		out = append(out, cells...)
	}
	return out, true
}

// placeUBatch is find_slot (non-contiguous) followed by apply_ubatch for one ubatch.
func (p *cellPool) placeUBatch(seqs []int) ([]int, bool) {
	n := len(seqs)
	size := len(p.owner)
	if n > p.free() {
		return nil, false
	}
	cur := p.head
	// llama.cpp restarts from cell 0 when enough cells are free before the head.
	if cur > p.used+2*n {
		cur = 0
	}
	cells := make([]int, 0, n)
	tested := 0
	for len(cells) < n {
		if cur+1 > size {
			tested += size - cur
			cur = 0
			continue
		}
		if p.owner[cur] < 0 {
			cells = append(cells, cur)
		}
		cur++
		tested++
		if len(cells) < n && tested >= size {
			return nil, false
		}
	}
	for i, c := range cells {
		p.owner[c] = seqs[i]
	}
	p.used += n
	p.head = cells[n-1] + 1
	return cells, true
}

// release frees cells (llama_memory_seq_rm on their positions); the head moves back to
// the first freed cell, as seq_rm does.
func (p *cellPool) release(cells ...int) {
	first := len(p.owner)
	for _, c := range cells {
		if p.owner[c] >= 0 {
			p.owner[c] = -1
			p.used--
			first = min(first, c)
		}
	}
	if first < p.head {
		p.head = first
	}
}

// releaseAll frees every cell of seq (seq_rm over all positions).
func (p *cellPool) releaseAll(seq int) {
	var cells []int
	for c, o := range p.owner {
		if o == seq {
			cells = append(cells, c)
		}
	}
	p.release(cells...)
}

// assign gives cells to seq as one written run (the KV hook's rewrite): the head
// moves past the last, as llama.cpp's does after placing a ubatch.
func (p *cellPool) assign(seq int, cells []int) {
	for _, c := range cells {
		if p.owner[c] < 0 {
			p.used++
		}
		p.owner[c] = seq
	}
	if len(cells) > 0 {
		p.head = cells[len(cells)-1] + 1
	}
}

// splitEqual mirrors llama.cpp's llama_batch_allocr::split_equal with sequential
// set (how a context with a stream per sequence cuts a batch into ubatches): seqs
// is the sequence of each batch token, in batch order, one sequence per token. A
// ubatch takes the runs of consecutive sequence ids in order of their first unused
// token (ids must go up by one), then one token of each in turn while every one has
// a token left and the ubatch stays within nUBatch. It returns the ubatches as
// batch indices, each sequence's tokens together, in the order of the runs.
func splitEqual(seqs []int, nUBatch int) [][]int {
	used := make([]bool, len(seqs))
	left := len(seqs)
	var out [][]int
	for left > 0 {
		var set []int // sequence ids in this ubatch, in order
		for i, s := range seqs {
			if used[i] || slices.Contains(set, s) {
				continue
			}
			if len(set) > 0 && s != set[len(set)-1]+1 {
				continue
			}
			set = append(set, s)
			if len(set) > nUBatch {
				break
			}
		}
		per := make([][]int, len(set))
		next := make([]int, len(set)) // the next batch index to look at, per sequence
		for {
			grow := true
			for k, s := range set {
				for next[k] < len(seqs) && (used[next[k]] || seqs[next[k]] != s) {
					next[k]++
				}
				if next[k] == len(seqs) {
					grow = false
				}
			}
			if !grow {
				break
			}
			for k := range set {
				per[k] = append(per[k], next[k])
				used[next[k]] = true
				left--
			}
			if (len(per[0])+1)*len(set) > nUBatch {
				break
			}
		}
		var ub []int
		for _, p := range per {
			ub = append(ub, p...)
		}
		out = append(out, ub)
	}
	return out
}
