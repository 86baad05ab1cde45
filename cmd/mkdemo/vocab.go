package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/elasticserve/elasticserve/internal/eval/shapes"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// `mkdemo vocab` writes internal/testmodel's word-level vocabulary as JSON for
// tools/demo-vlm/wordvocab.py (the trainer's tokenizer), and optionally golden
// tokenizations made by llama.cpp itself, which `wordvocab.py --check`
// compares with its own.

// vocabJSON is the vocabulary file: what model.gguf stores as
// tokenizer.ggml.* for Options{Vocab: testmodel.VocabWords} (LLaVA-1.5, no
// padding).
type vocabJSON struct {
	Model          string    `json:"model"` // tokenizer.ggml.model: "llama" (SentencePiece)
	BOS            int       `json:"bos_id"`
	EOS            int       `json:"eos_id"`
	Unk            int       `json:"unk_id"`
	AddBOS         bool      `json:"add_bos"`
	AddSpacePrefix bool      `json:"add_space_prefix"`
	Words          []string  `json:"words"` // the language words, each one token as "▁word" and "word"
	Pieces         []string  `json:"pieces"`
	Scores         []float32 `json:"scores"`
	Types          []int32   `json:"types"` // 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
}

func wordVocabJSON() vocabJSON {
	v := vocabJSON{Model: "llama", BOS: testmodel.BOSToken, EOS: testmodel.EOSToken, Unk: testmodel.UnkToken,
		AddBOS: true, AddSpacePrefix: true, Words: testmodel.LanguageWords()}
	for _, e := range testmodel.WordVocabulary() {
		v.Pieces = append(v.Pieces, e.Piece)
		v.Scores = append(v.Scores, e.Score)
		v.Types = append(v.Types, e.Type)
	}
	return v
}

// goldenText is one tokenization by llama.cpp (llama_tokenize, parse_special
// false; add_bos adds BOS and is the add_special flag).
type goldenText struct {
	Text   string        `json:"text"`
	AddBOS bool          `json:"add_bos"`
	IDs    []llama.Token `json:"ids"`
}

// goldenTexts are texts of the synthetic language (n samples of seed: their
// questions, answers and descriptions, chat prompts as the vicuna template
// renders them, the text after an image) and a few texts outside it.
func goldenTexts(m *llama.Model, seed int64, n int) ([]goldenText, error) {
	out := []goldenText{
		{Text: "What color is the circle?"},
		{Text: "Größe → 形 🙂, naïve café"},
		{Text: "circles Circle CIRCLE circ the3 there's theres"},
		{Text: "tab\tnew\nline\r\n  two  spaces "},
		{Text: "<s>x</s> <0x41> ▁literal"},
		{Text: "", AddBOS: true},
		{Text: "\x00\x7f ~`|\\{}"},
	}
	render := func(addBOS bool, msgs ...llama.ChatMessage) error {
		text, err := m.ApplyChatTemplate("", msgs, true)
		if err != nil {
			return err
		}
		out = append(out, goldenText{Text: text, AddBOS: addBOS})
		return nil
	}
	for _, s := range shapes.Generate(seed, n) {
		for _, qa := range s.QAs {
			out = append(out, goldenText{Text: qa.Question}, goldenText{Text: qa.Answer})
		}
		qa := s.QAs[1+s.Index%(len(s.QAs)-1)] // a short question
		if err := render(true, llama.ChatMessage{Role: "user", Content: qa.Question}); err != nil {
			return nil, err
		}
		if err := render(true, llama.ChatMessage{Role: "system", Content: "Answer in one word."},
			llama.ChatMessage{Role: "user", Content: qa.Question}); err != nil {
			return nil, err
		}
		last := &out[len(out)-1]
		last.Text += " " + qa.Answer
		// the text after the image when the question follows it
		out = append(out, goldenText{Text: "\n" + qa.Question + "\nASSISTANT:"})
	}
	for i := range out {
		ids, err := m.Tokenize(out[i].Text, out[i].AddBOS, false)
		if err != nil {
			return nil, err
		}
		out[i].IDs = append([]llama.Token{}, ids...)
	}
	return out, nil
}

// loadWordVocabModel writes a small random-weight model with the word
// vocabulary into dir and loads it.
func loadWordVocabModel(dir string) (*llama.Model, error) {
	opt := testmodel.DefaultOptions()
	opt.Vocab = testmodel.VocabWords
	path, _, err := testmodel.Write(dir, opt)
	if err != nil {
		return nil, err
	}
	return llama.LoadModel(path, llama.ModelParams{UseMmap: true})
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func vocabCmd(fs *flag.FlagSet, args []string) error {
	out := fs.String("out", "", "vocabulary JSON (required)")
	golden := fs.String("golden", "", "also write llama.cpp's tokenizations of sample texts to this JSON file")
	seed := fs.Int64("seed", 1, "shapes seed of the golden texts")
	n := fs.Int("n", 4, "shapes samples of the golden texts (13 texts each, after 7 fixed ones)")
	fs.Parse(args)
	if *out == "" || *n < 0 {
		return errors.New("vocab: --out is required; --n must be >= 0")
	}
	if err := writeJSON(*out, wordVocabJSON()); err != nil {
		return err
	}
	if *golden == "" {
		return nil
	}
	dir, err := os.MkdirTemp("", "mkdemo-vocab-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	llama.Init(llama.LogError)
	m, err := loadWordVocabModel(dir)
	if err != nil {
		return err
	}
	defer m.Close()
	texts, err := goldenTexts(m, *seed, *n)
	if err != nil {
		return fmt.Errorf("vocab: %w", err)
	}
	return writeJSON(*golden, texts)
}
