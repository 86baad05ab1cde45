package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/elasticserve/elasticserve/engine"
	"github.com/elasticserve/elasticserve/engine/completion"
	"github.com/elasticserve/elasticserve/internal/testmodel"
	"github.com/elasticserve/elasticserve/llama"
)

// userTurn is the user message of a held-out question: the image, then the
// question (or the question first with textFirst), as a client sends the parts.
func userTurn(question string, image []byte, textFirst bool) completion.Message {
	parts := []completion.Part{completion.Image(image), completion.Text(question)}
	if textFirst {
		parts[0], parts[1] = parts[1], parts[0]
	}
	return completion.Message{Role: "user", Parts: parts}
}

func loadPair(dir string, threads int) (*llama.Model, *llama.Vision, error) {
	m, err := llama.LoadModel(filepath.Join(dir, testmodel.ModelFile), llama.ModelParams{UseMmap: true})
	if err != nil {
		return nil, nil, err
	}
	v, err := llama.LoadVision(m, filepath.Join(dir, testmodel.MMProjFile), llama.VisionParams{Threads: threads})
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return m, v, nil
}

type probeChunk struct {
	Kind   string        `json:"kind"` // "text" or "image"
	Tokens []llama.Token `json:"tokens,omitempty"`
	N      int           `json:"n"`
}

type probeResult struct {
	Prompt    string       `json:"prompt"`
	Chunks    []probeChunk `json:"chunks"`
	ImageEmbd []float32    `json:"image_embd"` // n_image_tokens x n_embd, row-major
	Logits    []float32    `json:"logits"`     // after the last prompt position
}

func probeCmd(fs *flag.FlagSet, args []string) error {
	dir := fs.String("dir", "models/demo", "folder with model.gguf and mmproj.gguf")
	imagePath := fs.String("image", "", "PNG or JPEG image (required)")
	question := fs.String("question", "What color is the circle?", "user question")
	textFirst := fs.Bool("text-first", false, "put the question before the image")
	kvType := fs.String("kv-type", "f32", "KV cache type (f16 or f32)")
	out := fs.String("out", "", "JSON output (required)")
	fs.Parse(args)
	if *imagePath == "" || *out == "" {
		return errors.New("probe: --image and --out are required")
	}
	img, err := os.ReadFile(*imagePath)
	if err != nil {
		return err
	}
	llama.Init(llama.LogError)
	m, v, err := loadPair(*dir, 2)
	if err != nil {
		return err
	}
	defer m.Close()
	defer v.Close()
	text, images, err := engine.RenderPrompt(m, []completion.Message{userTurn(*question, img, *textFirst)})
	if err != nil {
		return err
	}
	p, err := v.Tokenize(text, images, true)
	if err != nil {
		return err
	}
	defer p.Close()
	ctx, err := llama.NewContext(m, llama.ContextParams{NCtx: 1024, NBatch: 512, NSeqMax: 1, Threads: 2, TypeK: *kvType, TypeV: *kvType})
	if err != nil {
		return err
	}
	defer ctx.Close()
	embd := m.Info().Embd
	res := probeResult{Prompt: text}
	pos := 0
	last := len(p.Chunks) - 1
	for ci, c := range p.Chunks {
		isLast := ci == last
		switch c.Kind {
		case llama.ChunkText:
			res.Chunks = append(res.Chunks, probeChunk{Kind: "text", Tokens: c.Tokens, N: c.NTokens})
			b := llama.NewBatch(len(c.Tokens), 0, 1)
			for i, t := range c.Tokens {
				b.Add(t, pos, 0, isLast && i == len(c.Tokens)-1)
				pos++
			}
			err = ctx.Decode(b)
			if err == nil && isLast {
				res.Logits = append([]float32(nil), ctx.Logits(b.Len()-1)...)
			}
			b.Close()
		case llama.ChunkImage:
			res.Chunks = append(res.Chunks, probeChunk{Kind: "image", N: c.NTokens})
			var e []float32
			if e, err = p.EncodeImage(c); err != nil {
				return err
			}
			res.ImageEmbd = e
			b := llama.NewBatch(c.NTokens, embd, 1)
			for i := range c.NTokens {
				b.AddEmbd(e[i*embd:(i+1)*embd], pos, 0, isLast && i == c.NTokens-1)
				pos++
			}
			err = ctx.Decode(b)
			if err == nil && isLast {
				res.Logits = append([]float32(nil), ctx.Logits(b.Len()-1)...)
			}
			b.Close()
		}
		if err != nil {
			return fmt.Errorf("decode chunk %d: %w", ci, err)
		}
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	if err := json.NewEncoder(f).Encode(res); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
