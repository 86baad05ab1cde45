package engine

import (
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// A picture that the encoder cuts into several chunks (tiles) has each tile
// cached under its own key: with the image cache on, every picture, alone or
// with others, answers as it does with the cache off, whatever was encoded
// before (tiles after the first were once all keyed alike and served each
// other's embeddings).
func TestTiledPicturesCachedPerTile(t *testing.T) {
	for _, arch := range []string{"smolvlm", "minicpmv"} {
		t.Run(arch, func(t *testing.T) {
			_, m, v := loadFamily(t, arch)
			a, b := testPNG(t, 1), testPNG(t, 3)
			prompts := [][][]byte{{a}, {b}, {a, b}, {b, a}, {a}}
			ask := func(te *testEngine, imgs [][]byte) string {
				return run(t, te, greedyReq("tiles", "Describe.", 12, cfg(elasticcache.Full, 1), imgs...)).text
			}
			plain := startEngineOn(t, m, v, Options{Parallel: 1, CtxSize: 2048})
			var want []string
			for _, imgs := range prompts {
				want = append(want, ask(plain, imgs))
			}
			if want[0] == want[1] {
				t.Fatalf("two pictures answer alike (%q): the test cannot tell them apart", want[0])
			}
			cached := startEngineOn(t, m, v, Options{Parallel: 1, CtxSize: 2048, ImageCacheBytes: 64 << 20})
			for i, imgs := range prompts {
				if got := ask(cached, imgs); got != want[i] {
					t.Errorf("prompt %d (%d pictures) with the image cache: %q, without: %q", i, len(imgs), got, want[i])
				}
			}
		})
	}
}
