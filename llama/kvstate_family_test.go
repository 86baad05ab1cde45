package llama

import (
	"strings"
	"testing"
)

// synthCache is a one-stream cache of n cells and nl f16 layers (V transposed).
func synthCache(n, nl, width int) *SeqCache {
	s := &SeqCache{NStream: 2, Stream: 1, Pos: make([]int32, n)}
	for i := range s.Pos {
		s.Pos[i] = int32(i)
	}
	for range nl {
		k := LayerRows{Type: typeF16, ElemSize: 2, RowElems: width, Data: make([]byte, 2*width*n)}
		v := LayerRows{Type: typeF16, ElemSize: 2, RowElems: width, Trans: true, Data: make([]byte, 2*width*n)}
		for i := range k.Data {
			k.Data[i], v.Data[i] = byte(i), byte(3*i)
		}
		s.K, s.V = append(s.K, k), append(s.V, v)
	}
	return s
}

func TestParseStateOfASlidingWindowModel(t *testing.T) {
	info := ModelInfo{Arch: "gemma3", Layers: 12, SWA: 32, FullLayers: fullLayers("gemma3", 12)}
	if len(info.FullLayers) != 2 || info.FullLayers[0] != 5 || info.FullLayers[1] != 11 {
		t.Fatalf("gemma3 full-attention layers %v", info.FullLayers)
	}
	base, swa := synthCache(7, 2, 8), synthCache(5, 10, 8)
	base.SWA = swa
	b := base.encode()
	got, err := parseState(b, info)
	if err != nil {
		t.Fatal(err)
	}
	if got.Cells() != 7 || len(got.K) != 2 || got.SWA == nil || got.SWA.Cells() != 5 || len(got.SWA.K) != 10 {
		t.Fatalf("parsed %d cells in %d layers, swa %+v", got.Cells(), len(got.K), got.SWA)
	}
	if string(got.encode()) != string(b) {
		t.Fatal("re-encoding the parsed state changed it")
	}
	// A rewritten cache keeps the sliding-window part as it was.
	dst := NewSeqCacheLike(got, 3)
	if dst.SWA != got.SWA || len(dst.LayerIDs) != 2 {
		t.Fatalf("NewSeqCacheLike dropped the sliding-window cache or the layer ids")
	}

	for name, c := range map[string]struct {
		b    []byte
		info ModelInfo
		want string
	}{
		"trailing bytes":          {append(append([]byte(nil), b...), 0, 0, 0, 0), info, "bytes follow"},
		"one cache only":          {synthCache(7, 12, 8).encode(), info, "sliding-window cache"},
		"layer split mismatch":    {b, ModelInfo{Arch: "gemma3", Layers: 12, SWA: 32, FullLayers: []int{3, 7, 11}}, "full-attention"},
		"unknown swa arch":        {b, ModelInfo{Arch: "other", Layers: 12, SWA: 32}, "layer layout"},
		"two caches for one-part": {b, ModelInfo{Layers: 2}, "bytes follow"},
		"truncated":               {b[:len(b)-3], info, "truncated"},
	} {
		_, err := parseState(c.b, c.info)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", name, err, c.want)
		}
	}
}
