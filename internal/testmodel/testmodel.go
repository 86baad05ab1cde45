// Package testmodel writes a small, deterministic, randomly initialised
// vision-language model in the GGUF format llama.cpp loads: a LLaVA-1.5-style
// pair of files, a "llama" text model (model.gguf) and a CLIP ViT with the
// two-layer "mlp" projector (mmproj.gguf).
//
// The weights are random (fixed seed, byte-identical output), so the model
// produces gibberish, but it exercises the real code paths: SentencePiece
// tokenisation with byte fallback, a chat template that llama.cpp detects as
// its built-in "vicuna" template, GQA attention, image encoding through mtmd.
// Greedy decoding gives varied text rather than one token repeated.
//
// Choices worth knowing when writing tests against it:
//   - BOS, EOS and UNK (and any <unusedN> padding tokens) have all-zero rows
//     in the output matrix, so their logit is always exactly 0 while the
//     other logits spread with a standard deviation of about 3: greedy
//     decoding never ends on its own (it runs to the token limit) and
//     sampling practically never picks them. Use stop strings or max_tokens.
//   - Byte-token rows are scaled by 1/2, so generated text is mostly
//     printable ASCII, with an occasional raw byte (possibly invalid UTF-8).
//   - Text tokenises to BOS + one token per character (plus a leading "▁");
//     Tokenize reproduces llama.cpp's result.
//   - An image becomes exactly Options.ImageTokens() embeddings.
//
// The package is pure Go; the files are streamed to disk chunk by chunk, so
// full-size shapes (e.g. LLaVA-1.5-7B, ~13 GB in f16) can be written too.
package testmodel

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// GeneratorVersion changes whenever the bytes written for given Options
// change; it is part of Ensure's cache key.
const GeneratorVersion = 1

// Fixed hyperparameters.
const (
	RopeFreqBase = 10000.0
	RMSNormEps   = 1e-5
	// VisionLayerNormEps is the CLIP layer norm epsilon.
	VisionLayerNormEps = 1e-5
)

// File names written by Write.
const (
	ModelFile  = "model.gguf"
	MMProjFile = "mmproj.gguf"
)

// Options are the model's shape and seed.
type Options struct {
	// Arch is the model family (see Families); "" writes LLaVA-1.5.
	Arch string

	// Text model (the family's text architecture; "llama" for LLaVA-1.5).
	Layers   int // transformer blocks
	Embd     int // hidden size (n_embd)
	Heads    int // attention heads
	KVHeads  int // key/value heads (GQA when < Heads)
	FF       int // feed-forward size
	CtxTrain int // llama.context_length
	// VocabSize pads the vocabulary with <unusedN> tokens up to this size;
	// values <= BaseVocabSize give the minimal vocabulary.
	VocabSize int
	// F16 stores matrices as float16 (vectors stay float32); otherwise all
	// float32. The values are identical either way.
	F16  bool
	Seed int64

	// Vision encoder (CLIP ViT) and projector.
	ImageSize    int // input side in pixels (images are padded/resized to it)
	PatchSize    int // patch side in pixels; ImageSize must be a multiple
	VisionEmbd   int // ViT hidden size
	VisionLayers int // ViT blocks written; llama.cpp runs all but the last (LLaVA takes the penultimate layer)
	VisionHeads  int // ViT attention heads
	VisionFF     int // ViT feed-forward size; must differ from VisionEmbd (see validate)

	// Family knobs (0 where the family has no such setting).
	SlidingWindow int // gemma3: attention.sliding_window of its sliding-window layers
	MergeFactor   int // gemma3, smolvlm: side reduction of the patch grid (pooling / pixel shuffle)
	PreprocSize   int // smolvlm: longest edge images are resized to before splitting
	Queries       int // minicpmv: resampler queries (tokens per image slice)
	HeadSize      int // attention head size when not embd/heads (gemma3 4B: 256); 0: embd/heads
	WindowPattern int // qwen25vl: every n-th ViT block attends the whole image, the others their window (n_wa_pattern)

	// Vocab selects the vocabulary: "" the byte-level one (vocab.go),
	// VocabWords the word-level one (wordvocab.go). Keep it the last field
	// (see CacheKey).
	Vocab string
}

// DefaultOptions is the small model used by tests.
func DefaultOptions() Options {
	return Options{
		Layers:       3,
		Embd:         64,
		Heads:        4,
		KVHeads:      2,
		FF:           128,
		CtxTrain:     4096,
		VocabSize:    0,
		F16:          false,
		Seed:         1,
		ImageSize:    48,
		PatchSize:    4,
		VisionEmbd:   32,
		VisionLayers: 3,
		VisionHeads:  4,
		VisionFF:     64,
	}
}

// ImageTokens is the number of embeddings (positions in the text context) one
// image takes for LLaVA-1.5: one per patch, (ImageSize/PatchSize)^2. The class
// token is not among them. For the other families it is the number of patches of
// one tile (the ViT's sequence); see TileTokens for what reaches the text model.
func (o Options) ImageTokens() int {
	if o.PatchSize <= 0 {
		return 0
	}
	n := o.ImageSize / o.PatchSize
	return n * n
}

// TileTokens is the number of embeddings one tile (slice) of an image gives the
// text model: patches, reduced by the family's merge factor, or the resampler's
// queries. Families that split pictures (llava16, smolvlm, minicpmv) add tiles and
// separator tokens per picture.
func (o Options) TileTokens() int {
	switch {
	case o.Queries > 0 && o.family().Projector == "resampler":
		return o.Queries
	case o.family().qwenVL:
		return o.ImageTokens() / 4 // 2x2 patches merged
	case o.MergeFactor > 1:
		return o.ImageTokens() / (o.MergeFactor * o.MergeFactor)
	}
	return o.ImageTokens()
}

// NVocab is the vocabulary size the model is written with.
func (o Options) NVocab() int { return max(o.VocabSize, BaseVocabSize+o.wordVocabExtra()) }

// HeadDim is the text model's attention head size.
func (o Options) HeadDim() int {
	if o.HeadSize > 0 {
		return o.HeadSize
	}
	return o.Embd / o.Heads
}

func (o Options) validate() error {
	var errs []error
	check := func(ok bool, format string, args ...any) {
		if !ok {
			errs = append(errs, fmt.Errorf(format, args...))
		}
	}
	check(o.Layers >= 1, "layers must be >= 1")
	check(o.Embd >= 1, "embd must be >= 1")
	check(o.Heads >= 1 && o.Embd%max(o.Heads, 1) == 0, "embd (%d) must be a multiple of heads (%d)", o.Embd, o.Heads)
	check(o.Heads >= 1 && o.HeadDim()%2 == 0, "head size must be even (rope)")
	check(o.HeadSize == 0 || o.Arch == ArchGemma3, "head-size is only written for gemma3 (attention.key_length)")
	check(o.KVHeads >= 1 && o.Heads%max(o.KVHeads, 1) == 0, "heads (%d) must be a multiple of kv-heads (%d)", o.Heads, o.KVHeads)
	check(o.FF >= 1, "ff must be >= 1")
	check(o.CtxTrain >= 1, "ctx must be >= 1")
	check(o.PatchSize >= 1 && o.ImageSize >= o.PatchSize && o.ImageSize%max(o.PatchSize, 1) == 0,
		"image-size (%d) must be a positive multiple of patch-size (%d)", o.ImageSize, o.PatchSize)
	check(o.VisionEmbd >= 1 && o.VisionHeads >= 1 && o.VisionEmbd%max(o.VisionHeads, 1) == 0,
		"vision-embd (%d) must be a multiple of vision-heads (%d)", o.VisionEmbd, o.VisionHeads)
	check(o.VisionLayers >= 2, "vision-layers must be >= 2 (llama.cpp skips the last one)")
	// clip.cpp swaps ffn_up/ffn_down of "mlp" projector models when
	// ffn_down's input size equals n_embd (a fix for old conversions), which
	// would break a model with VisionFF == VisionEmbd.
	check(o.VisionFF >= 1 && o.VisionFF != o.VisionEmbd, "vision-ff (%d) must be >= 1 and differ from vision-embd", o.VisionFF)
	o.validateFamily(check)
	o.validateVocab(check)
	return errors.Join(errs...)
}

func (o Options) matType() uint32 {
	if o.F16 {
		return ggmlTypeF16
	}
	return ggmlTypeF32
}

func (o Options) fileType() uint32 {
	if o.F16 {
		return 1 // LLAMA_FTYPE_MOSTLY_F16
	}
	return 0 // LLAMA_FTYPE_ALL_F32
}

// tensorMakers returns constructors for matrices (in the options' matrix type) and
// for vectors (always f32), as both files lay them out.
func (o Options) tensorMakers() (mat func(name string, in, out uint64, f fill) tensorInfo, vec func(name string, n uint64, f fill) tensorInfo) {
	mt := o.matType()
	mat = func(name string, in, out uint64, f fill) tensorInfo {
		return tensorInfo{name: name, dims: []uint64{in, out}, typ: mt, fill: f}
	}
	vec = func(name string, n uint64, f fill) tensorInfo {
		return tensorInfo{name: name, dims: []uint64{n}, typ: ggmlTypeF32, fill: f}
	}
	return mat, vec
}

func invSqrt(n int) float64 { return 1 / math.Sqrt(float64(n)) }

// textModel returns the metadata and tensors of model.gguf.
func (o Options) textModel() ([]kv, []tensorInfo) {
	fam := o.family()
	voc := o.buildVocab(fam.Special)
	nVocab := uint64(len(voc.tokens))
	E, F := uint64(o.Embd), uint64(o.FF)
	hd := uint64(o.HeadDim())
	kvDim := hd * uint64(o.KVHeads)
	a := fam.TextArch

	kvs := []kv{
		{"general.architecture", a},
		{"general.name", "elasticserve-testmodel"},
		{"general.description", "random-weight test model generated by elasticserve internal/testmodel"},
		{"general.file_type", o.fileType()},
		{"general.quantization_version", uint32(2)},
		{a + ".context_length", uint32(o.CtxTrain)},
		{a + ".embedding_length", uint32(o.Embd)},
		{a + ".block_count", uint32(o.Layers)},
		{a + ".feed_forward_length", uint32(o.FF)},
		{a + ".attention.head_count", uint32(o.Heads)},
		{a + ".attention.head_count_kv", uint32(o.KVHeads)},
		{a + ".rope.dimension_count", uint32(hd)},
		{a + ".rope.freq_base", float32(RopeFreqBase)},
		{a + ".attention.layer_norm_rms_epsilon", float32(RMSNormEps)},
		{a + ".vocab_size", uint32(nVocab)},
		{"tokenizer.ggml.model", "llama"},
		{"tokenizer.ggml.tokens", voc.tokens},
		{"tokenizer.ggml.scores", voc.scores},
		{"tokenizer.ggml.token_type", voc.types},
		{"tokenizer.ggml.bos_token_id", uint32(BOSToken)},
		{"tokenizer.ggml.eos_token_id", uint32(EOSToken)},
		{"tokenizer.ggml.unknown_token_id", uint32(UnkToken)},
		{"tokenizer.ggml.add_bos_token", true},
		{"tokenizer.ggml.add_eos_token", false},
		{"tokenizer.ggml.add_space_prefix", true},
		{"tokenizer.chat_template", fam.ChatTemplate},
	}
	kvs = append(kvs, o.familyTextKV(a)...)

	mat, vec := o.tensorMakers()
	norm := around(1, 0.25)

	// Scales: the embedding has unit variance; projections keep activations
	// around unit scale (std 1/sqrt(fan_in)); q and k are a bit larger so that
	// attention is not uniform. The output matrix gives logits with a
	// standard deviation of ~3 after the final RMS norm, so the distribution
	// is far from flat and greedy decoding moves between many tokens.
	outFill := uniform(3 * invSqrt(o.Embd))
	outFill.rowScale = func(row uint64) float32 {
		switch {
		case row < firstByteToken || row >= BaseVocabSize && voc.types[row] != tokTypeNormal:
			return 0 // unk, bos, eos, special, unused: logit pinned at 0
		case row < spaceToken:
			return 0.5 // byte tokens: rarely chosen
		default:
			return 1
		}
	}
	ts := []tensorInfo{
		mat("token_embd.weight", E, nVocab, uniform(1)),
		vec("output_norm.weight", E, norm),
		mat("output.weight", E, nVocab, outFill),
	}
	for i := range o.Layers {
		p := fmt.Sprintf("blk.%d.", i)
		ts = append(ts,
			vec(p+"attn_norm.weight", E, norm),
			mat(p+"attn_q.weight", E, hd*uint64(o.Heads), uniform(2*invSqrt(o.Embd))),
			mat(p+"attn_k.weight", E, kvDim, uniform(2*invSqrt(o.Embd))),
			mat(p+"attn_v.weight", E, kvDim, uniform(invSqrt(o.Embd))),
			mat(p+"attn_output.weight", hd*uint64(o.Heads), E, uniform(invSqrt(o.Embd))),
			vec(p+"ffn_norm.weight", E, norm),
			mat(p+"ffn_gate.weight", E, F, uniform(invSqrt(o.Embd))),
			mat(p+"ffn_up.weight", E, F, uniform(invSqrt(o.Embd))),
			mat(p+"ffn_down.weight", F, E, uniform(invSqrt(o.FF))),
		)
		ts = append(ts, o.familyTextLayer(p, mat, vec)...)
	}
	return kvs, ts
}

// CLIP's normalisation constants (as used by LLaVA-1.5's vision tower).
var (
	clipImageMean = []float32{0.48145466, 0.4578275, 0.40821073}
	clipImageStd  = []float32{0.26862954, 0.26130258, 0.27577711}
)

// mmproj returns the metadata and tensors of mmproj.gguf: a pre-LN CLIP ViT
// with a class token and learned position embeddings, no post-LN, and
// LLaVA's projector mm.0 (vision -> text width), GELU, mm.2 (text -> text).
func (o Options) mmproj() ([]kv, []tensorInfo) {
	VE, VF := uint64(o.VisionEmbd), uint64(o.VisionFF)
	P := uint64(o.PatchSize)
	fam := o.family()
	if fam.qwenVL {
		return o.qwenMMProj()
	}
	nPos := uint64(o.ImageTokens()) + 1 // patches + class token
	if fam.siglip {
		nPos = o.siglipPositions() // no class token
	}

	kvs := []kv{
		{"general.architecture", "clip"},
		{"general.name", "elasticserve-testmodel-mmproj"},
		{"general.description", "random-weight CLIP + LLaVA mlp projector generated by elasticserve internal/testmodel"},
		{"general.file_type", o.fileType()},
		{"clip.has_text_encoder", false},
		{"clip.has_vision_encoder", true},
		{"clip.has_llava_projector", fam.Projector == "mlp"},
		{"clip.projector_type", fam.Projector},
		{"clip.use_gelu", fam.siglip}, // CLIP's quick GELU in the ViT (SigLIP: GELU); the mlp projector always uses GELU
		{"clip.vision.image_size", uint32(o.ImageSize)},
		{"clip.vision.patch_size", uint32(o.PatchSize)},
		{"clip.vision.embedding_length", uint32(o.VisionEmbd)},
		{"clip.vision.feed_forward_length", uint32(o.VisionFF)},
		{"clip.vision.projection_dim", uint32(o.Embd)},
		{"clip.vision.block_count", uint32(o.VisionLayers)},
		{"clip.vision.attention.head_count", uint32(o.VisionHeads)},
		{"clip.vision.attention.layer_norm_epsilon", float32(VisionLayerNormEps)},
		{"clip.vision.image_mean", clipImageMean},
		{"clip.vision.image_std", clipImageStd},
	}

	mat, vec := o.tensorMakers()
	lnW, lnB, bias := around(1, 0.25), around(0, 0.1), uniform(0.05)

	ts := []tensorInfo{
		// conv kernel {KW, KH, in channels, out channels}
		{name: "v.patch_embd.weight", dims: []uint64{P, P, 3, VE}, typ: o.matType(), fill: uniform(invSqrt(3 * o.PatchSize * o.PatchSize))},
	}
	if fam.siglip {
		// SigLIP: a patch bias, no class token, no pre-LN (a post-LN after the blocks)
		ts = append(ts,
			vec("v.patch_embd.bias", VE, bias),
			tensorInfo{name: "v.position_embd.weight", dims: []uint64{VE, nPos}, typ: ggmlTypeF32, fill: uniform(0.5)},
		)
	} else {
		ts = append(ts,
			// clip.cpp concatenates the class embedding to f32 activations, so it
			// (and the position table) stay f32.
			vec("v.class_embd", VE, uniform(0.5)),
			tensorInfo{name: "v.position_embd.weight", dims: []uint64{VE, nPos}, typ: ggmlTypeF32, fill: uniform(0.5)},
			vec("v.pre_ln.weight", VE, lnW),
			vec("v.pre_ln.bias", VE, lnB),
		)
	}
	for i := range o.VisionLayers {
		p := fmt.Sprintf("v.blk.%d.", i)
		ts = append(ts,
			vec(p+"ln1.weight", VE, lnW),
			vec(p+"ln1.bias", VE, lnB),
			mat(p+"attn_q.weight", VE, VE, uniform(2*invSqrt(o.VisionEmbd))),
			vec(p+"attn_q.bias", VE, bias),
			mat(p+"attn_k.weight", VE, VE, uniform(2*invSqrt(o.VisionEmbd))),
			vec(p+"attn_k.bias", VE, bias),
			mat(p+"attn_v.weight", VE, VE, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"attn_v.bias", VE, bias),
			mat(p+"attn_out.weight", VE, VE, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"attn_out.bias", VE, bias),
			vec(p+"ln2.weight", VE, lnW),
			vec(p+"ln2.bias", VE, lnB),
			mat(p+"ffn_up.weight", VE, VF, uniform(invSqrt(o.VisionEmbd))),
			vec(p+"ffn_up.bias", VF, bias),
			mat(p+"ffn_down.weight", VF, VE, uniform(invSqrt(o.VisionFF))),
			vec(p+"ffn_down.bias", VE, bias),
		)
	}
	if fam.siglip {
		ts = append(ts, vec("v.post_ln.weight", VE, lnW), vec("v.post_ln.bias", VE, lnB))
	}
	fkv, fts := o.familyMMProj(mat, vec)
	return append(kvs, fkv...), append(ts, fts...)
}

// writeFile writes one GGUF file atomically (temporary file, then rename).
func writeFile(path string, kvs []kv, ts []tensorInfo, seed int64) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = writeGGUF(f, kvs, ts, seed); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// Write writes dir/model.gguf and dir/mmproj.gguf for opt, creating dir if
// needed. The same options always give byte-identical files.
func Write(dir string, opt Options) (modelPath, mmprojPath string, err error) {
	if err := opt.validate(); err != nil {
		return "", "", fmt.Errorf("testmodel: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	modelPath = filepath.Join(dir, ModelFile)
	mmprojPath = filepath.Join(dir, MMProjFile)
	kvs, ts := opt.textModel()
	if err := writeFile(modelPath, kvs, ts, opt.Seed); err != nil {
		return "", "", fmt.Errorf("testmodel: %s: %w", modelPath, err)
	}
	// a different stream for the projector file, even for same-named tensors
	kvs, ts = opt.mmproj()
	if err := writeFile(mmprojPath, kvs, ts, opt.Seed^0x6d6d70726f6a); err != nil {
		return "", "", fmt.Errorf("testmodel: %s: %w", mmprojPath, err)
	}
	return modelPath, mmprojPath, nil
}

// CacheKey identifies opt's files for this generator version.
func (o Options) CacheKey() string {
	key := fmt.Sprintf("v%d %+v", GeneratorVersion, o)
	if k, ok := strings.CutSuffix(key, " Vocab:}"); ok { // unset: the key from before the field
		key = k + "}"
	}
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:8])
}

// CacheDir is where Ensure keeps opt's files:
// $TMPDIR/elasticserve-testmodel-<CacheKey>.
func (o Options) CacheDir() string {
	return filepath.Join(os.TempDir(), "elasticserve-testmodel-"+o.CacheKey())
}

var ensureMu sync.Mutex

// Ensure returns the paths of opt's files in a cache folder shared by all
// processes of this user (see CacheDir), writing them first if they are not
// there. The folder is filled under a temporary name and renamed into place,
// so parallel test binaries never see half-written files; if two write it at
// once, one rename wins and the other copy is discarded.
func Ensure(opt Options) (modelPath, mmprojPath string, err error) {
	if err := opt.validate(); err != nil {
		return "", "", fmt.Errorf("testmodel: %w", err)
	}
	ensureMu.Lock()
	defer ensureMu.Unlock()

	dir := opt.CacheDir()
	modelPath = filepath.Join(dir, ModelFile)
	mmprojPath = filepath.Join(dir, MMProjFile)
	if exists(modelPath) && exists(mmprojPath) {
		return modelPath, mmprojPath, nil
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), filepath.Base(dir)+".tmp-")
	if err != nil {
		return "", "", err
	}
	defer os.RemoveAll(tmp) // nothing left once renamed
	if _, _, err := Write(tmp, opt); err != nil {
		return "", "", err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		// another process may have won the race
		if exists(modelPath) && exists(mmprojPath) {
			return modelPath, mmprojPath, nil
		}
		return "", "", fmt.Errorf("testmodel: %w", err)
	}
	return modelPath, mmprojPath, nil
}

func exists(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}
