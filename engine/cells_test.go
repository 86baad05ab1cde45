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

// shareBatch fills the call: a chunk that needs less than its even share leaves
// the rest to the others.
func TestShareBatchFillsTheCall(t *testing.T) {
	mk := func(needs ...int) []*seq {
		var ss []*seq
		for _, n := range needs {
			s := &seq{}
			s.chunks = []promptChunk{{n: n + 5}}
			s.chunkOff = 5
			ss = append(ss, s)
		}
		return ss
	}
	for _, tc := range []struct {
		size  int
		needs []int
		want  []int
	}{
		{512, []int{300, 300}, []int{256, 256}},
		{512, []int{300, 10, 300, 300}, []int{167, 10, 167, 168}},
		{512, []int{20, 30}, []int{20, 30}},
		{4, []int{5, 5, 5, 5}, []int{1, 1, 1, 1}},
	} {
		if got := shareBatch(tc.size, mk(tc.needs...)); !slices.Equal(got, tc.want) {
			t.Errorf("shareBatch(%d, %v) = %v, want %v", tc.size, tc.needs, got, tc.want)
		}
	}
}
