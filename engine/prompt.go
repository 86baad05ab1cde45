package engine

import (
	"errors"
	"fmt"
	"strings"

	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/llama"
)

// RenderPrompt is the one prompt builder: the server, the eval tool and the demo
// tools all reach the model through it. It writes msgs as
// completion.TemplateMessages does (parts joined by "\n", every image part
// replaced by llama.cpp's media marker, a past answer without its leading
// spaces; a text part holding the marker is refused with
// *completion.MarkerInTextError), renders them with the model's chat template,
// and returns the text with the images in marker order. The text a request
// adds around its messages (tool descriptions, tool results, answer prefixes)
// is written beside TemplateMessages, in engine/completion/prompt.go.
func RenderPrompt(m *llama.Model, msgs []completion.Message) (string, [][]byte, error) {
	tm, images, err := completion.TemplateMessages(msgs, llama.MediaMarker())
	if err != nil {
		return "", nil, err
	}
	chat := make([]llama.ChatMessage, len(tm))
	for i, msg := range tm {
		chat[i] = llama.ChatMessage{Role: msg.Role, Content: msg.Content}
	}
	text, err := m.ApplyChatTemplate("", chat, true)
	if err != nil {
		return "", nil, fmt.Errorf("engine: chat template: %w", err)
	}
	return text, images, nil
}

// promptChunk is one run of a prompt's tokens: text tokens or one image.
type promptChunk struct {
	kind   llama.ChunkKind
	tokens []llama.Token
	n      int
	nPos   int // positions it advances (see llama.Chunk.NPos); n but for M-RoPE images
	src    llama.Chunk
	key    imageKey  // an image's content
	embd   []float32 // image embeddings, once encoded
}

// tokenize renders and tokenizes req's messages into s's chunks (images are
// preprocessed, not yet encoded).
func (e *Engine) tokenize(s *seq) error {
	p, err := buildPrompt(e.model, e.vision, s.req.Messages, s.req.AnswerPrefix)
	if err != nil {
		return err
	}
	s.prompt, s.chunks, s.nPrompt = p.c, p.chunks, p.n
	images := s.req.Images()
	per, err := pictureChunks(e.vision, s.chunks, images)
	if err != nil {
		return fmt.Errorf("engine: tiles of the pictures: %w", err)
	}
	s.units = promptUnits(s.chunks, images, per)
	for i, u := range s.units {
		if u.img != (imageKey{}) && u.tok == 0 {
			s.chunks[chunkAt(s.chunks, i)].key = u.img
		}
	}
	pos := 0
	for _, c := range s.chunks {
		pos += c.n
		if c.kind == llama.ChunkImage {
			s.textFrom = pos
		}
	}
	return nil
}

// CountPrompt is the number of prompt tokens the engine would encode for msgs
// (images included) on this model and vision encoder (nil: text only).
func CountPrompt(m *llama.Model, v *llama.Vision, msgs []completion.Message) (int, error) {
	chunks, err := PromptChunks(m, v, msgs)
	n := 0
	for _, c := range chunks {
		n += c.N
	}
	return n, err
}

// PromptChunk is one run of a rendered prompt as the engine encodes it: text
// tokens, or one image's NTokens embeddings.
type PromptChunk struct {
	Image  bool
	Tokens []llama.Token // text chunks only
	N      int
}

// PromptChunks returns the chunks the engine would encode for msgs, in order
// (for tools that relate prompt positions to what they hold).
func PromptChunks(m *llama.Model, v *llama.Vision, msgs []completion.Message) ([]PromptChunk, error) {
	p, err := buildPrompt(m, v, msgs, "")
	if err != nil {
		return nil, err
	}
	if p.c != nil {
		defer p.c.Close()
	}
	out := make([]PromptChunk, len(p.chunks))
	for i, c := range p.chunks {
		out[i] = PromptChunk{Image: c.kind == llama.ChunkImage, Tokens: c.tokens, N: c.n}
	}
	return out, nil
}

type builtPrompt struct {
	c      *llama.Prompt // nil for a text-only prompt
	chunks []promptChunk
	n      int
}

// buildPrompt renders msgs, appends answerPrefix (the start of the answer, after
// the assistant header) and tokenizes the whole.
func buildPrompt(m *llama.Model, v *llama.Vision, msgs []completion.Message, answerPrefix string) (builtPrompt, error) {
	text, images, err := RenderPrompt(m, msgs)
	if err != nil {
		return builtPrompt{}, err
	}
	if strings.Contains(answerPrefix, llama.MediaMarker()) {
		return builtPrompt{}, fmt.Errorf("engine: the answer prefix holds the media marker")
	}
	text += answerPrefix
	if len(images) == 0 {
		toks, err := m.Tokenize(text, true, true)
		if err != nil {
			return builtPrompt{}, fmt.Errorf("engine: tokenize: %w", err)
		}
		return builtPrompt{chunks: []promptChunk{{kind: llama.ChunkText, tokens: toks, n: len(toks), nPos: len(toks)}}, n: len(toks)}, nil
	}
	if v == nil {
		return builtPrompt{}, completion.ErrNoVision
	}
	c, err := v.Tokenize(text, images, true)
	if err != nil {
		var ie *llama.ImageError
		if errors.As(err, &ie) {
			return builtPrompt{}, &completion.ImageError{Index: ie.Index, Err: ie.Err}
		}
		return builtPrompt{}, fmt.Errorf("engine: %w", err)
	}
	p := builtPrompt{c: c}
	for _, ch := range c.Chunks {
		p.chunks = append(p.chunks, promptChunk{kind: ch.Kind, tokens: ch.Tokens, n: ch.NTokens, nPos: ch.NPos, src: ch})
		p.n += ch.NTokens
	}
	return p, nil
}

// chunkAt is the index of the chunk that holds prompt position pos.
func chunkAt(chunks []promptChunk, pos int) int {
	for i, c := range chunks {
		if pos < c.n {
			return i
		}
		pos -= c.n
	}
	return len(chunks)
}
