package llama

/*
#include <stdlib.h>
#include "llama.h"
#include "elastic_hook.h"
*/
import "C"

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/cgo"
	"unsafe"
)

// Token is a llama.cpp token id.
type Token = int32

// ModelParams configures model loading.
type ModelParams struct {
	GPULayers int // layers offloaded to a GPU; -1 all, 0 none
	UseMmap   bool
	// Progress, if set, is called with the load fraction in [0,1]. Returning false aborts.
	Progress func(fraction float32) bool
}

// ModelInfo is the metadata the server and the cache policies need.
type ModelInfo struct {
	Arch       string
	Desc       string
	Layers     int
	Heads      int
	KVHeads    int
	Embd       int
	CtxTrain   int
	VocabSize  int
	Params     uint64
	SizeBytes  uint64
	BOS, EOS   Token
	AddBOS     bool
	ChatTmpl   string
	HeadDim    int // embedding size / heads
	KVRowElems int // K (and V) elements per cell per layer: KVHeads * HeadDim
	// SWA is the sliding-window size of models with sliding-window attention layers
	// (0: none). Their cache holds two caches: one for the full-attention layers
	// (FullLayers), one for the sliding-window layers.
	SWA int
	// FullLayers are the full-attention layers of a sliding-window model whose layer
	// pattern the KV hook knows (Gemma 3: every 6th layer, llama.cpp's
	// set_swa_pattern(6)); nil for other sliding-window models (the hook refuses
	// their cache) and for models without sliding-window attention.
	FullLayers []int
	// MRoPE: positions have several components (Qwen2-VL style rope).
	MRoPE bool
}

// swaPatterns: for each architecture whose sliding-window layout is fixed in
// llama.cpp (src/llama-model.cpp, load_hparams), n such that layer il is a
// full-attention layer iff il%n == n-1.
var swaPatterns = map[string]int{"gemma3": 6}

func fullLayers(arch string, layers int) []int {
	n, ok := swaPatterns[arch]
	if !ok {
		return nil
	}
	var out []int
	for il := range layers {
		if il%n == n-1 {
			out = append(out, il)
		}
	}
	return out
}

// Model is a loaded GGUF model. It is safe for concurrent use by tokenizer calls;
// contexts created from it must be used from one goroutine each.
type Model struct {
	c     *C.struct_llama_model
	vocab *C.struct_llama_vocab
	info  ModelInfo
	// tmpl replaces the GGUF chat template when set (SetChatTemplate).
	tmpl string
}

//export esProgress
func esProgress(progress C.float, handle C.uintptr_t) C.bool {
	h := cgo.Handle(handle)
	fn, ok := h.Value().(func(float32) bool)
	if !ok || fn == nil {
		return true
	}
	return C.bool(fn(float32(progress)))
}

// checkGGUF refuses files that are missing or are not GGUF before llama.cpp sees them.
func checkGGUF(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open model: %w", err)
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil {
		return fmt.Errorf("read model %s: %w", path, err)
	}
	if !bytes.Equal(magic[:], []byte("GGUF")) {
		return fmt.Errorf("model %s is not a GGUF file", path)
	}
	return nil
}

// LoadModel loads a GGUF file. Init must have been called.
func LoadModel(path string, p ModelParams) (*Model, error) {
	if err := checkGGUF(path); err != nil {
		return nil, err
	}
	params := C.llama_model_default_params()
	params.n_gpu_layers = C.int32_t(p.GPULayers)
	params.use_mmap = C.bool(p.UseMmap)
	var handle cgo.Handle
	if p.Progress != nil {
		handle = cgo.NewHandle(p.Progress)
		defer handle.Delete()
		C.es_set_progress(&params, C.uintptr_t(handle))
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	cm := C.llama_model_load_from_file(cpath, params)
	if cm == nil {
		return nil, fmt.Errorf("llama.cpp could not load model %s", path)
	}
	m := &Model{c: cm, vocab: C.llama_model_get_vocab(cm)}
	m.info = m.readInfo()
	return m, nil
}

// Close frees the model. Contexts made from it must be closed first.
func (m *Model) Close() {
	if m != nil && m.c != nil {
		C.llama_model_free(m.c)
		m.c = nil
	}
}

// Info returns the model's metadata.
func (m *Model) Info() ModelInfo { return m.info }

func (m *Model) readInfo() ModelInfo {
	var buf [256]C.char
	C.llama_model_desc(m.c, &buf[0], C.size_t(len(buf)))
	i := ModelInfo{
		Arch:      m.Meta("general.architecture"),
		Desc:      C.GoString(&buf[0]),
		Layers:    int(C.llama_model_n_layer(m.c)),
		Heads:     int(C.llama_model_n_head(m.c)),
		KVHeads:   int(C.llama_model_n_head_kv(m.c)),
		Embd:      int(C.llama_model_n_embd(m.c)),
		CtxTrain:  int(C.llama_model_n_ctx_train(m.c)),
		VocabSize: int(C.llama_vocab_n_tokens(m.vocab)),
		Params:    uint64(C.llama_model_n_params(m.c)),
		SizeBytes: uint64(C.llama_model_size(m.c)),
		BOS:       Token(C.llama_vocab_bos(m.vocab)),
		EOS:       Token(C.llama_vocab_eos(m.vocab)),
		AddBOS:    bool(C.llama_vocab_get_add_bos(m.vocab)),
		SWA:       int(C.llama_model_n_swa(m.c)),
	}
	if t := C.llama_model_chat_template(m.c, nil); t != nil {
		i.ChatTmpl = C.GoString(t)
	}
	if i.SWA > 0 {
		i.FullLayers = fullLayers(i.Arch, i.Layers)
	}
	switch C.llama_model_rope_type(m.c) {
	case C.LLAMA_ROPE_TYPE_MROPE, C.LLAMA_ROPE_TYPE_IMROPE:
		i.MRoPE = true
	}
	if i.Heads > 0 {
		i.HeadDim = i.Embd / i.Heads
	}
	i.KVRowElems = i.KVHeads * i.HeadDim
	return i
}

// Meta returns a GGUF metadata value as a string ("" when absent).
func (m *Model) Meta(key string) string {
	ckey := C.CString(key)
	defer C.free(unsafe.Pointer(ckey))
	n := C.llama_model_meta_val_str(m.c, ckey, nil, 0)
	if n < 0 {
		return ""
	}
	buf := make([]byte, int(n)+1)
	C.llama_model_meta_val_str(m.c, ckey, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)))
	return string(buf[:n])
}

// Tokenize converts text to tokens. addSpecial adds BOS when the model wants it;
// parseSpecial turns special-token text (e.g. "</s>") into its token.
func (m *Model) Tokenize(text string, addSpecial, parseSpecial bool) ([]Token, error) {
	ctext := C.CString(text)
	defer C.free(unsafe.Pointer(ctext))
	capacity := len(text) + 8
	for range 2 {
		out := make([]Token, capacity)
		n := C.llama_tokenize(m.vocab, ctext, C.int32_t(len(text)), (*C.llama_token)(unsafe.Pointer(&out[0])),
			C.int32_t(capacity), C.bool(addSpecial), C.bool(parseSpecial))
		if n >= 0 {
			return out[:n], nil
		}
		if n == C.INT32_MIN {
			return nil, errors.New("tokenize: input too long")
		}
		capacity = int(-n)
	}
	return nil, errors.New("tokenize: buffer size mismatch")
}

// TokenPiece returns the raw bytes of one token. The bytes may be an incomplete UTF-8
// sequence (byte-fallback tokens); use a UTF8Buffer when streaming.
func (m *Model) TokenPiece(tok Token, special bool) []byte {
	var small [64]C.char
	n := C.llama_token_to_piece(m.vocab, C.llama_token(tok), &small[0], C.int32_t(len(small)), 0, C.bool(special))
	if n >= 0 {
		return C.GoBytes(unsafe.Pointer(&small[0]), n)
	}
	buf := make([]byte, int(-n))
	n = C.llama_token_to_piece(m.vocab, C.llama_token(tok), (*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(len(buf)), 0, C.bool(special))
	if n < 0 {
		return nil
	}
	return buf[:n]
}

// Detokenize converts tokens back to text.
func (m *Model) Detokenize(toks []Token, removeSpecial, unparseSpecial bool) string {
	if len(toks) == 0 {
		return ""
	}
	capacity := len(toks)*4 + 16
	for range 2 {
		buf := make([]byte, capacity)
		n := C.llama_detokenize(m.vocab, (*C.llama_token)(unsafe.Pointer(&toks[0])), C.int32_t(len(toks)),
			(*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(capacity), C.bool(removeSpecial), C.bool(unparseSpecial))
		if n >= 0 {
			return string(buf[:n])
		}
		capacity = int(-n)
	}
	return ""
}

// IsEOG reports whether tok ends generation (EOS, EOT, ...).
func (m *Model) IsEOG(tok Token) bool {
	return bool(C.llama_vocab_is_eog(m.vocab, C.llama_token(tok)))
}

// ChatMessage is one message for ApplyChatTemplate.
type ChatMessage struct {
	Role    string
	Content string
}

// ApplyChatTemplate renders messages with the model's GGUF chat template (or tmpl when
// not empty) using llama.cpp's built-in template matcher. addAssistant appends the
// assistant prefix so generation continues as the assistant.
func (m *Model) ApplyChatTemplate(tmpl string, msgs []ChatMessage, addAssistant bool) (string, error) {
	if tmpl == "" {
		tmpl = m.tmpl
	}
	if tmpl == "" {
		tmpl = m.info.ChatTmpl
	}
	var ctmpl *C.char
	if tmpl != "" {
		ctmpl = C.CString(tmpl)
		defer C.free(unsafe.Pointer(ctmpl))
	}
	n := len(msgs)
	if n == 0 {
		return "", errors.New("chat template: no messages")
	}
	cmsgs := (*[1 << 20]C.struct_llama_chat_message)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.struct_llama_chat_message{}))))[:n:n]
	defer C.free(unsafe.Pointer(&cmsgs[0]))
	strs := make([]*C.char, 0, 2*n)
	defer func() {
		for _, s := range strs {
			C.free(unsafe.Pointer(s))
		}
	}()
	total := 0
	for i, msg := range msgs {
		r, c := C.CString(msg.Role), C.CString(msg.Content)
		strs = append(strs, r, c)
		cmsgs[i].role, cmsgs[i].content = r, c
		total += len(msg.Role) + len(msg.Content)
	}
	capacity := 2*total + 256
	for range 2 {
		buf := make([]byte, capacity)
		res := C.llama_chat_apply_template(ctmpl, &cmsgs[0], C.size_t(n), C.bool(addAssistant),
			(*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(capacity))
		if res < 0 {
			return "", errors.New("chat template: the model's template is not supported by llama.cpp's built-in templates")
		}
		if int(res) <= capacity {
			return string(buf[:res]), nil
		}
		capacity = int(res)
	}
	return "", errors.New("chat template: buffer size mismatch")
}

// SetChatTemplate makes name (one of llama.cpp's built-in templates, e.g. "chatml",
// "gemma", "llama2", "vicuna") the template ApplyChatTemplate uses when given none;
// "" goes back to the model's own. Call it before the model is shared. It fails
// when llama.cpp cannot apply name.
func (m *Model) SetChatTemplate(name string) error {
	if name != "" {
		if _, err := m.ApplyChatTemplate(name, []ChatMessage{{Role: "user", Content: "hi"}}, true); err != nil {
			return fmt.Errorf("chat template %q is not one of llama.cpp's built-in templates", name)
		}
	}
	m.tmpl = name
	return nil
}

// CheckChatTemplate reports whether the template ApplyChatTemplate uses by default
// (SetChatTemplate's, else the model's own) can be applied by llama.cpp.
func (m *Model) CheckChatTemplate() error {
	_, err := m.ApplyChatTemplate("", []ChatMessage{{Role: "system", Content: "s"}, {Role: "user", Content: "hi"}}, true)
	return err
}
