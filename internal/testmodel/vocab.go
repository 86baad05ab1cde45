package testmodel

import (
	"fmt"
	"strings"
)

// Vocabulary: a SentencePiece ("llama") vocabulary with byte fallback.
//
//	0        <unk>        UNKNOWN
//	1        <s>          CONTROL  (BOS)
//	2        </s>         CONTROL  (EOS)
//	3..258   <0x00>..<0xFF> BYTE
//	259      ▁ (space)    NORMAL
//	260..353 '!'..'~'     NORMAL   (printable ASCII, one piece per character)
//	354..    <unused%d>   UNUSED   (only when Options.VocabSize asks for more)
//
// There are no multi-character pieces, so the SentencePiece merge step never
// fires: printable ASCII text becomes one token per character, everything else
// (newlines, tabs, non-ASCII UTF-8) one byte token per byte.
const (
	UnkToken = 0
	BOSToken = 1
	EOSToken = 2

	firstByteToken  = 3
	spaceToken      = firstByteToken + 256 // "▁"
	firstASCIIToken = spaceToken + 1       // '!'
	// BaseVocabSize is the number of tokens in the vocabulary before padding.
	BaseVocabSize = firstASCIIToken + ('~' - '!' + 1)
)

// llama.cpp token types (tokenizer.ggml.token_type).
const (
	tokTypeNormal  int32 = 1
	tokTypeUnknown int32 = 2
	tokTypeControl int32 = 3
	tokTypeUnused  int32 = 5
	tokTypeByte    int32 = 6
)

const spaceMarker = "\u2581" // SentencePiece's "▁"

// ChatTemplate is the Jinja chat template stored in tokenizer.chat_template.
// It renders like Vicuna 1.1 / LLaVA-1.5:
//
//	{system}\n\nUSER: {user}\nASSISTANT: {assistant}</s>\nUSER: ...\nASSISTANT:
//
// llama.cpp's llama_chat_apply_template (src/llama-chat.cpp, substring based
// detection, no Jinja engine) recognises it as the built-in "vicuna" template:
// it contains "USER: " and "ASSISTANT: ", does not contain "SYSTEM: " (that
// would select "vicuna-orca") and none of the markers tested before those
// (<|im_start|>, [INST], <|user|>, <|assistant|>, <start_of_turn>, ...). The
// built-in renderer produces exactly the same text as this template.
const ChatTemplate = "{% for message in messages %}" +
	"{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}" +
	"{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\\n' }}" +
	"{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}" +
	"{% endif %}{% endfor %}" +
	"{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"

// ChatTemplateName is the llama.cpp built-in template ChatTemplate maps to.
const ChatTemplateName = "vicuna"

type vocab struct {
	tokens []string
	scores []float32
	types  []int32
}

func buildVocab(size int, special []string) vocab {
	if size < BaseVocabSize {
		size = BaseVocabSize
	}
	v := vocab{
		tokens: make([]string, 0, size),
		scores: make([]float32, 0, size),
		types:  make([]int32, 0, size),
	}
	add := func(tok string, score float32, typ int32) {
		v.tokens = append(v.tokens, tok)
		v.scores = append(v.scores, score)
		v.types = append(v.types, typ)
	}
	add("<unk>", 0, tokTypeUnknown)
	add("<s>", 0, tokTypeControl)
	add("</s>", 0, tokTypeControl)
	for b := range 256 {
		add(fmt.Sprintf("<0x%02X>", b), 0, tokTypeByte)
	}
	// Normal pieces get decreasing negative scores, like a SentencePiece
	// model's log probabilities; they only matter for merges, of which there
	// are none here.
	add(spaceMarker, -1, tokTypeNormal)
	for c := byte('!'); c <= '~'; c++ {
		add(string(c), -float32(len(v.tokens)-spaceToken+1), tokTypeNormal)
	}
	for _, tok := range special { // ids BaseVocabSize.. (a family's markers)
		add(tok, 0, tokTypeControl)
	}
	for i := 0; len(v.tokens) < size; i++ {
		add(fmt.Sprintf("<unused%d>", i), 0, tokTypeUnused)
	}
	return v
}

// Tokenize returns the token ids llama.cpp produces for text with this
// vocabulary (llama_tokenize with parse_special=false): an optional BOS, then
// a space prefix (SentencePiece's add_space_prefix), then one token per
// printable ASCII character (space as "▁") and one byte token per byte of
// anything else. An empty text gives only the BOS. For valid UTF-8 text
// without "▁" (U+2581), Detokenize(Tokenize(text, false)) == text.
func Tokenize(text string, addBOS bool) []int {
	var out []int
	if addBOS {
		out = append(out, BOSToken)
	}
	if text == "" {
		return out
	}
	// llama.cpp escapes spaces before splitting into characters, and splits
	// by lead byte only: an invalid lead byte can swallow a following "▁".
	s := strings.ReplaceAll(" "+text, " ", spaceMarker)
	for len(s) > 0 {
		n := min(utf8LenLlama(s[0]), len(s))
		ch := s[:n]
		s = s[n:]
		switch {
		case ch == spaceMarker:
			out = append(out, spaceToken)
		case len(ch) == 1 && ch[0] >= '!' && ch[0] <= '~':
			out = append(out, firstASCIIToken+int(ch[0]-'!'))
		default:
			for i := 0; i < len(ch); i++ {
				out = append(out, firstByteToken+int(ch[i]))
			}
		}
	}
	return out
}

// Detokenize mirrors llama_detokenize(remove_special=true,
// unparse_special=false) for this vocabulary: control, unknown and unused
// tokens produce nothing, and the leading space of the first token's piece is
// dropped (the space prefix Tokenize added) -- except when the first token is
// BOS, where llama.cpp keeps it. So Detokenize(Tokenize(s, false)) == s for
// any s without a literal "▁" (U+2581), which comes back as a space as with
// any SentencePiece vocabulary.
func Detokenize(tokens []int) string {
	var b strings.Builder
	stripSpace := true
	if len(tokens) > 0 && tokens[0] == BOSToken {
		tokens = tokens[1:]
		stripSpace = false
	}
	for i, t := range tokens {
		var piece string
		switch {
		case t >= firstByteToken && t < spaceToken:
			piece = string([]byte{byte(t - firstByteToken)})
		case t == spaceToken:
			piece = " "
		case t >= firstASCIIToken && t < BaseVocabSize:
			piece = string(rune('!' + t - firstASCIIToken))
		}
		if i == 0 && stripSpace {
			piece = strings.TrimPrefix(piece, " ")
		}
		b.WriteString(piece)
	}
	return b.String()
}

// TokenPiece is the text of token id as stored in the vocabulary.
func TokenPiece(id int) string {
	switch {
	case id == UnkToken:
		return "<unk>"
	case id == BOSToken:
		return "<s>"
	case id == EOSToken:
		return "</s>"
	case id >= firstByteToken && id < spaceToken:
		return fmt.Sprintf("<0x%02X>", id-firstByteToken)
	case id == spaceToken:
		return spaceMarker
	case id >= firstASCIIToken && id < BaseVocabSize:
		return string(rune('!' + id - firstASCIIToken))
	default:
		return fmt.Sprintf("<unused%d>", id-BaseVocabSize)
	}
}

// utf8LenLlama mirrors llama.cpp's unicode_len_utf8: the character length
// implied by a lead byte (continuation and invalid bytes count as 1).
func utf8LenLlama(b byte) int {
	switch b >> 4 {
	case 0xc, 0xd:
		return 2
	case 0xe:
		return 3
	case 0xf:
		return 4
	default:
		return 1
	}
}
