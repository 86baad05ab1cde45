package testmodel

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

// shapesWords returns every word internal/eval/shapes's questions, answers and
// descriptions produce (over n samples and the package's word lists).
func shapesWords(n int) map[string]bool {
	words := map[string]bool{}
	add := func(s string) {
		for _, w := range regexp.MustCompile(`[A-Za-z]+`).FindAllString(s, -1) {
			words[w] = true
		}
	}
	for _, s := range shapes.Generate(1, n) {
		for _, qa := range s.QAs {
			add(qa.Question)
			add(qa.Answer)
		}
	}
	for _, k := range shapes.Kinds {
		add(string(k))
	}
	for _, c := range shapes.Colors {
		add(c.Name)
	}
	for _, row := range shapes.Positions {
		for _, p := range row {
			add(p)
		}
	}
	add(string(shapes.Small) + " " + string(shapes.Large))
	return words
}

// languageTexts are questions, answers and descriptions of n samples.
func languageTexts(n int) []string {
	var out []string
	for _, s := range shapes.Generate(7, n) {
		for _, qa := range s.QAs {
			out = append(out, qa.Question, qa.Answer)
		}
	}
	return out
}

// wordPieceRe splits a space-escaped language text into the pieces it must
// become: a word with its "▁" when a space precedes it, any other character
// alone.
var wordPieceRe = regexp.MustCompile(`(?s)` + spaceMarker + `?[A-Za-z]+|.`)

// wantPieces is the word-for-word tokenization of a language text (with the
// space prefix), newlines as their byte token.
func wantPieces(text string) []string {
	var out []string
	for _, p := range wordPieceRe.FindAllString(strings.ReplaceAll(" "+text, " ", spaceMarker), -1) {
		if p == "\n" {
			p = "<0x0A>"
		}
		out = append(out, p)
	}
	return out
}

func piecesOf(tk *Tokenizer, ids []int) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = tk.Piece(id)
	}
	return out
}

func wordTokenizer(t *testing.T) *Tokenizer {
	t.Helper()
	tk, err := NewTokenizer(WordVocabulary())
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

// The word list is exactly the words the synthetic language produces, plus
// the chat template's turn names.
func TestLanguageWordsCoverShapes(t *testing.T) {
	got := shapesWords(3000)
	want := map[string]bool{}
	for _, w := range LanguageWords() {
		if w != "USER" && w != "ASSISTANT" {
			want[w] = true
		}
	}
	for w := range got {
		if !want[w] {
			t.Errorf("shapes produces %q, which is not in the word list", w)
		}
	}
	for w := range want {
		if !got[w] {
			t.Errorf("word %q is not produced by shapes", w)
		}
	}
}

func TestWordVocabularyLayout(t *testing.T) {
	voc := WordVocabulary()
	base := entriesOf(buildVocab(0, nil), nil)
	if len(base) != BaseVocabSize || !slices.Equal(voc[:BaseVocabSize], base) {
		t.Fatal("the first BaseVocabSize entries differ from the byte-level vocabulary")
	}
	seen := map[string]bool{}
	for i, e := range voc {
		if seen[e.Piece] {
			t.Errorf("piece %q (id %d) twice", e.Piece, i)
		}
		seen[e.Piece] = true
		if i < BaseVocabSize {
			continue
		}
		p := strings.TrimPrefix(e.Piece, spaceMarker)
		if e.Type != TokenTypeNormal || utf8.RuneCountInString(e.Piece) < 2 || strings.Trim(p, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") != "" {
			t.Errorf("id %d: piece %q type %d: want letters after at most one ▁, 2 or more characters, normal", i, e.Piece, e.Type)
		}
		if e.Score != float32(int(e.Score)) || e.Score >= 0 {
			t.Errorf("id %d: score %v is not a negative integer", i, e.Score)
		}
	}
	// every prefix of every form is a piece (the merge chain)
	for _, w := range LanguageWords() {
		for _, form := range []string{spaceMarker + w, w} {
			r := []rune(form)
			for n := 2; n <= len(r); n++ {
				if !seen[string(r[:n])] {
					t.Errorf("%q: prefix %q missing", form, string(r[:n]))
				}
			}
		}
	}
	opt := DefaultOptions()
	opt.Vocab = VocabWords
	if !slices.Equal(opt.Vocabulary(), voc) || opt.NVocab() != len(voc) {
		t.Errorf("Options.Vocabulary: %d entries, NVocab %d, want %d", len(opt.Vocabulary()), opt.NVocab(), len(voc))
	}
	if !slices.Equal(DefaultOptions().Vocabulary(), base) {
		t.Error("default Options.Vocabulary is not the byte-level vocabulary")
	}
	opt.VocabSize = len(voc) + 10
	if v := opt.Vocabulary(); len(v) != opt.VocabSize || !slices.Equal(v[:len(voc)], voc) || v[len(v)-1].Piece != "<unused9>" || opt.NVocab() != len(v) {
		t.Errorf("padding: %d entries, last %+v", len(v), v[len(v)-1])
	}
}

// The GGUF holds the word vocabulary; word tokens get output rows, and the
// option only changes the cache key when set.
func TestWordVocabFile(t *testing.T) {
	opt := DefaultOptions()
	opt.Vocab = VocabWords
	m, _, err := Write(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	f := readGGUF(t, m)
	voc := WordVocabulary()
	toks := f.kv["tokenizer.ggml.tokens"].([]string)
	scores := f.kv["tokenizer.ggml.scores"].([]float32)
	types := f.kv["tokenizer.ggml.token_type"].([]int32)
	if len(toks) != len(voc) || len(scores) != len(voc) || len(types) != len(voc) {
		t.Fatalf("%d tokens, want %d", len(toks), len(voc))
	}
	for i, e := range voc {
		if toks[i] != e.Piece || scores[i] != e.Score || types[i] != e.Type {
			t.Fatalf("token %d: %q %v %d, want %+v", i, toks[i], scores[i], types[i], e)
		}
	}
	wantKV(t, f, "llama.vocab_size", uint32(len(voc)))
	wantKV(t, f, "tokenizer.ggml.model", "llama")
	wantDims(t, f, "token_embd.weight", 64, uint64(len(voc)))
	wantDims(t, f, "output.weight", 64, uint64(len(voc)))
	out := f.values(t, f.tensor("output.weight"))
	last := out[(len(voc)-1)*64 : len(voc)*64]
	if !slices.ContainsFunc(last, func(v float32) bool { return v != 0 }) {
		t.Error("a word token has an all-zero output row")
	}
	specs, err := TensorSpecs(opt)
	if err != nil || specs[0].Dims[1] != uint64(len(voc)) {
		t.Errorf("TensorSpecs: %v %v", err, specs[0].Dims)
	}

	// cache keys of options without the field are those from before it
	smol, _ := FamilyOptions(ArchSmolVLM)
	padded := DefaultOptions()
	padded.VocabSize = 500
	for _, c := range []struct {
		opt  Options
		want string
	}{{DefaultOptions(), "b8f5bf8cacc295fa"}, {smol, "62a0ce27289e86c4"}, {padded, "e53d0d1d7e2afe10"}} {
		if got := c.opt.CacheKey(); got != c.want {
			t.Errorf("CacheKey %s, want %s", got, c.want)
		}
	}
	if opt.CacheKey() == DefaultOptions().CacheKey() {
		t.Error("Vocab is not part of the cache key")
	}
	bad := DefaultOptions()
	bad.Vocab = "bpe"
	if _, _, err := Write(t.TempDir(), bad); err == nil {
		t.Error("unknown Vocab accepted")
	}
	// with a family's special tokens, those keep their ids
	smol.Vocab = VocabWords
	v := smol.Vocabulary()
	sp := smol.SpecialToken("<|im_start|>")
	if first := BaseVocabSize + len(smol.family().Special); v[sp].Piece != "<|im_start|>" || !slices.Equal(v[first:], wordPieces()) {
		t.Errorf("smolvlm with words: token %d is %q; word pieces from %d: %v", sp, v[sp].Piece, first, slices.Equal(v[first:], wordPieces()))
	}
}

// The Go tokenizer (checked against llama.cpp in cmd/mkdemo) gives the
// language word for word.
func TestWordTokenizer(t *testing.T) {
	tk := wordTokenizer(t)
	for _, w := range LanguageWords() {
		if got := piecesOf(tk, tk.Tokenize(w, false)); !slices.Equal(got, []string{spaceMarker + w}) {
			t.Errorf("%q -> %q", w, got)
		}
		if got := piecesOf(tk, tk.Tokenize("\n"+w+"\n", false)); !slices.Equal(got, []string{spaceMarker, "<0x0A>", w, "<0x0A>"}) {
			t.Errorf("line %q -> %q", w, got)
		}
	}
	prompt := "USER: What color is the circle?\nASSISTANT:"
	ids := tk.Tokenize(prompt, true)
	want := append([]string{"<s>"}, wantPieces(prompt)...)
	if got := piecesOf(tk, ids); !slices.Equal(got, want) || len(ids) > 24 {
		t.Errorf("prompt -> %q, want %q (at most 24)", got, want)
	}
	for _, s := range languageTexts(200) {
		if got := piecesOf(tk, tk.Tokenize(s, false)); !slices.Equal(got, wantPieces(s)) {
			t.Errorf("%q -> %q, want %q", s, got, wantPieces(s))
		}
	}
	for _, s := range roundTripTexts(300) {
		ids := tk.Tokenize(s, false)
		if got := tk.Detokenize(ids); got != s {
			t.Errorf("round trip %q -> %v -> %q", s, ids, got)
		}
		if got := tk.Detokenize(tk.Tokenize(s, true)); got != " "+s && s != "" {
			t.Errorf("with BOS: %q -> %q", s, got)
		}
	}
}

// On the byte-level vocabulary, the general tokenizer gives what the
// byte-level Tokenize (pinned against llama.cpp in package llama) gives.
func TestTokenizerMatchesByteLevel(t *testing.T) {
	tk, err := NewTokenizer(DefaultOptions().Vocabulary())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range append(roundTripTexts(200), "\xff abc", "a\xc3", "\xe2\x96 x") {
		for _, bos := range []bool{false, true} {
			if got, want := tk.Tokenize(s, bos), Tokenize(s, bos); !slices.Equal(got, want) {
				t.Errorf("%q: %v, want %v", s, got, want)
			}
		}
		if got, want := tk.Detokenize(Tokenize(s, false)), Detokenize(Tokenize(s, false)); got != want {
			t.Errorf("detokenize %q: %q, want %q", s, got, want)
		}
	}
}

// roundTripTexts are n pseudo-random valid UTF-8 texts mixing language words,
// near-words, ASCII, whitespace and non-ASCII characters (no "▁", which comes
// back as a space), after a few fixed ones.
func roundTripTexts(n int) []string {
	out := []string{
		"", " ", "  two  spaces ", "tab\tnew\nline\r\n", "héllo — 日本語 🙂", "Größe der Kreise: 3½",
		"circles Circle CIRCLE circ cir c", "redgreen the3 The there's", "<s>x</s> <0x41>",
		"USER:ASSISTANT: USERS", "an orange triangleish diamonds", "\x00\x01\x7f",
	}
	return append(out, MixedTexts(5, n)...)
}

func Example_wordVocabulary() {
	tk, _ := NewTokenizer(WordVocabulary())
	ids := tk.Tokenize("USER: What color is the circle?\nASSISTANT:", true)
	fmt.Println(len(ids), strings.Join(piecesOf(tk, ids), " "))
	// Output: 12 <s> ▁USER : ▁What ▁color ▁is ▁the ▁circle ? <0x0A> ASSISTANT :
}
