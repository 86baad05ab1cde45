package elasticcache

import (
	"math/bits"
	"slices"
)

// selectSmallest reorders keys so that keys[:k] hold the k smallest values
// (in no particular order). Keys must be distinct. It is a quickselect with a
// median-of-three pivot that falls back to a full sort of the remaining range
// if partitioning keeps going badly, so the worst case stays O(n log n).
func selectSmallest(keys []uint64, k int) {
	lo, hi := 0, len(keys) // the k-th boundary lies in keys[lo:hi]
	if k <= 0 || k >= hi {
		return
	}
	budget := 2*bits.Len(uint(hi)) + 4
	for hi-lo > 16 {
		if budget == 0 {
			slices.Sort(keys[lo:hi])
			return
		}
		budget--
		p := partitionKeys(keys[lo:hi]) + lo // keys[p] is in its sorted place
		switch {
		case p == k || p == k-1:
			return
		case p < k:
			lo = p + 1
		default:
			hi = p
		}
	}
	slices.Sort(keys[lo:hi])
}

// partitionKeys partitions s around a median-of-three pivot and returns the
// pivot's final index: everything before it is smaller, everything after larger.
func partitionKeys(s []uint64) int {
	last := len(s) - 1
	mid := last / 2
	// Order s[0], s[mid], s[last]; the median ends at s[mid], moved to the end.
	if s[mid] < s[0] {
		s[mid], s[0] = s[0], s[mid]
	}
	if s[last] < s[0] {
		s[last], s[0] = s[0], s[last]
	}
	if s[last] < s[mid] {
		s[last], s[mid] = s[mid], s[last]
	}
	s[mid], s[last] = s[last], s[mid]
	pivot := s[last]
	i := 0
	for j := 0; j < last; j++ {
		if s[j] < pivot {
			s[i], s[j] = s[j], s[i]
			i++
		}
	}
	s[i], s[last] = s[last], s[i]
	return i
}
