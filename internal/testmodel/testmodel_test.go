package testmodel

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

// A small GGUF reader, independent of the writer, for checking the files.

type ggufTensor struct {
	name   string
	dims   []uint64
	typ    uint32
	offset uint64
}

type ggufFile struct {
	version    uint32
	kv         map[string]any
	keys       []string
	tensors    []ggufTensor
	dataOffset uint64
	size       uint64
	raw        []byte
}

type reader struct {
	r   *bufio.Reader
	n   uint64
	err error
}

func (r *reader) read(p []byte) {
	if r.err != nil {
		return
	}
	n, err := io.ReadFull(r.r, p)
	r.n += uint64(n)
	r.err = err
}

func (r *reader) u8() uint8 { var b [1]byte; r.read(b[:]); return b[0] }
func (r *reader) u32() uint32 {
	var b [4]byte
	r.read(b[:])
	return binary.LittleEndian.Uint32(b[:])
}
func (r *reader) u64() uint64 {
	var b [8]byte
	r.read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}
func (r *reader) str() string {
	n := r.u64()
	if n > 1<<20 {
		r.err = fmt.Errorf("string too long: %d", n)
		return ""
	}
	b := make([]byte, n)
	r.read(b)
	return string(b)
}

func (r *reader) value(typ uint32) any {
	switch typ {
	case ggufTypeUint8:
		return r.u8()
	case ggufTypeInt8:
		return int8(r.u8())
	case ggufTypeUint16, ggufTypeInt16:
		var b [2]byte
		r.read(b[:])
		return binary.LittleEndian.Uint16(b[:])
	case ggufTypeUint32:
		return r.u32()
	case ggufTypeInt32:
		return int32(r.u32())
	case ggufTypeFloat32:
		return math.Float32frombits(r.u32())
	case ggufTypeBool:
		return r.u8() != 0
	case ggufTypeString:
		return r.str()
	case ggufTypeUint64:
		return r.u64()
	case ggufTypeInt64:
		return int64(r.u64())
	case ggufTypeFloat64:
		return math.Float64frombits(r.u64())
	case ggufTypeArray:
		et := r.u32()
		n := r.u64()
		switch et {
		case ggufTypeString:
			out := make([]string, n)
			for i := range out {
				out[i] = r.str()
			}
			return out
		case ggufTypeFloat32:
			out := make([]float32, n)
			for i := range out {
				out[i] = math.Float32frombits(r.u32())
			}
			return out
		case ggufTypeInt32:
			out := make([]int32, n)
			for i := range out {
				out[i] = int32(r.u32())
			}
			return out
		default:
			out := make([]any, n)
			for i := range out {
				out[i] = r.value(et)
			}
			return out
		}
	default:
		r.err = fmt.Errorf("unknown value type %d", typ)
		return nil
	}
}

func readGGUF(t *testing.T, path string) *ggufFile {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r := &reader{r: bufio.NewReader(bytes.NewReader(raw))}
	var magic [4]byte
	r.read(magic[:])
	if string(magic[:]) != "GGUF" {
		t.Fatalf("%s: bad magic %q", path, magic)
	}
	f := &ggufFile{kv: map[string]any{}, size: uint64(len(raw)), raw: raw}
	f.version = r.u32()
	nt := r.u64()
	nkv := r.u64()
	for range nkv {
		k := r.str()
		if _, dup := f.kv[k]; dup {
			t.Errorf("%s: duplicate key %s", path, k)
		}
		f.kv[k] = r.value(r.u32())
		f.keys = append(f.keys, k)
	}
	for range nt {
		var ti ggufTensor
		ti.name = r.str()
		nd := r.u32()
		for range nd {
			ti.dims = append(ti.dims, r.u64())
		}
		ti.typ = r.u32()
		ti.offset = r.u64()
		f.tensors = append(f.tensors, ti)
	}
	if r.err != nil {
		t.Fatalf("%s: %v", path, r.err)
	}
	f.dataOffset = alignUp(r.n, ggufAlignment)
	return f
}

func (f *ggufFile) tensor(name string) *ggufTensor {
	for i := range f.tensors {
		if f.tensors[i].name == name {
			return &f.tensors[i]
		}
	}
	return nil
}

func (f *ggufFile) values(t *testing.T, ti *ggufTensor) []float32 {
	t.Helper()
	n := uint64(1)
	for _, d := range ti.dims {
		n *= d
	}
	out := make([]float32, n)
	base := f.dataOffset + ti.offset
	for i := range out {
		switch ti.typ {
		case ggmlTypeF32:
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(f.raw[base+4*uint64(i):]))
		case ggmlTypeF16:
			out[i] = f16ToF32(binary.LittleEndian.Uint16(f.raw[base+2*uint64(i):]))
		default:
			t.Fatalf("type %d", ti.typ)
		}
	}
	return out
}

func elemSize(typ uint32) uint64 {
	if typ == ggmlTypeF16 {
		return 2
	}
	return 4
}

// checkLayout verifies tensor offsets are aligned, non-overlapping and inside
// the file.
func checkLayout(t *testing.T, f *ggufFile) {
	t.Helper()
	if f.version != 3 {
		t.Errorf("version %d", f.version)
	}
	end := uint64(0)
	seen := map[string]bool{}
	for _, ti := range f.tensors {
		if seen[ti.name] {
			t.Errorf("duplicate tensor %s", ti.name)
		}
		seen[ti.name] = true
		if ti.offset%ggufAlignment != 0 {
			t.Errorf("%s: offset %d not aligned", ti.name, ti.offset)
		}
		if ti.offset < end {
			t.Errorf("%s: overlaps previous tensor", ti.name)
		}
		n := uint64(1)
		for _, d := range ti.dims {
			n *= d
		}
		end = ti.offset + n*elemSize(ti.typ)
	}
	if f.dataOffset+end > f.size {
		t.Errorf("data end %d beyond file size %d", f.dataOffset+end, f.size)
	}
	if f.size-(f.dataOffset+end) >= ggufAlignment {
		t.Errorf("%d trailing bytes", f.size-(f.dataOffset+end))
	}
}

func wantKV(t *testing.T, f *ggufFile, key string, want any) {
	t.Helper()
	got, ok := f.kv[key]
	if !ok {
		t.Errorf("missing key %s", key)
		return
	}
	if fmt.Sprintf("%T %v", got, got) != fmt.Sprintf("%T %v", want, want) {
		t.Errorf("%s = %T %v, want %T %v", key, got, got, want, want)
	}
}

func wantDims(t *testing.T, f *ggufFile, name string, dims ...uint64) {
	t.Helper()
	ti := f.tensor(name)
	if ti == nil {
		t.Errorf("missing tensor %s", name)
		return
	}
	if fmt.Sprint(ti.dims) != fmt.Sprint(dims) {
		t.Errorf("%s dims %v, want %v", name, ti.dims, dims)
	}
}

func TestDeterministic(t *testing.T) {
	opt := DefaultOptions()
	a, b := t.TempDir(), t.TempDir()
	m1, p1, err := Write(a, opt)
	if err != nil {
		t.Fatal(err)
	}
	m2, p2, err := Write(b, opt)
	if err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2]string{{m1, m2}, {p1, p2}} {
		x, _ := os.ReadFile(pair[0])
		y, _ := os.ReadFile(pair[1])
		if len(x) == 0 || !bytes.Equal(x, y) {
			t.Errorf("%s and %s differ (%d, %d bytes)", pair[0], pair[1], len(x), len(y))
		}
	}
	// another seed gives other weights
	opt.Seed++
	m3, _, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	x, _ := os.ReadFile(m1)
	z, _ := os.ReadFile(m3)
	if bytes.Equal(x, z) {
		t.Error("different seeds gave the same file")
	}
	// no temporary files left behind
	entries, _ := os.ReadDir(a)
	if len(entries) != 2 {
		t.Errorf("dir has %d entries, want 2", len(entries))
	}
}

func TestTextModelFile(t *testing.T) {
	opt := DefaultOptions()
	m, _, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	f := readGGUF(t, m)
	checkLayout(t, f)
	wantKV(t, f, "general.architecture", "llama")
	wantKV(t, f, "general.file_type", uint32(0))
	wantKV(t, f, "llama.context_length", uint32(4096))
	wantKV(t, f, "llama.embedding_length", uint32(64))
	wantKV(t, f, "llama.block_count", uint32(3))
	wantKV(t, f, "llama.feed_forward_length", uint32(128))
	wantKV(t, f, "llama.attention.head_count", uint32(4))
	wantKV(t, f, "llama.attention.head_count_kv", uint32(2))
	wantKV(t, f, "llama.rope.dimension_count", uint32(16))
	wantKV(t, f, "llama.rope.freq_base", float32(10000))
	wantKV(t, f, "llama.attention.layer_norm_rms_epsilon", float32(1e-5))
	wantKV(t, f, "tokenizer.ggml.model", "llama")
	wantKV(t, f, "tokenizer.ggml.bos_token_id", uint32(1))
	wantKV(t, f, "tokenizer.ggml.eos_token_id", uint32(2))
	wantKV(t, f, "tokenizer.ggml.unknown_token_id", uint32(0))
	wantKV(t, f, "tokenizer.ggml.add_bos_token", true)
	wantKV(t, f, "tokenizer.chat_template", ChatTemplate)

	toks, _ := f.kv["tokenizer.ggml.tokens"].([]string)
	types, _ := f.kv["tokenizer.ggml.token_type"].([]int32)
	scores, _ := f.kv["tokenizer.ggml.scores"].([]float32)
	if len(toks) != BaseVocabSize || len(types) != len(toks) || len(scores) != len(toks) {
		t.Fatalf("vocab sizes: %d tokens, %d types, %d scores", len(toks), len(types), len(scores))
	}
	seen := map[string]bool{}
	for i, tok := range toks {
		if seen[tok] {
			t.Errorf("duplicate token %q", tok)
		}
		seen[tok] = true
		if tok != TokenPiece(i) {
			t.Errorf("token %d = %q, TokenPiece says %q", i, tok, TokenPiece(i))
		}
	}
	if toks[0] != "<unk>" || toks[1] != "<s>" || toks[2] != "</s>" || toks[3] != "<0x00>" || toks[258] != "<0xFF>" || toks[259] != "\u2581" || toks[260] != "!" {
		t.Errorf("unexpected layout: %q", toks[:5])
	}
	if types[0] != 2 || types[1] != 3 || types[2] != 3 || types[3] != 6 || types[258] != 6 || types[259] != 1 || types[353] != 1 {
		t.Errorf("unexpected token types")
	}

	wantDims(t, f, "token_embd.weight", 64, BaseVocabSize)
	wantDims(t, f, "output.weight", 64, BaseVocabSize)
	wantDims(t, f, "output_norm.weight", 64)
	for i := range 3 {
		p := fmt.Sprintf("blk.%d.", i)
		wantDims(t, f, p+"attn_norm.weight", 64)
		wantDims(t, f, p+"attn_q.weight", 64, 64)
		wantDims(t, f, p+"attn_k.weight", 64, 32)
		wantDims(t, f, p+"attn_v.weight", 64, 32)
		wantDims(t, f, p+"attn_output.weight", 64, 64)
		wantDims(t, f, p+"ffn_norm.weight", 64)
		wantDims(t, f, p+"ffn_gate.weight", 64, 128)
		wantDims(t, f, p+"ffn_up.weight", 64, 128)
		wantDims(t, f, p+"ffn_down.weight", 128, 64)
	}
	if len(f.tensors) != 3+9*3 {
		t.Errorf("%d tensors", len(f.tensors))
	}

	// output rows: zero for special tokens, non-zero elsewhere
	out := f.values(t, f.tensor("output.weight"))
	row := func(i int) []float32 { return out[i*64 : (i+1)*64] }
	for _, id := range []int{UnkToken, BOSToken, EOSToken} {
		for _, v := range row(id) {
			if v != 0 {
				t.Fatalf("output row %d not zero", id)
			}
		}
	}
	var nz int
	for _, v := range row(300) {
		if v != 0 {
			nz++
		}
	}
	if nz < 60 {
		t.Errorf("output row 300 has %d non-zero values", nz)
	}
	// embedding: roughly unit variance
	emb := f.values(t, f.tensor("token_embd.weight"))
	var s2 float64
	for _, v := range emb {
		s2 += float64(v) * float64(v)
	}
	if std := math.Sqrt(s2 / float64(len(emb))); std < 0.9 || std > 1.1 {
		t.Errorf("embedding std %.3f", std)
	}
}

func TestMMProjFile(t *testing.T) {
	opt := DefaultOptions()
	_, p, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	f := readGGUF(t, p)
	checkLayout(t, f)
	wantKV(t, f, "general.architecture", "clip")
	wantKV(t, f, "clip.has_vision_encoder", true)
	wantKV(t, f, "clip.projector_type", "mlp")
	wantKV(t, f, "clip.vision.image_size", uint32(48))
	wantKV(t, f, "clip.vision.patch_size", uint32(4))
	wantKV(t, f, "clip.vision.embedding_length", uint32(32))
	wantKV(t, f, "clip.vision.feed_forward_length", uint32(64))
	wantKV(t, f, "clip.vision.projection_dim", uint32(64))
	wantKV(t, f, "clip.vision.block_count", uint32(3))
	wantKV(t, f, "clip.vision.attention.head_count", uint32(4))
	wantKV(t, f, "clip.vision.attention.layer_norm_epsilon", float32(1e-5))
	wantKV(t, f, "clip.vision.image_mean", clipImageMean)
	wantKV(t, f, "clip.vision.image_std", clipImageStd)

	wantDims(t, f, "v.patch_embd.weight", 4, 4, 3, 32)
	wantDims(t, f, "v.class_embd", 32)
	wantDims(t, f, "v.position_embd.weight", 32, 145)
	wantDims(t, f, "v.pre_ln.weight", 32)
	wantDims(t, f, "v.blk.2.ffn_up.weight", 32, 64)
	wantDims(t, f, "v.blk.2.ffn_down.weight", 64, 32)
	wantDims(t, f, "v.blk.0.attn_out.bias", 32)
	wantDims(t, f, "mm.0.weight", 32, 64)
	wantDims(t, f, "mm.0.bias", 64)
	wantDims(t, f, "mm.2.weight", 64, 64)
	wantDims(t, f, "mm.2.bias", 64)
	if f.tensor("v.post_ln.weight") != nil {
		t.Error("LLaVA's vision tower has no post layer norm")
	}
	if len(f.tensors) != 5+16*3+4 {
		t.Errorf("%d tensors", len(f.tensors))
	}
}

func TestF16SameValues(t *testing.T) {
	opt := DefaultOptions()
	m32, p32, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	opt.F16 = true
	m16, p16, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2]string{{m32, m16}, {p32, p16}} {
		a, b := readGGUF(t, pair[0]), readGGUF(t, pair[1])
		if b.kv["general.file_type"] != uint32(1) {
			t.Errorf("%s: file_type %v", pair[1], b.kv["general.file_type"])
		}
		var nf16 int
		for i := range a.tensors {
			ta, tb := &a.tensors[i], &b.tensors[i]
			if ta.name != tb.name || fmt.Sprint(ta.dims) != fmt.Sprint(tb.dims) {
				t.Fatalf("tensor %d: %s%v vs %s%v", i, ta.name, ta.dims, tb.name, tb.dims)
			}
			if len(ta.dims) == 1 && tb.typ != ggmlTypeF32 {
				t.Errorf("%s: vector stored as type %d", tb.name, tb.typ)
			}
			if tb.typ == ggmlTypeF16 {
				nf16++
			}
			va, vb := a.values(t, ta), b.values(t, tb)
			for j := range va {
				if va[j] != vb[j] {
					t.Fatalf("%s[%d]: f32 %v f16 %v", ta.name, j, va[j], vb[j])
				}
			}
		}
		if nf16 == 0 {
			t.Errorf("%s: no f16 tensors", pair[1])
		}
		if b.size >= a.size {
			t.Errorf("f16 file not smaller")
		}
	}
}

func TestImageTokens(t *testing.T) {
	for _, c := range []struct{ size, patch, want int }{
		{48, 4, 144}, {336, 14, 576}, {224, 14, 256}, {40, 4, 100}, {8, 8, 1},
	} {
		o := DefaultOptions()
		o.ImageSize, o.PatchSize = c.size, c.patch
		if got := o.ImageTokens(); got != c.want {
			t.Errorf("ImageTokens(%d/%d) = %d, want %d", c.size, c.patch, got, c.want)
		}
	}
	if got := DefaultOptions().ImageTokens(); got != 144 {
		t.Errorf("default ImageTokens = %d", got)
	}
}

func TestValidate(t *testing.T) {
	if err := DefaultOptions().validate(); err != nil {
		t.Fatal(err)
	}
	bad := []func(*Options){
		func(o *Options) { o.Heads = 3 },               // 64 % 3
		func(o *Options) { o.KVHeads = 3 },             // 4 % 3
		func(o *Options) { o.ImageSize = 50 },          // 50 % 4
		func(o *Options) { o.VisionFF = o.VisionEmbd }, // clip.cpp would swap up/down
		func(o *Options) { o.VisionLayers = 1 },
		func(o *Options) { o.Layers = 0 },
		func(o *Options) { o.Embd, o.Heads, o.KVHeads = 12, 4, 4 }, // odd head size
	}
	for i, f := range bad {
		o := DefaultOptions()
		f(&o)
		if _, _, err := Write(t.TempDir(), o); err == nil {
			t.Errorf("case %d: no error for %+v", i, o)
		}
	}
}

func TestTokenize(t *testing.T) {
	h := firstASCIIToken + int('H'-'!')
	i := firstASCIIToken + int('i'-'!')
	if got, want := fmt.Sprint(Tokenize("Hi", true)), fmt.Sprint([]int{BOSToken, spaceToken, h, i}); got != want {
		t.Errorf("Tokenize(Hi) = %v, want %v", got, want)
	}
	if got := Tokenize("", true); len(got) != 1 || got[0] != BOSToken {
		t.Errorf("Tokenize(\"\") = %v", got)
	}
	if got := Tokenize("\n", false); fmt.Sprint(got) != fmt.Sprint([]int{spaceToken, firstByteToken + '\n'}) {
		t.Errorf("Tokenize(newline) = %v", got)
	}
	for _, s := range []string{"Hello, world!", " two  spaces ", "tab\tnew\nline", "héllo — 日本語 🙂", "<s>x</s>", "~`|\\"} {
		toks := Tokenize(s, false)
		if got := Detokenize(toks); got != s {
			t.Errorf("round trip %q -> %v -> %q", s, toks, got)
		}
		if got := Detokenize(Tokenize(s, true)); got != " "+s {
			t.Errorf("with BOS: %q -> %q (llama.cpp keeps the space after BOS)", s, got)
		}
		n := 1 // the space prefix
		for _, r := range s {
			if r < 0x80 && (r == ' ' || r >= '!' && r <= '~') {
				n++
			} else {
				n += utf8.RuneLen(r)
			}
		}
		if len(toks) != n {
			t.Errorf("%q: %d tokens, want %d", s, len(toks), n)
		}
		for _, tok := range toks {
			if tok < firstByteToken || tok >= BaseVocabSize {
				t.Errorf("%q: token %d out of range", s, tok)
			}
		}
	}
	if !strings.Contains(ChatTemplate, "USER: ") || !strings.Contains(ChatTemplate, "ASSISTANT: ") || strings.Contains(ChatTemplate, "SYSTEM: ") {
		t.Error("chat template would not be detected as vicuna by llama.cpp")
	}
}

func TestVocabPadding(t *testing.T) {
	opt := DefaultOptions()
	opt.VocabSize = 1000
	m, _, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	f := readGGUF(t, m)
	toks := f.kv["tokenizer.ggml.tokens"].([]string)
	types := f.kv["tokenizer.ggml.token_type"].([]int32)
	if len(toks) != 1000 || toks[999] != "<unused645>" || types[999] != tokTypeUnused {
		t.Errorf("padding: %d tokens, last %q type %d", len(toks), toks[len(toks)-1], types[len(types)-1])
	}
	wantKV(t, f, "llama.vocab_size", uint32(1000))
	wantDims(t, f, "output.weight", 64, 1000)
	out := f.values(t, f.tensor("output.weight"))
	for _, v := range out[500*64 : 501*64] {
		if v != 0 {
			t.Fatal("unused token has a non-zero output row")
		}
	}
}

func TestF16Conversion(t *testing.T) {
	for h := range 1 << 16 {
		f := f16ToF32(uint16(h))
		if f != f { // NaN
			continue
		}
		if back := f32ToF16(f); back != uint16(h) {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
	}
	for _, c := range []struct {
		f float32
		h uint16
	}{{1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {1e6, 0x7c00}, {0.1, 0x2e66}, {1.0 / (1 << 24), 0x0001}, {1e-9, 0}} {
		if got := f32ToF16(c.f); got != c.h {
			t.Errorf("f32ToF16(%v) = %#04x, want %#04x", c.f, got, c.h)
		}
	}
}

// Chunked parallel generation gives the same bytes whatever GOMAXPROCS is.
func TestGenerateIndependentOfParallelism(t *testing.T) {
	ti := tensorInfo{name: "big", dims: []uint64{1000, 2600}, typ: ggmlTypeF16, fill: uniform(1)}
	ti.fill.rowScale = func(row uint64) float32 {
		if row%7 == 0 {
			return 0.5
		}
		return 1
	}
	gen := func(procs int) []byte {
		old := runtime.GOMAXPROCS(procs)
		defer runtime.GOMAXPROCS(old)
		var buf bytes.Buffer
		g := &ggufWriter{w: bufio.NewWriter(&buf)}
		if err := generate(g, &ti, 42); err != nil {
			t.Fatal(err)
		}
		g.w.Flush()
		return buf.Bytes()
	}
	a, b := gen(1), gen(4)
	if len(a) != 2*1000*2600 || !bytes.Equal(a, b) {
		t.Fatalf("parallel generation differs (%d vs %d bytes)", len(a), len(b))
	}
	// same as one sequential pass over the chunks
	seq := make([]byte, len(a))
	for c := uint64(0); c*chunkElems < ti.elements(); c++ {
		start := c * chunkElems
		n := min(chunkElems, ti.elements()-start)
		fillChunk(seq[2*start:2*(start+n)], &ti, 42, c, start, n)
	}
	if !bytes.Equal(a, seq) {
		t.Fatal("generate differs from sequential fill")
	}
}

func TestEnsure(t *testing.T) {
	t.Setenv("TMPDIR", t.TempDir())
	opt := DefaultOptions()
	var wg sync.WaitGroup
	paths := make([][2]string, 4)
	errs := make([]error, 4)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, p, err := Ensure(opt)
			paths[i], errs[i] = [2]string{m, p}, err
		}()
	}
	wg.Wait()
	for i := range paths {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if paths[i] != paths[0] {
			t.Errorf("Ensure gave %v and %v", paths[0], paths[i])
		}
	}
	if filepath.Dir(paths[0][0]) != opt.CacheDir() || !strings.HasPrefix(opt.CacheDir(), os.TempDir()) {
		t.Errorf("unexpected cache dir %s", filepath.Dir(paths[0][0]))
	}
	// nothing but the cache folder left in TMPDIR
	entries, _ := os.ReadDir(os.TempDir())
	if len(entries) != 1 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("TMPDIR holds %v", names)
	}
	want, _, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	x, _ := os.ReadFile(paths[0][0])
	y, _ := os.ReadFile(want)
	if !bytes.Equal(x, y) {
		t.Error("cached model differs from Write's")
	}
	// other options, other folder
	opt2 := opt
	opt2.Seed = 7
	if opt2.CacheDir() == opt.CacheDir() {
		t.Error("cache key ignores the seed")
	}
}

// The default files are pinned: if this fails after an intended change to the
// generated bytes, bump GeneratorVersion (so Ensure's caches are refreshed)
// and update the hashes.
func TestGolden(t *testing.T) {
	const version = 1
	if GeneratorVersion != version {
		t.Fatalf("GeneratorVersion is %d: update the hashes below and this constant", GeneratorVersion)
	}
	for _, c := range []struct {
		f16           bool
		model, mmproj string
	}{
		{false, "3d46c893236308ea60a9328fc84ae0c6ee81951c2d97b448c8a7d43949bd440b", "05d87921090b158382a3fe4957ff3f1f9fce0262568e5441b0ef7113ca95d073"},
		{true, "1074417a76f4369281dad98f55e3f8412c186deb1ac077ae1d4bd8f176fdae76", "e78f8634a2bca9adaac836f234b457ea6c75702c5a8c151b0aa9d76da2671c6e"},
	} {
		opt := DefaultOptions()
		opt.F16 = c.f16
		m, p, err := Write(t.TempDir(), opt)
		if err != nil {
			t.Fatal(err)
		}
		for _, pair := range [][2]string{{m, c.model}, {p, c.mmproj}} {
			b, _ := os.ReadFile(pair[0])
			if got := fmt.Sprintf("%x", sha256.Sum256(b)); got != pair[1] {
				t.Errorf("f16=%v %s: sha256 %s, want %s; if the change is intended, bump GeneratorVersion", c.f16, filepath.Base(pair[0]), got, pair[1])
			}
		}
	}
}
