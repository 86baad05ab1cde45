package engine

import (
	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/llama"
)

// Model families whose cache is not one plain llama.cpp cache.
//
// Sliding-window models (Gemma 3) keep two caches: the full-attention layers' and
// the sliding-window layers'. Captured attention columns of a layer index that
// layer's own cache. The prompt plan is applied to the full-attention cache only
// (cachePlan); the sliding-window cache is written back unchanged: it is bounded by
// the window whatever the prompt (llama.cpp sizes it n_swa + n_ubatch per stream and
// reuses cells that fall out of the window), so rewriting it frees no cell at long
// context, and its layers attend only the last n_swa positions anyway. A decode
// eviction removes its position from both caches (llama_memory_seq_rm), the same
// entry in every layer as the method prescribes.

// cachePlan returns plan restricted to the layers src holds: every layer, or the
// full-attention layers of a sliding-window model (src.LayerIDs). A plan that does
// not cover those layers is returned as is (the caller's layer check refuses it).
func cachePlan(plan *elasticcache.PrefillPlan, src *llama.SeqCache) *elasticcache.PrefillPlan {
	if plan == nil || src.LayerIDs == nil {
		return plan
	}
	sub := *plan
	sub.Layers = make([]elasticcache.LayerPlan, 0, len(src.LayerIDs))
	for _, il := range src.LayerIDs {
		if il < 0 || il >= len(plan.Layers) {
			return plan
		}
		sub.Layers = append(sub.Layers, plan.Layers[il])
	}
	return &sub
}

// M-RoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) are served under full: an image's
// embeddings are decoded at its 2-D grid of positions (every embedding at the
// image's first position p0, with row p0+r and column p0+c as extra components),
// and the image advances the position by max(nx, ny), not by its nx*ny cells
// (promptBatch, seqCache.shift). Text tokens take one position in every component.
//
// Prefix reuse works where positions are token indices: a finished sequence is
// held only when its prompt has no image (hold; an image's cells share one
// position, so held cells could not be named by unit index). Its text prefix
// is then continued like any model's, also by a prompt that goes on with an
// image (the image starts at the position its chunk start gives it).
//
// Compressing policies are refused (mropeRefusal), for three reasons found in the
// vendored llama.cpp (module v0.17.4):
//   - llama_state_seq_set_data restores one sequence through
//     llama_kv_cache::state_read_meta (src/llama-kv-cache.cpp), which builds the
//     restored cells' ubatch with llama_batch_allocr::ubatch_reserve
//     (src/llama-batch.cpp): its pos vector holds cell_count values while n_pos is 4,
//     so ubatch.is_pos_2d() is true and apply_ubatch reads pos[i + n_tokens] and
//     pos[i + n_tokens*2] past the end of that vector (a heap out-of-bounds read,
//     whatever positions the state holds). The whole-memory restore (seq_id -1)
//     avoids it but rewrites and compacts every sequence's cells.
//   - the cells of one image share one position (component 0), and the only public
//     call that removes single cells, llama_memory_seq_rm, names them by position:
//     a decode-time eviction of one image entry would remove all of that image's
//     remaining entries.
//   - llama_memory_seq_add / seq_div assert n_pos_per_embd() == 1, so positions
//     cannot be relabelled in place either.
const mropeRefusal = "this model uses M-RoPE (Qwen-VL: multi-component positions); compressing its cache is refused: " +
	"llama.cpp's sequence restore (llama_state_seq_set_data) reads past its position buffer for M-RoPE models, " +
	"and the cells of one image share a position, so one entry cannot be evicted (see README, Models); use policy full"

// mrope reports whether the model takes M-RoPE positions for images.
func (e *Engine) mrope() bool { return e.vision != nil && e.vision.MRoPE() }

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
	case info.MRoPE:
		return mropeRefusal
	case info.SWA > 0 && len(info.FullLayers) == 0:
		return "this model (" + info.Arch + ") uses sliding-window attention in a layer layout the KV hook does not know; use policy full"
	case info.SWA > 0 && spec.Policy() == elasticcache.H2O:
		return "h2o ranks entries by the attention of every layer, and a sliding-window layer's attention indexes its own cache, which compression leaves as it is; use elastic or local"
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
