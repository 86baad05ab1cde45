package llama

/*
#include <stdlib.h>
#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"unsafe"
)

// MediaMarker is the text that stands for one image in a prompt given to Tokenize.
func MediaMarker() string { return C.GoString(C.mtmd_default_marker()) }

// Vision is an mtmd context: the image encoder (CLIP + projector) of a VLM.
// Its methods may be called from several goroutines; calls are serialised.
type Vision struct {
	mu    sync.Mutex
	c     *C.mtmd_context
	model *Model
	embd  int
	mrope bool
}

// VisionParams configures the image encoder.
type VisionParams struct {
	Threads   int
	UseGPU    bool
	FlashAttn bool
}

// LoadVision loads an mmproj GGUF for model.
func LoadVision(m *Model, mmproj string, p VisionParams) (*Vision, error) {
	if err := checkGGUF(mmproj); err != nil {
		return nil, err
	}
	cp := C.mtmd_context_params_default()
	cp.use_gpu = C.bool(p.UseGPU)
	cp.print_timings = false
	if p.Threads > 0 {
		cp.n_threads = C.int(p.Threads)
	}
	cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
	if p.FlashAttn {
		cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
	}
	cp.warmup = false
	cpath := C.CString(mmproj)
	defer C.free(unsafe.Pointer(cpath))
	c := C.mtmd_init_from_file(cpath, m.c, cp)
	if c == nil {
		return nil, fmt.Errorf("llama.cpp could not load mmproj %s", mmproj)
	}
	v := &Vision{c: c, model: m, embd: int(C.llama_model_n_embd_inp(m.c))}
	if !bool(C.mtmd_support_vision(c)) {
		v.Close()
		return nil, fmt.Errorf("mmproj %s has no vision encoder", mmproj)
	}
	v.mrope = bool(C.mtmd_decode_use_mrope(c))
	return v, nil
}

// Close frees the mtmd context.
func (v *Vision) Close() {
	if v == nil {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.c != nil {
		C.mtmd_free(v.c)
		v.c = nil
	}
}

// MRoPE reports whether the text model takes M-RoPE positions (Qwen2-VL style):
// an image's embeddings are decoded at a 2-D grid of positions (Batch.AddEmbdMRoPE)
// and the image advances the position by Chunk.NPos, not by its token count.
func (v *Vision) MRoPE() bool { return v.mrope }

// NonCausal reports whether image embeddings must be decoded without the causal mask.
func (v *Vision) NonCausal() bool { return bool(C.mtmd_decode_use_non_causal(v.c)) }

// ChunkKind tells text from image chunks.
type ChunkKind int

const (
	ChunkText ChunkKind = iota
	ChunkImage
)

// Chunk is one piece of a multimodal prompt.
type Chunk struct {
	Kind    ChunkKind
	Tokens  []Token // text chunks
	NTokens int     // tokens (cells) the chunk occupies
	// NPos is how far the chunk advances the position: NTokens, except for an image
	// of an M-RoPE model, whose grid of NX x NY embeddings takes max(NX, NY) positions.
	NPos int
	// NX, NY: an image's grid of embeddings (row-major, NX per row) under M-RoPE;
	// NX = NTokens, NY = 1 otherwise.
	NX, NY int
	index  int
}

// Prompt is a tokenized multimodal prompt. It owns C memory: Close it.
type Prompt struct {
	v      *Vision
	chunks *C.mtmd_input_chunks
	Chunks []Chunk
}

// NTokens is the total number of tokens (cells) of the prompt.
func (p *Prompt) NTokens() int {
	n := 0
	for _, c := range p.Chunks {
		n += c.NTokens
	}
	return n
}

// NPos is the total number of positions of the prompt (NTokens unless an M-RoPE
// model's images take fewer positions than embeddings).
func (p *Prompt) NPos() int {
	n := 0
	for _, c := range p.Chunks {
		n += c.NPos
	}
	return n
}

// Close frees the chunks.
func (p *Prompt) Close() {
	if p != nil && p.chunks != nil {
		C.mtmd_input_chunks_free(p.chunks)
		p.chunks = nil
	}
}

// ErrBadImage is returned (inside an *ImageError) when image bytes cannot be decoded.
var ErrBadImage = errors.New("image could not be decoded")

// ImageError says which image of a Tokenize call could not be read.
type ImageError struct {
	Index int
	Err   error
}

func (e *ImageError) Error() string { return fmt.Sprintf("image %d: %v", e.Index, e.Err) }

func (e *ImageError) Unwrap() error { return e.Err }

// Tokenize splits text (with one MediaMarker per image) into text and image chunks.
// addSpecial adds BOS; special tokens in text are parsed.
func (v *Vision) Tokenize(text string, images [][]byte, addSpecial bool) (*Prompt, error) {
	if n := strings.Count(text, MediaMarker()); n != len(images) {
		return nil, fmt.Errorf("prompt has %d image markers but %d images", n, len(images))
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.c == nil {
		return nil, errors.New("vision context closed")
	}
	bitmaps := make([]*C.mtmd_bitmap, 0, len(images))
	defer func() {
		for _, b := range bitmaps {
			C.mtmd_bitmap_free(b)
		}
	}()
	for i, img := range images {
		if len(img) == 0 {
			return nil, &ImageError{Index: i, Err: ErrBadImage}
		}
		cbuf := C.CBytes(img)
		b := C.mtmd_helper_bitmap_init_from_buf(v.c, (*C.uchar)(cbuf), C.size_t(len(img)))
		C.free(cbuf)
		if b == nil || bool(C.mtmd_bitmap_is_audio(b)) {
			if b != nil {
				C.mtmd_bitmap_free(b)
			}
			return nil, &ImageError{Index: i, Err: ErrBadImage}
		}
		bitmaps = append(bitmaps, b)
	}
	ctext := C.CString(text)
	defer C.free(unsafe.Pointer(ctext))
	in := C.mtmd_input_text{text: ctext, add_special: C.bool(addSpecial), parse_special: true}
	chunks := C.mtmd_input_chunks_init()
	var bptr **C.mtmd_bitmap
	if len(bitmaps) > 0 {
		arr := (*[1 << 16]*C.mtmd_bitmap)(C.malloc(C.size_t(len(bitmaps)) * C.size_t(unsafe.Sizeof(uintptr(0)))))
		defer C.free(unsafe.Pointer(arr))
		copy(arr[:len(bitmaps)], bitmaps)
		bptr = &arr[0]
	}
	if rc := C.mtmd_tokenize(v.c, chunks, &in, bptr, C.size_t(len(bitmaps))); rc != 0 {
		C.mtmd_input_chunks_free(chunks)
		return nil, fmt.Errorf("mtmd tokenize failed (%d)", int(rc))
	}
	p := &Prompt{v: v, chunks: chunks}
	n := int(C.mtmd_input_chunks_size(chunks))
	for i := 0; i < n; i++ {
		ch := C.mtmd_input_chunks_get(chunks, C.size_t(i))
		c := Chunk{index: i, NTokens: int(C.mtmd_input_chunk_get_n_tokens(ch)), NPos: int(C.mtmd_input_chunk_get_n_pos(ch))}
		c.NX, c.NY = c.NTokens, 1
		switch C.mtmd_input_chunk_get_type(ch) {
		case C.MTMD_INPUT_CHUNK_TYPE_TEXT:
			var nt C.size_t
			toks := C.mtmd_input_chunk_get_tokens_text(ch, &nt)
			c.Kind = ChunkText
			if nt > 0 {
				c.Tokens = append([]Token(nil), unsafe.Slice((*Token)(unsafe.Pointer(toks)), int(nt))...)
			}
		case C.MTMD_INPUT_CHUNK_TYPE_IMAGE:
			c.Kind = ChunkImage
			if it := C.mtmd_input_chunk_get_tokens_image(ch); it != nil && v.mrope {
				c.NX, c.NY = int(C.mtmd_image_tokens_get_nx(it)), int(C.mtmd_image_tokens_get_ny(it))
				if c.NX*c.NY != c.NTokens {
					p.Close()
					return nil, fmt.Errorf("mtmd: an M-RoPE image grid of %dx%d for %d embeddings", c.NX, c.NY, c.NTokens)
				}
			}
		default:
			p.Close()
			return nil, errors.New("audio input is not supported")
		}
		p.Chunks = append(p.Chunks, c)
	}
	return p, nil
}

// EncodeImage runs the image encoder on an image chunk and returns NTokens rows of
// the text model's input embedding size, flattened.
func (p *Prompt) EncodeImage(c Chunk) ([]float32, error) {
	if c.Kind != ChunkImage {
		return nil, errors.New("not an image chunk")
	}
	v := p.v
	v.mu.Lock()
	defer v.mu.Unlock()
	ch := C.mtmd_input_chunks_get(p.chunks, C.size_t(c.index))
	if rc := C.mtmd_encode_chunk(v.c, ch); rc != 0 {
		return nil, fmt.Errorf("image encode failed (%d)", int(rc))
	}
	out := C.mtmd_get_output_embd(v.c)
	if out == nil {
		return nil, errors.New("image encoder produced no output")
	}
	return append([]float32(nil), unsafe.Slice((*float32)(unsafe.Pointer(out)), c.NTokens*v.embd)...), nil
}

// EmbdSize is the size of one image embedding row.
func (v *Vision) EmbdSize() int { return v.embd }

// EvalWithHelper decodes the whole prompt into sequence seq of ctx with llama.cpp's
// own mtmd helper (mtmd_helper_eval_chunks: images encoded, positions as llama.cpp
// lays them out, M-RoPE grids included), from position nPast in batches of nBatch,
// with logits for the last token (Context.Logits(-1)). It returns the position
// after the prompt. It is the reference the engine's own prompt path is checked
// against; the engine does not use it.
func (p *Prompt) EvalWithHelper(ctx *Context, nPast, seq, nBatch int) (int, error) {
	v := p.v
	v.mu.Lock()
	defer v.mu.Unlock()
	var next C.llama_pos
	if rc := C.mtmd_helper_eval_chunks(v.c, ctx.c, p.chunks, C.llama_pos(nPast), C.llama_seq_id(seq), C.int32_t(nBatch), true, &next); rc != 0 {
		return 0, fmt.Errorf("mtmd_helper_eval_chunks failed (%d)", int(rc))
	}
	return int(next), nil
}
