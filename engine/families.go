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

// unsupportedReason says why a compressing spec cannot run on this model and
// setting, "" when it can. It looks only at the model and the server's options.
func unsupportedReason(info llama.ModelInfo, flashAttn bool, spec elasticcache.Spec) string {
	switch {
	case !spec.Compresses():
		return ""
	case spec.PrefillScores() && flashAttn:
		return "it needs attention scores, which this server (started with --flash-attn) does not compute"
	case info.MRoPE:
		return "this model uses M-RoPE (multi-component positions); the KV hook cannot rewrite its cache through llama.cpp's state calls (see README, Models)"
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
				if r := unsupportedReason(info, e.opts.FlashAttn, spec); r != "" {
					ps.Supported, ps.Reason = false, r
				}
			}
		}
		out = append(out, ps)
	}
	return out
}
