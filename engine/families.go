package engine

import (
	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// Model families whose cache is not one plain llama.cpp cache.
//
// Sliding-window models (Gemma 3) keep two caches: the full-attention layers' and
// the sliding-window layers'. Captured attention columns of a layer index that
// layer's own cache, so the tracker sees the full-attention layers only
// (Engine.cacheLayers): elastic plans them layer by layer, h2o ranks entries by
// their attention. The prompt plan rewrites the full-attention cache only; the
// sliding-window cache stays as it is (moved along unchanged into a home stream):
// it is bounded by the window whatever the prompt (llama.cpp sizes it n_swa +
// n_ubatch per stream and reuses cells that fall out of the window), so rewriting
// it frees no cell at long context, and its layers attend only the last n_swa
// positions anyway. A decode eviction removes its cell from the full-attention
// cache and its position from the window cache (llama.EvictCell).
//
// M-RoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): an image's embeddings are decoded
// at its 2-D grid of positions (every embedding at the image's first position p0,
// with row p0+r and column p0+c as extra components), and the image advances the
// position by max(nx, ny), not by its nx*ny cells (promptBatch, seqCache.shift).
// Text tokens take one position in every component. The KV hook names cells by
// index, not by position, and copies each kept cell's extra components from the
// entry whose position it takes, so every policy compresses them; the captured
// attention is indexed by prompt entry (seqCache.promptIndex), not by position.
//
// Prefix reuse names held entries by unit (one per cell), not by position: a
// continuation keeps the first common units' cells, which sit below position
// common - imageShift(common), and goes on from there, so conversations with
// pictures are held, continued and restored from the tiers like any model's.

// mrope reports whether the model takes M-RoPE positions for images.
func (e *Engine) mrope() bool { return e.vision != nil && e.vision.MRoPE() }

// imageShift is how many positions fewer than entries a prompt's first n entries
// take: the sum of n - nPos over its images that end by entry n (an M-RoPE
// image's grid shares positions; 0 for every other model). n never ends inside
// an image (reusable).
func imageShift(chunks []promptChunk, n int) int {
	shift := 0
	for _, ch := range chunks {
		if n < ch.n {
			break
		}
		n -= ch.n
		shift += ch.n - ch.nPos
	}
	return shift
}

// unsupportedReason says why a compressing spec cannot run on this model and
// setting, "" when it can. It looks only at the model and the server's options.
func unsupportedReason(info llama.ModelInfo, flashAttn, decodeFlashAttn bool, spec elasticcache.Spec) string {
	switch {
	case !spec.Compresses():
		return ""
	case spec.PrefillScores() && flashAttn:
		return "it needs attention scores, which this server (started with --flash-attn) does not compute"
	case spec.DecodeScores() && decodeFlashAttn:
		return "it reads attention at every decode step, which the decode context (started with --decode-flash-attn) does not compute; use elastic or local"
	case info.SWA > 0 && len(info.FullLayers) == 0:
		return "this model (" + info.Arch + ") uses sliding-window attention in a layer layout the KV hook does not know; use policy full"
	}
	return ""
}

// PolicySupport is whether a policy (below budget 1) runs on this engine's model,
// and why not.
type PolicySupport struct {
	Policy    elasticcache.Policy
	Supported bool
	Reason    string // why not, when unsupported
}

// Policies lists every cache policy with whether this engine can apply it below
// budget 1 (full always runs).
func (e *Engine) Policies() []PolicySupport {
	info := e.model.Info()
	out := make([]PolicySupport, 0, len(cachePolicies))
	for _, p := range cachePolicies {
		ps := PolicySupport{Policy: p, Supported: true}
		if p != elasticcache.Full {
			c := elasticcache.DefaultConfig()
			c.Policy, c.Budget = p, 0.5
			if spec, err := c.Spec(); err == nil {
				if r := unsupportedReason(info, e.opts.FlashAttn, e.opts.DecodeFlashAttn, spec); r != "" {
					ps.Supported, ps.Reason = false, r
				}
			}
		}
		out = append(out, ps)
	}
	return out
}
