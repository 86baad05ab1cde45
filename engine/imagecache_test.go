package engine

import "testing"

func TestImageCacheKeepsTheMostRecentWithinItsBound(t *testing.T) {
	c := newImageCache(3 * 4 * 10) // three images of 10 floats
	img := func(i int) (imageKey, []float32) {
		e := make([]float32, 10)
		e[0] = float32(i)
		return keyOf([]byte{byte(i)}), e
	}
	for i := range 3 {
		c.put(img(i))
	}
	k0, _ := img(0)
	if _, ok := c.get(k0); !ok { // 0 is now the most recent
		t.Fatal("image 0 missing")
	}
	c.put(img(3)) // evicts 1, the least recently used
	for i, want := range []bool{true, false, true, true} {
		k, _ := img(i)
		got, ok := c.get(k)
		if ok != want || ok && got[0] != float32(i) {
			t.Fatalf("image %d: held=%v, want %v", i, ok, want)
		}
	}
	if c.bytes != 3*40 || c.len() != 3 {
		t.Fatalf("bytes %d len %d", c.bytes, c.len())
	}
	big := make([]float32, 100)
	c.put(keyOf([]byte("big")), big)
	if _, ok := c.get(keyOf([]byte("big"))); ok || c.len() != 3 {
		t.Fatal("an image over the whole bound must not be kept nor evict others")
	}
	off := newImageCache(0)
	off.put(img(1))
	if off.len() != 0 {
		t.Fatal("a zero bound keeps nothing")
	}
}
