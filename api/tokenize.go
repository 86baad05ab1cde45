package api

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"unicode/utf8"
)

// TokenizeRequest is the body of POST /tokenize, llama-server's shape, or
// a chat-completions body (messages, images included) whose prompt is
// counted. Exactly one of Content and Messages is set.
type TokenizeRequest struct {
	Content *string `json:"content"`
	// AddSpecial adds the model's BOS etc.; default false, as llama-server.
	AddSpecial *bool `json:"add_special"`
	// ParseSpecial turns special-token text into its token; default true,
	// as llama-server.
	ParseSpecial *bool `json:"parse_special"`
	// WithPieces answers [{"id":..,"piece":..}] instead of ids.
	WithPieces bool            `json:"with_pieces"`
	Messages   json.RawMessage `json:"messages"`
}

// TokenizeResponse answers a content request. Tokens holds ids, or
// TokenPieces with with_pieces; Count is len(Tokens).
type TokenizeResponse struct {
	Tokens any `json:"tokens"`
	Count  int `json:"count"`
}

// TokenPiece is one token with its text. Piece is a string, or the bytes as
// an array of numbers when the token is not valid UTF-8 on its own (part of
// a multi-byte character), as llama-server answers.
type TokenPiece struct {
	ID    int32 `json:"id"`
	Piece any   `json:"piece"`
}

// PromptCountResponse answers a messages request: the prompt tokens the
// chat completion of the same body would report as usage.prompt_tokens,
// image tokens included. An image has no token ids, so none are listed.
type PromptCountResponse struct {
	Count int `json:"count"`
}

// DetokenizeRequest is the body of POST /detokenize. Tokens are kept raw so
// that a bad element is named by its index.
type DetokenizeRequest struct {
	Tokens json.RawMessage `json:"tokens"`
}

// DetokenizeResponse answers POST /detokenize.
type DetokenizeResponse struct {
	Content string `json:"content"`
}

// decodeBody parses a JSON object body into v with decodeChatRequest's
// checks and error shapes.
func decodeBody(body []byte, v any) *apiError {
	if len(bytes.TrimSpace(body)) == 0 {
		return badRequest("", "invalid_json", "the request body is empty; send a JSON object")
	}
	if !utf8.Valid(body) {
		return badRequest("", "invalid_utf8", "the request body is not valid UTF-8")
	}
	if t := bytes.TrimSpace(body); t[0] != '{' {
		return badRequest("", "invalid_json", "the request body must be a JSON object")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return jsonError(err)
	}
	return nil
}

// handleTokenize serves POST /tokenize.
func (s *server) handleTokenize(w http.ResponseWriter, r *http.Request) {
	body, aerr := readBody(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	var tr TokenizeRequest
	if aerr := decodeBody(body, &tr); aerr != nil {
		writeError(w, aerr)
		return
	}
	hasMessages := len(tr.Messages) > 0 && string(tr.Messages) != "null"
	switch {
	case tr.Content != nil && hasMessages:
		writeError(w, badRequest("messages", "invalid_value", "send either content (text to tokenize) or messages (a chat to count), not both"))
		return
	case hasMessages:
		s.countPrompt(w, r, body)
		return
	case tr.Content == nil:
		writeError(w, badRequest("content", "invalid_value", "content (the text to tokenize) or messages (a chat to count) is required"))
		return
	}
	addSpecial, parseSpecial := false, true
	if tr.AddSpecial != nil {
		addSpecial = *tr.AddSpecial
	}
	if tr.ParseSpecial != nil {
		parseSpecial = *tr.ParseSpecial
	}
	ids, pieces, err := s.backend.Tokenize(r.Context(), *tr.Content, addSpecial, parseSpecial)
	if err != nil {
		writeError(w, s.requestError(r.Context(), err, nil))
		return
	}
	if ids == nil {
		ids = []int32{} // [] not null: the text has no tokens
	}
	resp := TokenizeResponse{Tokens: ids, Count: len(ids)}
	if tr.WithPieces {
		if len(pieces) != len(ids) {
			writeError(w, internalError("the engine returned %d pieces for %d tokens", len(pieces), len(ids)))
			return
		}
		tp := make([]TokenPiece, len(ids))
		for i, id := range ids {
			tp[i] = TokenPiece{ID: id, Piece: pieceJSON(pieces[i])}
		}
		resp.Tokens = tp
	}
	writeJSON(w, http.StatusOK, resp)
}

// pieceJSON is a token's text as JSON: a string when it is valid UTF-8,
// else its bytes (encoding/json would replace them with U+FFFD).
func pieceJSON(p string) any {
	if utf8.ValidString(p) {
		return p
	}
	b := make([]int, len(p))
	for i := 0; i < len(p); i++ {
		b[i] = int(p[i])
	}
	return b
}

// countPrompt answers a chat body on /tokenize: it is validated, and its
// images loaded, exactly as for /chat/completions, then counted.
func (s *server) countPrompt(w http.ResponseWriter, r *http.Request, body []byte) {
	ctx, cancel := s.requestContext(r)
	defer cancel()
	plan, _, aerr := s.prepareChat(ctx, r, body)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	n, err := s.backend.CountPrompt(ctx, plan.req)
	if err != nil {
		writeError(w, s.requestError(r.Context(), err, plan))
		return
	}
	writeJSON(w, http.StatusOK, PromptCountResponse{Count: n})
}

// handleDetokenize serves POST /detokenize.
func (s *server) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	body, aerr := readBody(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	var dr DetokenizeRequest
	if aerr := decodeBody(body, &dr); aerr != nil {
		writeError(w, aerr)
		return
	}
	ids, aerr := tokenIDs(dr.Tokens, s.backend.Info().VocabSize)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	text, err := s.backend.Detokenize(r.Context(), ids)
	if err != nil {
		writeError(w, s.requestError(r.Context(), err, nil))
		return
	}
	writeJSON(w, http.StatusOK, DetokenizeResponse{Content: text})
}

// tokenIDs parses the tokens array, each an integer id in [0, vocab)
// (vocab <= 0: not range-checked). An id out of range would make llama.cpp
// throw, so it never reaches the backend.
func tokenIDs(raw json.RawMessage, vocab int) ([]int32, *apiError) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, badRequest("tokens", "invalid_value", "tokens (an array of token ids) is required")
	}
	var elems []json.RawMessage
	if err := json.Unmarshal(raw, &elems); err != nil {
		return nil, badRequest("tokens", "invalid_type", "tokens must be an array of token ids (integers)")
	}
	ids := make([]int32, len(elems))
	for i, e := range elems {
		param := "tokens[" + strconv.Itoa(i) + "]"
		v, err := strconv.ParseInt(string(e), 10, 64)
		if err != nil {
			return nil, badRequest(param, "invalid_type", "%s must be an integer token id, got %s", param, clipJSON(e))
		}
		if v < 0 || (vocab > 0 && v >= int64(vocab)) || v > 1<<31-1 {
			if vocab > 0 {
				return nil, badRequest(param, "invalid_value", "%s is %d, not a token id of this model (0 to %d)", param, v, vocab-1)
			}
			return nil, badRequest(param, "invalid_value", "%s is %d, not a token id (ids are >= 0)", param, v)
		}
		ids[i] = int32(v)
	}
	return ids, nil
}

// clipJSON shortens a JSON value quoted in an error message.
func clipJSON(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}
