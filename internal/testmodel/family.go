package testmodel

import (
	"fmt"
	"slices"
	"sort"
)

// Model families. Options.Arch selects one; "" is ArchLLaVA15.
//
// Each family writes the text architecture, the projector, the metadata and the
// tensor names that llama.cpp (src/llama-model.cpp, tools/mtmd/clip.cpp) loads for
// that family, the special tokens its mtmd image layout looks up, and a chat template
// that llama.cpp's built-in matcher maps to the family's real template. Shapes are
// tiny by default (FamilyOptions) and can be set to a published model's dimensions.
const (
	ArchLLaVA15  = "llava15"  // llama + CLIP "mlp" (one 576-token tile for the real model)
	ArchLLaVA16  = "llava16"  // llama + CLIP "mlp" with anyres grid pinpoints and an image newline
	ArchSmolVLM  = "smolvlm"  // llama (SmolLM2) + SigLIP "idefics3" (pixel shuffle, image splitting)
	ArchMiniCPMV = "minicpmv" // qwen2 + SigLIP "resampler" (MiniCPM-V 2.6: minicpmv_version 3)
	ArchGemma3   = "gemma3"   // gemma3 (interleaved sliding-window attention) + SigLIP "gemma3"
	ArchQwen25VL = "qwen25vl" // qwen2vl (M-RoPE) + Qwen2.5-VL ViT "qwen2.5vl_merger" (window attention)
)

// Family is what a model family fixes, whatever its shape.
type Family struct {
	Name      string
	TextArch  string // general.architecture of model.gguf
	Projector string // clip.projector_type of mmproj.gguf
	// ChatTemplate is stored as tokenizer.chat_template; TemplateName is the
	// llama.cpp built-in template it is detected as.
	ChatTemplate, TemplateName string
	// Special are control tokens added after the base vocabulary: the markers the
	// family's mtmd image layout looks up by text (mtmd.cpp lookup_token) and its
	// turn markers.
	Special []string
	siglip  bool // SigLIP tower: no class token, no pre-LN, post-LN, patch bias, GELU
	qwenVL  bool // Qwen2.5-VL tower (qwenMMProj)
	tiny    func(*Options)
}

var families = map[string]*Family{
	ArchLLaVA15: {Name: ArchLLaVA15, TextArch: "llama", Projector: "mlp",
		ChatTemplate: ChatTemplate, TemplateName: ChatTemplateName, tiny: func(*Options) {}},
	ArchLLaVA16: {Name: ArchLLaVA16, TextArch: "llama", Projector: "mlp",
		// LLaVA-1.6-Mistral's [INST] format (llama.cpp: llama2 family).
		ChatTemplate: "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}" +
			"{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
		TemplateName: "llama2",
		tiny: func(o *Options) {
			o.ImageSize, o.PatchSize = 24, 4 // 36 tokens per tile; a 48x48 picture is 2x2 tiles + overview
		}},
	ArchSmolVLM: {Name: ArchSmolVLM, TextArch: "llama", Projector: "idefics3", siglip: true,
		ChatTemplate: "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: " +
			"{{ message['content'] }}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}",
		TemplateName: "smolvlm",
		Special:      []string{"<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "\n\n"},
		tiny: func(o *Options) {
			o.ImageSize, o.PatchSize, o.MergeFactor = 32, 4, 2 // 16 tokens per slice
			o.PreprocSize = 64                                 // longest edge: a 48x48 picture becomes 2x2 slices + overview
		}},
	ArchMiniCPMV: {Name: ArchMiniCPMV, TextArch: "qwen2", Projector: "resampler", siglip: true,
		ChatTemplate: "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}" +
			"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
		TemplateName: "chatml",
		Special:      []string{"<|im_start|>", "<|im_end|>", "<image>", "</image>", "<slice>", "</slice>"},
		tiny: func(o *Options) {
			// the resampler's heads are 128 wide (clip minicpmv graph), so the text width is a multiple of 128
			o.Embd, o.Heads, o.KVHeads, o.FF = 128, 4, 2, 256
			o.ImageSize, o.PatchSize, o.Queries = 32, 4, 16
		}},
	ArchGemma3: {Name: ArchGemma3, TextArch: "gemma3", Projector: "gemma3", siglip: true,
		ChatTemplate: "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}" +
			"{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
		TemplateName: "gemma",
		Special:      []string{"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"},
		tiny: func(o *Options) {
			// llama.cpp's gemma3 makes every 6th layer (5, 11, ...) full attention, the rest sliding-window
			o.Layers, o.SlidingWindow = 12, 32
			o.ImageSize, o.PatchSize, o.MergeFactor = 32, 4, 2 // 16 tokens per image
		}},
	ArchQwen25VL: {Name: ArchQwen25VL, TextArch: "qwen2vl", Projector: "qwen2.5vl_merger", qwenVL: true,
		// Qwen's ChatML with its default system turn (llama.cpp: chatml)
		ChatTemplate: "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}" +
			"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" +
			"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}" +
			"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
		TemplateName: "chatml",
		Special:      []string{"<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"},
		tiny: func(o *Options) {
			// 4 ViT blocks with a window-attention pattern of 2: blocks 1 and 3 attend
			// the whole image, 0 and 2 their window. A 48x48 picture is 12x12 patches,
			// merged 2x2 into a 6x6 grid of 36 embeddings taking 6 positions.
			o.VisionLayers, o.WindowPattern = 4, 2
		}},
}

// Families lists the family names Arch accepts.
func Families() []string {
	var out []string
	for n := range families {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// LookupFamily returns the family arch names ("" is LLaVA-1.5).
func LookupFamily(arch string) (*Family, error) {
	if arch == "" {
		arch = ArchLLaVA15
	}
	f, ok := families[arch]
	if !ok {
		return nil, fmt.Errorf("unknown arch %q (known: %v)", arch, Families())
	}
	return f, nil
}

// FamilyOptions is DefaultOptions for arch with the family's tiny test shape.
func FamilyOptions(arch string) (Options, error) {
	f, err := LookupFamily(arch)
	if err != nil {
		return Options{}, err
	}
	o := DefaultOptions()
	o.Arch = f.Name
	f.tiny(&o)
	return o, nil
}

func (o Options) family() *Family {
	f, err := LookupFamily(o.Arch)
	if err != nil {
		panic(err) // validate refuses unknown arches first
	}
	return f
}

// SpecialToken returns the id of one of the family's special tokens, -1 if absent.
func (o Options) SpecialToken(text string) int {
	f, err := LookupFamily(o.Arch)
	if err != nil {
		return -1
	}
	if i := slices.Index(f.Special, text); i >= 0 {
		return BaseVocabSize + i
	}
	return -1
}

func (o Options) validateFamily(check func(bool, string, ...any)) {
	f, err := LookupFamily(o.Arch)
	if err != nil {
		check(false, "%v", err)
		return
	}
	switch f.Name {
	case ArchMiniCPMV:
		check(o.Embd%128 == 0, "minicpmv: embd (%d) must be a multiple of 128 (the resampler's head size)", o.Embd)
		check(o.Queries >= 1, "minicpmv: queries must be >= 1")
	case ArchQwen25VL:
		check(o.Embd == o.Heads*o.HeadDim(), "qwen25vl: embd must be heads x head size")
		check(o.HeadDim()%8 == 0, "qwen25vl: the head size (%d) must be a multiple of 8 (rope sections)", o.HeadDim())
		check(o.ImageSize%(2*max(o.PatchSize, 1)) == 0, "qwen25vl: image-size (%d) must be a multiple of 2 x patch-size", o.ImageSize)
		check(o.VisionEmbd%(4*max(o.VisionHeads, 1)) == 0, "qwen25vl: the vision head size must be a multiple of 4 (vision M-RoPE)")
		check(o.WindowPattern >= 1 && o.WindowPattern <= o.VisionLayers, "qwen25vl: window pattern must be in [1, vision-layers]")
	case ArchGemma3:
		check(o.SlidingWindow >= 1, "gemma3: sliding-window must be >= 1")
		check(o.Layers >= 6, "gemma3: layers must be >= 6 (layer 5 is the first full-attention layer)")
	}
	if f.Projector == "gemma3" || f.Projector == "idefics3" {
		n := o.ImageSize / max(o.PatchSize, 1)
		check(o.MergeFactor >= 2 && n%max(o.MergeFactor, 1) == 0, "%s: merge factor (%d) must be >= 2 and divide the patch grid (%d)", f.Name, o.MergeFactor, n)
	}
	if f.siglip {
		check(o.VisionFF != o.VisionEmbd, "vision-ff must differ from vision-embd")
	}
}

// familyText adds the family's text-model metadata and per-layer tensors.
func (o Options) familyTextKV(p string) []kv {
	switch o.family().TextArch {
	case "qwen2vl":
		// M-RoPE: the rotated pairs (head size / 2) split into temporal, height and
		// width sections (Qwen2.5-VL 3B: 128 -> 16, 24, 24, 0)
		half := int32(o.HeadDim() / 2)
		t := half / 4
		return []kv{{p + ".rope.dimension_sections", []int32{t, (half - t) / 2, half - t - (half-t)/2, 0}}}
	case "gemma3":
		return []kv{
			{p + ".attention.sliding_window", uint32(o.SlidingWindow)},
			{p + ".attention.key_length", uint32(o.HeadDim())},
			{p + ".attention.value_length", uint32(o.HeadDim())},
		}
	}
	return nil
}

func (o Options) familyTextLayer(p string, mat func(string, uint64, uint64, fill) tensorInfo, vec func(string, uint64, fill) tensorInfo) []tensorInfo {
	E, hd, kvDim := uint64(o.Embd), uint64(o.HeadDim()), uint64(o.HeadDim()*o.KVHeads)
	norm, bias := around(1, 0.25), uniform(0.05)
	switch o.family().TextArch {
	case "gemma3":
		return []tensorInfo{
			vec(p+"post_attention_norm.weight", E, norm),
			vec(p+"attn_q_norm.weight", hd, norm),
			vec(p+"attn_k_norm.weight", hd, norm),
			vec(p+"post_ffw_norm.weight", E, norm),
		}
	case "qwen2", "qwen2vl":
		return []tensorInfo{
			vec(p+"attn_q.bias", hd*uint64(o.Heads), bias),
			vec(p+"attn_k.bias", kvDim, bias),
			vec(p+"attn_v.bias", kvDim, bias),
		}
	}
	return nil
}

// siglipPositions is the number of rows of the vision position table.
func (o Options) siglipPositions() uint64 {
	if o.family().Projector == "resampler" {
		return 70 * 70 // clip.cpp buckets MiniCPM-V positions into a 70x70 grid
	}
	return uint64(o.ImageTokens())
}

// familyMMProj returns the projector's metadata and tensors (after the ViT blocks).
func (o Options) familyMMProj(mat func(string, uint64, uint64, fill) tensorInfo, vec func(string, uint64, fill) tensorInfo) ([]kv, []tensorInfo) {
	VE, E := uint64(o.VisionEmbd), uint64(o.Embd)
	lnW, lnB, bias := around(1, 0.25), around(0, 0.1), uniform(0.05)
	f32mat := func(name string, in, out uint64, f fill) tensorInfo {
		return tensorInfo{name: name, dims: []uint64{in, out}, typ: ggmlTypeF32, fill: f}
	}
	f := o.family()
	switch f.Name {
	case ArchLLaVA15:
		return nil, []tensorInfo{
			mat("mm.0.weight", VE, E, uniform(invSqrt(o.VisionEmbd))),
			vec("mm.0.bias", E, bias),
			mat("mm.2.weight", E, E, uniform(invSqrt(o.Embd))),
			vec("mm.2.bias", E, bias),
		}
	case ArchLLaVA16:
		s := int32(o.ImageSize)
		return []kv{
				{"clip.vision.image_grid_pinpoints", []int32{s, 2 * s, 2 * s, s, 2 * s, 2 * s}},
				{"clip.vision.mm_patch_merge_type", "spatial_unpad"},
				{"clip.vision.image_crop_resolution", uint32(o.ImageSize)},
			}, []tensorInfo{
				mat("mm.0.weight", VE, E, uniform(invSqrt(o.VisionEmbd))),
				vec("mm.0.bias", E, bias),
				mat("mm.2.weight", E, E, uniform(invSqrt(o.Embd))),
				vec("mm.2.bias", E, bias),
				vec("model.image_newline", E, uniform(0.5)),
			}
	case ArchSmolVLM:
		m := uint64(o.MergeFactor * o.MergeFactor)
		return []kv{
				{"clip.vision.projector.scale_factor", uint32(o.MergeFactor)},
				{"clip.vision.preproc_image_size", uint32(o.PreprocSize)},
			}, []tensorInfo{
				mat("mm.model.fc.weight", VE*m, E, uniform(invSqrt(o.VisionEmbd*o.MergeFactor*o.MergeFactor))),
			}
	case ArchGemma3:
		return []kv{{"clip.vision.projector.scale_factor", uint32(o.MergeFactor)}}, []tensorInfo{
			vec("mm.soft_emb_norm.weight", VE, lnW),
			// {E, VE}: clip.cpp multiplies by its transpose; its ne[0] is the text width
			mat("mm.input_projection.weight", E, VE, uniform(invSqrt(o.VisionEmbd))),
		}
	case ArchMiniCPMV:
		return []kv{
				{"clip.minicpmv_version", int32(3)},
				{"clip.minicpmv_query_num", uint32(o.Queries)},
			}, []tensorInfo{
				// Activations, not weights: the graph normalizes the queries, and ggml's
				// norm takes f32 only (an f16 file aborts in ggml_compute_forward_norm).
				f32mat("resampler.pos_embed_k", E, uint64(o.Queries), uniform(0.5)),
				f32mat("resampler.query", E, uint64(o.Queries), uniform(1)),
				mat("resampler.kv.weight", VE, E, uniform(invSqrt(o.VisionEmbd))),
				vec("resampler.ln_q.weight", E, lnW), vec("resampler.ln_q.bias", E, lnB),
				vec("resampler.ln_kv.weight", E, lnW), vec("resampler.ln_kv.bias", E, lnB),
				mat("resampler.attn.q.weight", E, E, uniform(2*invSqrt(o.Embd))), vec("resampler.attn.q.bias", E, bias),
				mat("resampler.attn.k.weight", E, E, uniform(2*invSqrt(o.Embd))), vec("resampler.attn.k.bias", E, bias),
				mat("resampler.attn.v.weight", E, E, uniform(invSqrt(o.Embd))), vec("resampler.attn.v.bias", E, bias),
				mat("resampler.attn.out.weight", E, E, uniform(invSqrt(o.Embd))), vec("resampler.attn.out.bias", E, bias),
				vec("resampler.ln_post.weight", E, lnW), vec("resampler.ln_post.bias", E, lnB),
				mat("resampler.proj.weight", E, E, uniform(invSqrt(o.Embd))),
			}
	}
	panic("testmodel: no projector for " + f.Name)
}

// qwenMMProj returns the metadata and tensors of a Qwen2.5-VL vision tower
// (clip.cpp: clip_graph_qwen2vl with PROJECTOR_TYPE_QWEN25VL): two patch
// convolutions (the temporal pair of frames of one picture) summed, no class
// token, no position table (the ViT uses 2-D rope), RMS norms without bias, a
// SwiGLU feed-forward (use_silu), window attention in every block but each
// WindowPattern-th, a post norm, then the merger: 2x2 neighbouring patches are
// concatenated (4 x vision width) and sent through mm.0, GELU, mm.2.
func (o Options) qwenMMProj() ([]kv, []tensorInfo) {
	VE, VF, E, P := uint64(o.VisionEmbd), uint64(o.VisionFF), uint64(o.Embd), uint64(o.PatchSize)
	fam := o.family()
	kvs := []kv{
		{"general.architecture", "clip"},
		{"general.name", "elasticserve-testmodel-mmproj"},
		{"general.description", "random-weight Qwen2.5-VL vision tower generated by elasticserve internal/testmodel"},
		{"general.file_type", o.fileType()},
		{"clip.has_text_encoder", false},
		{"clip.has_vision_encoder", true},
		{"clip.has_llava_projector", false},
		{"clip.projector_type", fam.Projector},
		{"clip.use_silu", true},
		{"clip.vision.image_size", uint32(o.ImageSize)},
		{"clip.vision.patch_size", uint32(o.PatchSize)},
		{"clip.vision.embedding_length", uint32(o.VisionEmbd)},
		{"clip.vision.feed_forward_length", uint32(o.VisionFF)},
		{"clip.vision.projection_dim", uint32(o.Embd)},
		{"clip.vision.block_count", uint32(o.VisionLayers)},
		{"clip.vision.attention.head_count", uint32(o.VisionHeads)},
		{"clip.vision.attention.layer_norm_epsilon", float32(1e-6)},
		{"clip.vision.spatial_merge_size", uint32(2)},
		{"clip.vision.n_wa_pattern", uint32(o.WindowPattern)},
		{"clip.vision.image_mean", clipImageMean},
		{"clip.vision.image_std", clipImageStd},
	}
	mat, vec := o.tensorMakers()
	lnW, bias := around(1, 0.25), uniform(0.05)
	conv := uniform(invSqrt(3 * o.PatchSize * o.PatchSize))
	ts := []tensorInfo{
		{name: "v.patch_embd.weight", dims: []uint64{P, P, 3, VE}, typ: o.matType(), fill: conv},
		{name: "v.patch_embd.weight.1", dims: []uint64{P, P, 3, VE}, typ: o.matType(), fill: conv},
	}
	for i := range o.VisionLayers {
		p := fmt.Sprintf("v.blk.%d.", i)
		ts = append(ts,
			vec(p+"ln1.weight", VE, lnW),
			mat(p+"attn_q.weight", VE, VE, uniform(2*invSqrt(o.VisionEmbd))),
			vec(p+"attn_q.bias", VE, bias),
			mat(p+"attn_k.weight", VE, VE, uniform(2*invSqrt(o.VisionEmbd))),
			vec(p+"attn_k.bias", VE, bias),
			mat(p+"attn_v.weight", VE, VE, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"attn_v.bias", VE, bias),
			mat(p+"attn_out.weight", VE, VE, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"attn_out.bias", VE, bias),
			vec(p+"ln2.weight", VE, lnW),
			mat(p+"ffn_gate.weight", VE, VF, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"ffn_gate.bias", VF, bias),
			mat(p+"ffn_up.weight", VE, VF, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"ffn_up.bias", VF, bias),
			mat(p+"ffn_down.weight", VF, VE, uniform(invSqrt(o.VisionFF))),
			vec(p+"ffn_down.bias", VE, bias),
		)
	}
	ts = append(ts,
		vec("v.post_ln.weight", VE, lnW),
		mat("mm.0.weight", 4*VE, 4*VE, uniform(invSqrt(4*o.VisionEmbd))),
		vec("mm.0.bias", 4*VE, bias),
		mat("mm.2.weight", 4*VE, E, uniform(invSqrt(4*o.VisionEmbd))),
		vec("mm.2.bias", E, bias),
	)
	return kvs, ts
}
