package main

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/elasticserve/elasticserve/internal/eval/shapes"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// The word-level vocabulary as llama.cpp loads it: one model for the tests.
var (
	wordOnce  sync.Once
	wordModel *llama.Model
	wordErr   error
)

func wordVocabModel(t *testing.T) (*llama.Model, *testmodel.Tokenizer) {
	t.Helper()
	wordOnce.Do(func() {
		llama.Init(llama.LogError)
		dir, err := os.MkdirTemp("", "mkdemo-wordvocab-")
		if err != nil {
			wordErr = err
			return
		}
		// the loaded model is kept for the whole test binary; the folder can go
		wordModel, wordErr = loadWordVocabModel(dir)
		os.RemoveAll(dir)
	})
	if wordErr != nil {
		t.Fatal(wordErr)
	}
	tk, err := testmodel.NewTokenizer(testmodel.WordVocabulary())
	if err != nil {
		t.Fatal(err)
	}
	return wordModel, tk
}

func llamaTokens(t *testing.T, m *llama.Model, text string, addBOS, parseSpecial bool) []int {
	t.Helper()
	toks, err := m.Tokenize(text, addBOS, parseSpecial)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]int, len(toks))
	for i, tok := range toks {
		out[i] = int(tok)
	}
	return out
}

func llamaText(m *llama.Model, ids []int) string {
	toks := make([]llama.Token, len(ids))
	for i, id := range ids {
		toks[i] = llama.Token(id)
	}
	return m.Detokenize(toks, true, false)
}

func piecesOf(tk *testmodel.Tokenizer, ids []int) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = tk.Piece(id)
	}
	return out
}

// wantWordPieces is the word-for-word tokenization of a language text: each
// word one piece ("▁word" after a space or at the start, "word" after a
// newline), every other character alone (a newline as its byte token).
func wantWordPieces(text string) []string {
	re := regexp.MustCompile(`(?s)▁?[A-Za-z]+|.`)
	var out []string
	for _, p := range re.FindAllString(strings.ReplaceAll(" "+text, " ", "▁"), -1) {
		if p == "\n" {
			p = "<0x0A>"
		}
		out = append(out, p)
	}
	return out
}

// Every word of the language is one token, in both of its forms and in
// context, as llama.cpp tokenizes it.
func TestWordVocabWordsAreTokens(t *testing.T) {
	m, tk := wordVocabModel(t)
	if n := m.Info().VocabSize; n != tk.Len() {
		t.Fatalf("llama.cpp loaded %d tokens, want %d", n, tk.Len())
	}
	for _, w := range testmodel.LanguageWords() {
		for _, c := range []struct {
			text string
			want []string
		}{
			{w, []string{"▁" + w}},
			{"\n" + w, []string{"▁", "<0x0A>", w}},
			{"Is there " + w + "?", wantWordPieces("Is there " + w + "?")},
			{"the " + w + ".\n" + w + " " + w, wantWordPieces("the " + w + ".\n" + w + " " + w)},
		} {
			if got := piecesOf(tk, llamaTokens(t, m, c.text, false, false)); !slices.Equal(got, c.want) {
				t.Errorf("%q -> %q, want %q", c.text, got, c.want)
			}
		}
	}
}

// The README question through the vicuna template costs at most 24 tokens.
func TestWordVocabChatPrompt(t *testing.T) {
	m, tk := wordVocabModel(t)
	text, err := m.ApplyChatTemplate("", []llama.ChatMessage{{Role: "user", Content: "What color is the circle?"}}, true)
	if err != nil {
		t.Fatal(err)
	}
	if text != "USER: What color is the circle?\nASSISTANT:" {
		t.Fatalf("template renders %q", text)
	}
	ids := llamaTokens(t, m, text, true, true)
	want := append([]string{"<s>"}, wantWordPieces(text)...)
	if got := piecesOf(tk, ids); len(ids) > 24 || !slices.Equal(got, want) {
		t.Errorf("%d prompt tokens %q, want at most 24: %q", len(ids), got, want)
	}
	if got := tk.Tokenize(text, true); !slices.Equal(got, ids) {
		t.Errorf("Go tokenizer %v, llama.cpp %v", got, ids)
	}
}

// Sentences of the language tokenize word for word, the same in llama.cpp and
// in the Go tokenizer.
func TestWordVocabSentences(t *testing.T) {
	m, tk := wordVocabModel(t)
	for _, s := range shapes.Generate(11, 150) {
		for _, qa := range s.QAs {
			for _, text := range []string{qa.Question, qa.Answer, "USER: " + qa.Question + "\nASSISTANT: " + qa.Answer} {
				ids := llamaTokens(t, m, text, false, false)
				if got := piecesOf(tk, ids); !slices.Equal(got, wantWordPieces(text)) {
					t.Fatalf("%q -> %q, want %q", text, got, wantWordPieces(text))
				}
				if got := tk.Tokenize(text, false); !slices.Equal(got, ids) {
					t.Fatalf("%q: Go tokenizer %v, llama.cpp %v", text, got, ids)
				}
			}
		}
	}
}

// Any text survives tokenize + detokenize (byte fallback for what is no
// piece), and the Go tokenizer agrees with llama.cpp both ways.
func TestWordVocabRoundTrip(t *testing.T) {
	m, tk := wordVocabModel(t)
	texts := []string{
		"", " ", "  two  spaces ", "tab\tnew\nline\r\n", "héllo — 日本語 🙂", "Größe der Kreise: 3½ → ∞",
		"circles Circle CIRCLE circ cir c", "redgreen the3 The there's", "<s>x</s> <0x41> [INST]",
		"USER:ASSISTANT: USERS", "an orange triangleish diamonds", "\x00\x01\x7f", "Привет, мир", "ﬁ 𝔸",
	}
	texts = append(texts, testmodel.MixedTexts(9, 400)...)
	for _, s := range texts {
		for _, bos := range []bool{false, true} {
			ids := llamaTokens(t, m, s, bos, false)
			if got := tk.Tokenize(s, bos); !slices.Equal(got, ids) {
				t.Errorf("%q (bos %v): Go tokenizer %q, llama.cpp %q", s, bos, piecesOf(tk, got), piecesOf(tk, ids))
			}
			want := s
			if bos && s != "" {
				want = " " + s // llama.cpp keeps the space prefix after BOS
			}
			if got := llamaText(m, ids); got != want {
				t.Errorf("round trip %q (bos %v) -> %q -> %q", s, bos, piecesOf(tk, ids), got)
			}
			if got := tk.Detokenize(ids); got != want {
				t.Errorf("Go detokenize %q (bos %v) -> %q", s, bos, got)
			}
		}
	}
}

// `mkdemo vocab` writes the vocabulary and llama.cpp's tokenizations, which
// the Go tokenizer reproduces.
func TestVocabCmd(t *testing.T) {
	_, tk := wordVocabModel(t) // llama.Init
	dir := t.TempDir()
	vp, gp := filepath.Join(dir, "vocab.json"), filepath.Join(dir, "golden.json")
	if err := vocabCmd(flag.NewFlagSet("vocab", flag.ContinueOnError), []string{"--out", vp, "--golden", gp}); err != nil {
		t.Fatal(err)
	}
	var v vocabJSON
	var golden []goldenText
	for path, dst := range map[string]any{vp: &v, gp: &golden} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, dst); err != nil {
			t.Fatal(err)
		}
	}
	voc := testmodel.WordVocabulary()
	if len(v.Pieces) != len(voc) || len(v.Scores) != len(voc) || len(v.Types) != len(voc) || v.Model != "llama" || v.BOS != 1 {
		t.Fatalf("vocab.json: %d pieces, want %d", len(v.Pieces), len(voc))
	}
	for i, e := range voc {
		if v.Pieces[i] != e.Piece || v.Scores[i] != e.Score || v.Types[i] != e.Type {
			t.Fatalf("vocab.json entry %d: %q %v %d, want %+v", i, v.Pieces[i], v.Scores[i], v.Types[i], e)
		}
	}
	if len(golden) < 50 {
		t.Errorf("%d golden texts, want at least 50", len(golden))
	}
	for _, g := range golden {
		want := make([]int, len(g.IDs))
		for i, id := range g.IDs {
			want[i] = int(id)
		}
		if got := tk.Tokenize(g.Text, g.AddBOS); !slices.Equal(got, want) {
			t.Errorf("golden %q: Go tokenizer %v, llama.cpp %v", g.Text, got, want)
		}
	}
}
