package testmodel

import (
	"container/heap"
	"fmt"
	"math/rand"
	"slices"
	"strconv"
	"strings"
)

// Word-level vocabulary.
//
// Options.Vocab = VocabWords writes a vocabulary in which every word of the
// synthetic language of internal/eval/shapes (and the chat template's "USER"
// and "ASSISTANT") is one token, as in real VLM tokenizers, instead of one
// token per character. It is still a standard SentencePiece ("llama")
// vocabulary with byte fallback:
//
//	0..353     the byte-level vocabulary (see vocab.go), unchanged: <unk>, <s>,
//	           </s>, the 256 byte tokens, "▁" and the printable ASCII characters
//	354..      the family's special tokens, if any (none for LLaVA-1.5)
//	then       the word pieces (NORMAL), see below
//	then       <unusedN> padding up to Options.VocabSize
//
// llama.cpp's SentencePiece tokenizer starts from single characters and keeps
// merging the adjacent pair whose concatenation is a vocabulary piece, best
// score first (leftmost on a tie). A whole word is reached only through pieces
// for every intermediate step, so the word pieces are the prefix chains of
// each word's two forms, "▁word" (after a space, or at the start of a text
// with the space prefix) and "word" (at the start of a line): "▁c", "▁ci",
// "▁cir", ..., "▁circle" and "ci", "cir", ..., "circle". Every piece is
// letters, optionally after one leading "▁", so
//   - no merge crosses a word boundary (no piece holds a "▁" after its first
//     character, nor any punctuation or control character), and
//   - a language word always ends as one token, whatever the merge order:
//     while the word is in several pieces, its first piece joined with the next
//     one is a prefix of the word, hence a piece, so merging goes on.
//
// Scores only order the merges: a piece of n characters scores 2n-100, plus 1
// when it is a whole word, so that the longest piece grows first and, on a tie,
// the leftmost -- a word is built left to right from its "▁x" start. (The
// scores are small integers, exact in float32 and float64 alike, so other
// implementations compare them identically.)
//
// The word list is frozen (a trained model depends on the ids): new words go
// at the end of languageWords.

// VocabWords is the Options.Vocab value that selects the word-level vocabulary.
const VocabWords = "words"

// languageWords are the words of internal/eval/shapes's questions, answers and
// descriptions, and the chat template's turn names. Do not reorder.
var languageWords = []string{
	// chat template (vicuna): "USER: ...\nASSISTANT:"
	"USER", "ASSISTANT",
	// questions: "Describe the image." "What color is the circle?" "How many
	// shapes are there?" "Where is the circle?" "Is there a red circle?"
	"Describe", "the", "image", "What", "color", "is", "How", "many", "shapes", "are", "there",
	"Where", "Is", "a", "an",
	// shape kinds
	"circle", "square", "triangle", "diamond", "cross",
	// colors
	"red", "green", "blue", "yellow", "orange", "purple", "black", "gray",
	// counts, positions, yes/no
	"one", "two", "three", "four",
	"top", "bottom", "left", "right", "center",
	"yes", "no",
	// descriptions: "There are two shapes in the image. A large red circle is
	// at the top left. A small blue square is on the right." "... in the center."
	"There", "shape", "in", "A", "small", "large", "at", "on",
}

// LanguageWords returns the words the word-level vocabulary holds as single
// tokens (each in both forms, "▁word" and "word"), in vocabulary order.
func LanguageWords() []string { return slices.Clone(languageWords) }

// VocabEntry is one token of a vocabulary: its piece (SentencePiece text,
// "▁" for a space), score and llama.cpp token type (1 normal, 2 unknown,
// 3 control, 5 unused, 6 byte).
type VocabEntry struct {
	Piece string  `json:"piece"`
	Score float32 `json:"score"`
	Type  int32   `json:"type"`
}

// Token types of VocabEntry.Type (tokenizer.ggml.token_type).
const (
	TokenTypeNormal  = tokTypeNormal
	TokenTypeUnknown = tokTypeUnknown
	TokenTypeControl = tokTypeControl
	TokenTypeUnused  = tokTypeUnused
	TokenTypeByte    = tokTypeByte
)

// wordPieces returns the word pieces in id order, after the base vocabulary.
func wordPieces() []VocabEntry {
	whole := map[string]bool{}
	for _, w := range languageWords {
		whole[spaceMarker+w] = true
		whole[w] = true
	}
	seen := map[string]bool{}
	var out []VocabEntry
	addChain := func(form string) {
		runes := []rune(form)
		for n := 2; n <= len(runes); n++ {
			p := string(runes[:n])
			if seen[p] {
				continue
			}
			seen[p] = true
			score := float32(2*n - 100)
			if whole[p] {
				score++
			}
			out = append(out, VocabEntry{Piece: p, Score: score, Type: tokTypeNormal})
		}
	}
	for _, w := range languageWords {
		addChain(spaceMarker + w)
		addChain(w)
	}
	return out
}

// WordVocabulary returns the word-level vocabulary as Options{Vocab:
// VocabWords} writes it for LLaVA-1.5 without padding: the BaseVocabSize
// entries of the byte-level vocabulary (same ids, pieces, scores and types),
// then the word pieces.
func WordVocabulary() []VocabEntry {
	return entriesOf(buildVocab(0, nil), wordPieces())
}

func entriesOf(v vocab, extra []VocabEntry) []VocabEntry {
	out := make([]VocabEntry, 0, len(v.tokens)+len(extra))
	for i := range v.tokens {
		out = append(out, VocabEntry{Piece: v.tokens[i], Score: v.scores[i], Type: v.types[i]})
	}
	return append(out, extra...)
}

// Vocabulary returns the vocabulary written for o (tokenizer.ggml.tokens,
// scores and token_type), family tokens and padding included; o.Arch must be
// a known family.
func (o Options) Vocabulary() []VocabEntry {
	v := o.buildVocab(o.family().Special)
	return entriesOf(v, nil)
}

// buildVocab is buildVocab(o.VocabSize, special) with the word pieces of
// Options.Vocab after the family's special tokens and before the padding.
func (o Options) buildVocab(special []string) vocab {
	if o.Vocab != VocabWords {
		return buildVocab(o.VocabSize, special)
	}
	v := buildVocab(0, special)
	for _, e := range wordPieces() {
		v.tokens = append(v.tokens, e.Piece)
		v.scores = append(v.scores, e.Score)
		v.types = append(v.types, e.Type)
	}
	for i := 0; len(v.tokens) < o.VocabSize; i++ {
		v.tokens = append(v.tokens, fmt.Sprintf("<unused%d>", i))
		v.scores = append(v.scores, 0)
		v.types = append(v.types, tokTypeUnused)
	}
	return v
}

// wordVocabExtra is the number of tokens Options.Vocab adds to the base
// vocabulary.
func (o Options) wordVocabExtra() int {
	if o.Vocab != VocabWords {
		return 0
	}
	return len(wordPieces())
}

func (o Options) validateVocab(check func(bool, string, ...any)) {
	check(o.Vocab == "" || o.Vocab == VocabWords, "vocab %q: want \"\" (byte-level) or %q", o.Vocab, VocabWords)
}

// Tokenizer reproduces llama.cpp's tokenizer (llama_tokenize with
// parse_special=false) and detokenizer (llama_detokenize with
// remove_special=true, unparse_special=false) for a SentencePiece vocabulary
// written by this package: BOS 1, add_space_prefix, byte fallback.
type Tokenizer struct {
	entries []VocabEntry
	ids     map[string]int
	byteTok [256]int
}

// NewTokenizer returns a tokenizer for entries (e.g. WordVocabulary() or
// Options.Vocabulary()). Every byte must have its <0xNN> token.
func NewTokenizer(entries []VocabEntry) (*Tokenizer, error) {
	t := &Tokenizer{entries: entries, ids: make(map[string]int, len(entries))}
	for i, e := range entries {
		t.ids[e.Piece] = i // a later duplicate wins, as in llama.cpp
	}
	for b := range 256 {
		id, ok := t.ids[fmt.Sprintf("<0x%02X>", b)]
		if !ok {
			return nil, fmt.Errorf("testmodel: vocabulary has no token for byte 0x%02X", b)
		}
		t.byteTok[b] = id
	}
	if len(entries) <= BOSToken || entries[BOSToken].Piece != "<s>" {
		return nil, fmt.Errorf("testmodel: token %d is not <s>", BOSToken)
	}
	return t, nil
}

// Len is the vocabulary size.
func (t *Tokenizer) Len() int { return len(t.entries) }

// Piece is the vocabulary text of token id ("" when out of range).
func (t *Tokenizer) Piece(id int) string {
	if id < 0 || id >= len(t.entries) {
		return ""
	}
	return t.entries[id].Piece
}

// ID returns the token whose piece is p.
func (t *Tokenizer) ID(p string) (int, bool) {
	id, ok := t.ids[p]
	return id, ok
}

// Tokenize returns the tokens of text: an optional BOS, then the text with a
// space prefix and spaces written as "▁", split into characters (by UTF-8
// lead byte, as llama.cpp does) and merged into vocabulary pieces; characters
// that are no piece become byte tokens. An empty text gives only the BOS.
func (t *Tokenizer) Tokenize(text string, addBOS bool) []int {
	var out []int
	if addBOS {
		out = append(out, BOSToken)
	}
	if text == "" {
		return out
	}
	return t.merge(strings.ReplaceAll(" "+text, " ", spaceMarker), out)
}

// symbol is a run of the text: [start, start+n); n == 0 once merged away.
type symbol struct{ start, n, prev, next int }

// pair is a candidate merge of two adjacent symbols.
type pair struct {
	left, right int
	score       float32
	size        int // bytes of the merged text when the pair was queued
}

// pairQueue pops the best score first, the leftmost on a tie.
type pairQueue []pair

func (q pairQueue) Len() int { return len(q) }
func (q pairQueue) Less(i, j int) bool {
	return q[i].score > q[j].score || q[i].score == q[j].score && q[i].left < q[j].left
}
func (q pairQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *pairQueue) Push(x any)   { *q = append(*q, x.(pair)) }
func (q *pairQueue) Pop() any {
	old := *q
	x := old[len(old)-1]
	*q = old[:len(old)-1]
	return x
}

func (t *Tokenizer) merge(s string, out []int) []int {
	var syms []symbol
	for off := 0; off < len(s); {
		n := min(utf8LenLlama(s[off]), len(s)-off)
		syms = append(syms, symbol{start: off, n: n, prev: len(syms) - 1, next: len(syms) + 1})
		off += n
	}
	syms[len(syms)-1].next = -1

	var q pairQueue
	try := func(l, r int) {
		if l < 0 || r < 0 {
			return
		}
		size := syms[l].n + syms[r].n
		id, ok := t.ids[s[syms[l].start:syms[l].start+size]]
		if !ok {
			return
		}
		heap.Push(&q, pair{left: l, right: r, score: t.entries[id].Score, size: size})
	}
	for i := 1; i < len(syms); i++ {
		try(i-1, i)
	}
	for q.Len() > 0 {
		p := heap.Pop(&q).(pair)
		l, r := &syms[p.left], &syms[p.right]
		if l.n == 0 || r.n == 0 || l.n+r.n != p.size {
			continue // stale: one side has changed since
		}
		l.n += r.n
		r.n = 0
		l.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = p.left
		}
		try(l.prev, p.left)
		try(p.left, l.next)
	}
	for i := 0; i >= 0; i = syms[i].next {
		text := s[syms[i].start : syms[i].start+syms[i].n]
		if id, ok := t.ids[text]; ok {
			out = append(out, id)
			continue
		}
		// only single characters can be missing (merges make pieces)
		for j := 0; j < len(text); j++ {
			out = append(out, t.byteTok[text[j]])
		}
	}
	return out
}

// Detokenize returns the text of tokens: normal pieces with "▁" as a space,
// byte tokens as their byte, nothing for the other types. The first token's
// leading space (the space prefix) is dropped, unless the tokens start with
// BOS, which is dropped itself.
func (t *Tokenizer) Detokenize(tokens []int) string {
	var b strings.Builder
	strip := true
	if len(tokens) > 0 && tokens[0] == BOSToken {
		tokens = tokens[1:]
		strip = false
	}
	for i, id := range tokens {
		var piece string
		if id >= 0 && id < len(t.entries) {
			switch e := t.entries[id]; e.Type {
			case tokTypeNormal:
				piece = strings.ReplaceAll(e.Piece, spaceMarker, " ")
			case tokTypeByte:
				if v, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(e.Piece, "<0x"), ">"), 16, 8); err == nil {
					piece = string([]byte{byte(v)})
				}
			}
		}
		if i == 0 && strip {
			piece = strings.TrimPrefix(piece, " ")
		}
		b.WriteString(piece)
	}
	return b.String()
}

// MixedTexts are n random texts (from seed) that mix the language's words, their
// prefixes, ASCII, whitespace and non-ASCII characters: inputs on which a
// tokenizer of the word vocabulary must round-trip and agree with llama.cpp.
func MixedTexts(seed int64, n int) []string {
	words := LanguageWords()
	extra := []string{"é", "日本", "🙂", "—", "\n", "\t", "  ", "?", ".", ",", "'", "0", "42", "xyz", "Q", "e", "ñ"}
	r := rand.New(rand.NewSource(seed))
	out := make([]string, 0, n)
	for range n {
		var b strings.Builder
		for k := r.Intn(12); k >= 0; k-- {
			switch r.Intn(4) {
			case 0, 1:
				b.WriteString(words[r.Intn(len(words))])
			case 2:
				b.WriteString(extra[r.Intn(len(extra))])
			default:
				w := words[r.Intn(len(words))]
				b.WriteString(w[:1+r.Intn(len(w))]) // a prefix of a word
			}
			if r.Intn(3) > 0 {
				b.WriteByte(' ')
			}
		}
		out = append(out, b.String())
	}
	return out
}
