package engine

import (
	"container/list"
	"crypto/sha256"
)

// imageKey names an image by its content: the same bytes give the same embeddings.
type imageKey [sha256.Size]byte

func keyOf(image []byte) imageKey { return sha256.Sum256(image) }

// imageCache keeps encoded images (their embeddings) by content, least recently
// used first out, within a byte bound. Only the decode loop touches it.
type imageCache struct {
	limit int64 // bytes of embeddings held at most; <= 0: nothing is kept
	bytes int64
	order *list.List // front: most recently used; values are *imageEntry
	byKey map[imageKey]*list.Element
}

type imageEntry struct {
	key  imageKey
	embd []float32
}

func newImageCache(limit int64) *imageCache {
	return &imageCache{limit: limit, order: list.New(), byKey: map[imageKey]*list.Element{}}
}

// get returns the embeddings of the image with key k, if held. The caller must
// not modify them.
func (c *imageCache) get(k imageKey) ([]float32, bool) {
	if k == (imageKey{}) { // not named by its content: never shared
		return nil, false
	}
	el, ok := c.byKey[k]
	if !ok {
		return nil, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*imageEntry).embd, true
}

// put keeps embd under k, evicting the least recently used images to make room.
// An image larger than the whole bound is not kept.
func (c *imageCache) put(k imageKey, embd []float32) {
	size := int64(len(embd)) * 4
	if size > c.limit || k == (imageKey{}) {
		return
	}
	if el, ok := c.byKey[k]; ok {
		c.order.MoveToFront(el)
		return
	}
	for c.bytes+size > c.limit {
		last := c.order.Back()
		ent := last.Value.(*imageEntry)
		c.order.Remove(last)
		delete(c.byKey, ent.key)
		c.bytes -= int64(len(ent.embd)) * 4
	}
	c.byKey[k] = c.order.PushFront(&imageEntry{key: k, embd: embd})
	c.bytes += size
}

func (c *imageCache) len() int { return c.order.Len() }
