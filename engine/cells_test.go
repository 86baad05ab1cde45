package engine

import (
	"slices"
	"testing"
)

// splitEqual cuts a batch as llama.cpp's split_equal (sequential) does for a
// context with a stream per sequence.
func TestSplitEqualMirrorsLlama(t *testing.T) {
	for _, tc := range []struct {
		name    string
		seqs    []int
		nUBatch int
		want    [][]int
	}{
		{"one token each", []int{0, 1, 2, 3}, 512, [][]int{{0, 1, 2, 3}}},
		{"a gap in the streams splits", []int{0, 1, 3}, 512, [][]int{{0, 1}, {2}}},
		{"equal tokens per stream", []int{0, 0, 1, 1}, 512, [][]int{{0, 1, 2, 3}}},
		{"the shorter prompt ends the first ubatch", []int{0, 0, 0, 1}, 512, [][]int{{0, 3}, {1, 2}}},
		{"the bound cuts", []int{0, 0, 0, 1, 1, 1}, 4, [][]int{{0, 1, 3, 4}, {2, 5}}},
		{"one stream alone takes up to the bound", []int{2, 2, 2, 2, 2}, 4, [][]int{{0, 1, 2, 3}, {4}}},
		{"a decode step and a chunk", []int{0, 1, 1, 1, 2}, 512, [][]int{{0, 1, 4}, {2, 3}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := splitEqual(tc.seqs, tc.nUBatch)
			if !slices.EqualFunc(got, tc.want, slices.Equal) {
				t.Fatalf("splitEqual(%v, %d) = %v, want %v", tc.seqs, tc.nUBatch, got, tc.want)
			}
		})
	}
}

// shareBatch: a prompt that can finish in its even share does; the others get
// half their share, and the rest goes to those with the most left, whole levels at
// a time, so that a prompt that started ahead lets the others catch up.
func TestShareBatch(t *testing.T) {
	// a prompt of `left` entries still to encode, of which the current chunk holds `need`
	mk := func(lefts, needs []int) []*seq {
		var ss []*seq
		for i, l := range lefts {
			s := &seq{}
			s.nPrompt, s.nPast = l+5, 5
			s.chunks = []promptChunk{{n: needs[i] + 5}}
			s.chunkOff = 5
			ss = append(ss, s)
		}
		return ss
	}
	for _, tc := range []struct {
		name        string
		size        int
		lefts, need []int
		want        []int
	}{
		{"two alike split evenly", 512, []int{300, 300}, nil, []int{256, 256}},
		{"a short prompt finishes, the others share the rest", 512, []int{300, 10, 300, 300}, nil, []int{167, 10, 167, 167}},
		{"all finish", 512, []int{20, 30}, nil, []int{20, 30}},
		{"at least a token each", 4, []int{5, 5, 5, 5}, nil, []int{1, 1, 1, 1}},
		{"one that started ahead lets the burst catch up", 512, []int{488, 1000, 1000, 1000}, nil, []int{64, 149, 149, 149}},
		{"caught up: even again", 512, []int{424, 424, 424, 424}, nil, []int{128, 128, 128, 128}},
		{"a short prompt keeps half its share", 512, []int{300, 10000}, nil, []int{128, 384}},
		{"a chunk before a picture is not the prompt's end", 512, []int{100, 300}, []int{40, 300}, []int{40, 300}},
		{"one that can finish behind one that cannot", 512, []int{100, 120, 5000}, []int{40, 120, 5000}, []int{40, 120, 352}},
		{"a chunk caps its count", 512, []int{2000, 2000}, []int{100, 2000}, []int{100, 412}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			need := tc.need
			if need == nil {
				need = tc.lefts
			}
			if got := shareBatch(tc.size, mk(tc.lefts, need)); !slices.Equal(got, tc.want) {
				t.Errorf("shareBatch(%d, left %v, chunk %v) = %v, want %v", tc.size, tc.lefts, need, got, tc.want)
			}
		})
	}
}
