package llama

/*
#include <stdlib.h>
#include "llama.h"
*/
import "C"

import (
	"errors"
	"regexp"
	"unsafe"

	ollama "github.com/ollama/ollama/llama"
)

// SamplerParams configures a llama.cpp sampler chain.
type SamplerParams struct {
	Temperature      float32 // <= 0: greedy
	TopK             int32
	TopP             float32
	MinP             float32
	RepeatPenalty    float32
	PresencePenalty  float32
	FrequencyPenalty float32
	RepeatLastN      int32
	Seed             uint32
}

// Sampler is one sequence's sampler chain. Free it with Close.
type Sampler struct {
	c *C.struct_llama_sampler
}

// NewSampler builds an unconstrained chain; see NewConstrainedSampler.
func NewSampler(p SamplerParams) *Sampler {
	s, _ := newSampler(nil, p, "", "")
	return s
}

// ErrGrammar: a grammar (GBNF) did not parse.
var ErrGrammar = errors.New("llama: the grammar does not parse")

// NewConstrainedSampler is NewSampler with a GBNF grammar (starting at rule root) in
// front of the chain: tokens the grammar does not allow next are never sampled, and
// end-of-generation is allowed only where the grammar is complete. An empty grammar
// is no constraint. It fails with ErrGrammar when the grammar does not parse.
func NewConstrainedSampler(m *Model, p SamplerParams, gbnf, root string) (*Sampler, error) {
	return newSampler(m, p, gbnf, root)
}

// newSampler builds grammar -> penalties -> top_k -> top_p -> min_p -> temperature -> dist, or
// penalties -> greedy when Temperature <= 0.
func newSampler(m *Model, p SamplerParams, gbnf, root string) (*Sampler, error) {
	var grammar *C.struct_llama_sampler
	if gbnf != "" {
		cg, cr := C.CString(gbnf), C.CString(root)
		grammar = C.llama_sampler_init_grammar(m.vocab, cg, cr)
		C.free(unsafe.Pointer(cg))
		C.free(unsafe.Pointer(cr))
		if grammar == nil {
			return nil, ErrGrammar
		}
	}
	chain := C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
	add := func(s *C.struct_llama_sampler) { C.llama_sampler_chain_add(chain, s) }
	if grammar != nil { // first: the samplers after it only see allowed tokens
		add(grammar)
	}
	if p.RepeatPenalty != 1 && p.RepeatPenalty != 0 || p.PresencePenalty != 0 || p.FrequencyPenalty != 0 {
		rp := p.RepeatPenalty
		if rp == 0 {
			rp = 1
		}
		lastN := p.RepeatLastN
		if lastN == 0 {
			lastN = 64
		}
		add(C.llama_sampler_init_penalties(C.int32_t(lastN), C.float(rp), C.float(p.FrequencyPenalty), C.float(p.PresencePenalty)))
	}
	if p.Temperature <= 0 {
		add(C.llama_sampler_init_greedy())
		return &Sampler{c: chain}, nil
	}
	if p.TopK > 0 {
		add(C.llama_sampler_init_top_k(C.int32_t(p.TopK)))
	}
	if p.TopP > 0 && p.TopP < 1 {
		add(C.llama_sampler_init_top_p(C.float(p.TopP), 1))
	}
	if p.MinP > 0 {
		add(C.llama_sampler_init_min_p(C.float(p.MinP), 1))
	}
	add(C.llama_sampler_init_temp(C.float(p.Temperature)))
	add(C.llama_sampler_init_dist(C.uint32_t(p.Seed)))
	return &Sampler{c: chain}, nil
}

// Sample picks a token from output row idx of the last decode and accepts it into
// the chain's history (for penalties).
func (s *Sampler) Sample(ctx *Context, idx int) Token {
	tok := C.llama_sampler_sample(s.c, ctx.c, C.int32_t(idx))
	return Token(tok)
}

// Accept records a token the sampler did not pick itself (e.g. prompt tokens for penalties).
func (s *Sampler) Accept(tok Token) { C.llama_sampler_accept(s.c, C.llama_token(tok)) }

// Close frees the chain and every sampler in it.
func (s *Sampler) Close() {
	if s != nil && s.c != nil {
		C.llama_sampler_free(s.c)
		s.c = nil
	}
}

// ErrSchema: a JSON schema could not be turned into a grammar (invalid JSON, or
// something llama.cpp's converter refuses, such as an unbalanced pattern).
var ErrSchema = errors.New("llama: the JSON schema cannot be converted to a grammar")

// spaceRule is the converter's rule for optional whitespace between JSON tokens.
var spaceRule = regexp.MustCompile(`(?m)^space ::= .*$`)

// SchemaToGrammar converts a JSON schema to GBNF with llama.cpp's converter, with one
// change: no whitespace is allowed between JSON tokens. Small models given the
// converter's optional blanks and newlines spend tokens on them, sometimes without
// end; compact JSON parses the same.
func SchemaToGrammar(schema []byte) (string, error) {
	g := ollama.SchemaToGrammar(schema)
	if g == nil {
		return "", ErrSchema
	}
	return spaceRule.ReplaceAllLiteralString(string(g), `space ::= ""`), nil
}
