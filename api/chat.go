package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/elasticserve/elasticserve/engine/completion"
)

// handleChat serves POST /v1/chat/completions.
func (s *server) handleChat(w http.ResponseWriter, r *http.Request) {
	body, aerr := readBody(r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	ctx, cancel := s.requestContext(r)
	defer cancel()
	plan, info, aerr := s.prepareChat(ctx, r, body)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	events, err := s.backend.Submit(ctx, plan.req)
	if err != nil {
		writeError(w, s.requestError(r.Context(), err, plan))
		return
	}
	c := &chatState{
		id:      "chatcmpl-" + randomHex(12),
		created: time.Now().Unix(),
		model:   s.servedModel(info),
		start:   time.Now(),
		plan:    plan,
	}
	if plan.stream {
		s.streamChat(ctx, w, r, c, events, plan.includeUsage)
		return
	}
	s.collectChat(ctx, w, r, c, events)
}

// requestContext bounds a request's work by --request-timeout (none when 0).
func (s *server) requestContext(r *http.Request) (context.Context, context.CancelFunc) {
	if s.opts.RequestTimeout > 0 {
		return context.WithTimeout(r.Context(), s.opts.RequestTimeout)
	}
	return context.WithCancel(r.Context())
}

// prepareChat turns a chat-completions body into an engine request: decoded,
// validated against the served model and the server's limits, its images loaded
// (within ctx) and checked. /chat/completions submits it, /tokenize counts it.
func (s *server) prepareChat(ctx context.Context, r *http.Request, body []byte) (*chatPlan, BackendInfo, *apiError) {
	info := s.backend.Info()
	cr, aerr := decodeChatRequest(body)
	if aerr != nil {
		return nil, info, aerr
	}
	if cr.Model != "" && !s.knownModel(cr.Model, info) {
		e := modelNotFound(cr.Model, s.servedModel(info))
		e.Param = "model"
		return nil, info, e
	}
	plan, aerr := planChat(cr, planLimits{
		maxImages:        s.opts.MaxImages,
		allowImageURLs:   s.opts.AllowImageURLs,
		vision:           info.Vision,
		marker:           info.MediaMarker,
		defaultMaxTokens: s.opts.DefaultMaxTokens,
		cache:            s.opts.Cache,
	})
	if aerr != nil {
		return nil, info, aerr
	}
	images, aerr := s.loadImages(ctx, plan.images)
	if aerr != nil {
		return nil, info, aerr
	}
	plan.setImages(images)
	plan.req.ID = RequestIDFromContext(r.Context())
	return plan, info, nil
}

// chatState is the per-response state shared by both response shapes.
type chatState struct {
	id       string
	created  int64
	model    string
	start    time.Time
	firstTok time.Time
	plan     *chatPlan // for errors about one part of the request
}

// next waits for the next event. ok is false when ctx ended or the channel
// closed without a Done event; err then says why.
func next(ctx context.Context, events <-chan completion.Event) (ev completion.Event, ok bool, err error) {
	ev, _, ok, err = nextEvent(ctx, events, nil)
	return ev, ok, err
}

// nextEvent is next that also returns (with idled set) when idle fires first.
func nextEvent(ctx context.Context, events <-chan completion.Event, idle <-chan time.Time) (ev completion.Event, idled, ok bool, err error) {
	select {
	case <-idle:
		return ev, true, false, nil
	case ev, open := <-events:
		if !open {
			if ctx.Err() != nil {
				return ev, false, false, context.Cause(ctx)
			}
			return ev, false, false, errors.New("the engine ended the request without a result")
		}
		return ev, false, true, nil
	case <-ctx.Done():
		// The engine stops on cancellation; drain so it never blocks on us.
		go func() {
			for range events { //nolint:revive // draining
			}
		}()
		return ev, false, false, ctx.Err()
	}
}

// collectChat gathers the whole completion and answers with one JSON body.
func (s *server) collectChat(ctx context.Context, w http.ResponseWriter, r *http.Request, c *chatState, events <-chan completion.Event) {
	var text strings.Builder
	var lps []completion.TokenLogprob
	for {
		ev, ok, err := next(ctx, events)
		if !ok { // the error status is counted by the metrics middleware
			writeError(w, s.requestError(r.Context(), err, c.plan))
			return
		}
		if ev.Text != "" && c.firstTok.IsZero() {
			c.firstTok = time.Now()
		}
		text.WriteString(ev.Text)
		lps = append(lps, ev.Logprobs...)
		if !ev.Done {
			continue
		}
		if ev.Err != nil {
			writeError(w, s.requestError(r.Context(), ev.Err, c.plan))
			return
		}
		rate := s.metrics.completed(ev, c.start, c.firstTok)
		fr := finishReason(ev)
		msg := AssistantMessage{Role: "assistant"}
		calls, content := c.plan.tools.finalCalls(text.String())
		if calls != nil {
			msg.ToolCalls = calls
			if fr == completion.FinishStop {
				fr = finishToolCalls
			}
		} else {
			msg.Content = &content
		}
		writeJSON(w, http.StatusOK, ChatCompletion{
			ID:      c.id,
			Object:  "chat.completion",
			Created: c.created,
			Model:   c.model,
			Choices: []ChatChoice{{
				Index:        0,
				Message:      msg,
				FinishReason: fr,
				Logprobs:     c.logprobs(lps),
			}},
			Usage:   usageOf(ev.Usage),
			KVCache: kvCacheOf(ev.KV),
			Timings: &CompletionTimings{TotalMS: msSince(c.start), PredictedPerSecond: rate},
		})
		return
	}
}

// requestError maps an engine/ctx error for the request p planned, telling
// a client that went away (499, only logged) from a server-side timeout or
// cancellation. An engine failure is logged here: its client learns only
// that it happened.
func (s *server) requestError(clientCtx context.Context, err error, p *chatPlan) *apiError {
	var internal *completion.InternalError
	if errors.As(err, &internal) {
		s.log.Error().Str("request_id", RequestIDFromContext(clientCtx)).Err(internal.Err).Msg("engine failed on a request")
	}
	if errors.Is(err, context.Canceled) && clientCtx.Err() == nil {
		return &apiError{Status: http.StatusServiceUnavailable, Type: typeServiceUnavailable, Code: "request_cancelled",
			Message: "the server cancelled the request (it may be shutting down)"}
	}
	return planError(err, p)
}

// finishToolCalls is the finish reason of an answer that is tool calls.
const finishToolCalls = "tool_calls"

// logprobs is a choice's logprobs: null unless the request asked for them.
func (c *chatState) logprobs(lps []completion.TokenLogprob) *ChoiceLogprobs {
	if !c.plan.req.Logprobs {
		return nil
	}
	if out := logprobsOf(lps); out != nil {
		return out
	}
	return &ChoiceLogprobs{Content: []LogprobEntry{}}
}

func finishReason(ev completion.Event) string {
	if ev.FinishReason == "" {
		return completion.FinishStop
	}
	return ev.FinishReason
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// readBody reads the (size-limited) request body.
func readBody(r *http.Request) ([]byte, *apiError) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, bodyTooLarge(mbe.Limit)
		}
		return nil, badRequest("", "invalid_body", "cannot read the request body: %v", err)
	}
	return body, nil
}

// loadImages decodes data URLs, fetches http(s) URLs and checks every
// image's header; it returns the images' bytes in refs order.
func (s *server) loadImages(ctx context.Context, refs []imageRef) ([][]byte, *apiError) {
	if len(refs) == 0 {
		return nil, nil
	}
	out := make([][]byte, 0, len(refs))
	lim := imageLimits{MaxBytes: s.opts.MaxImageBytes, MaxPixels: s.opts.MaxImagePixels}
	for _, ref := range refs {
		data, declared, aerr := s.readImage(ctx, ref)
		if aerr != nil {
			return nil, aerr
		}
		data, aerr = checkImageParam(data, declared, lim, ref.param)
		if aerr != nil {
			return nil, aerr
		}
		out = append(out, data)
	}
	return out, nil
}

func (s *server) readImage(ctx context.Context, ref imageRef) ([]byte, string, *apiError) {
	if hasPrefixFold(ref.url, "data:") {
		du, err := parseDataURL(ref.url, s.opts.MaxImageBytes)
		switch {
		case errors.Is(err, errTooLarge):
			return nil, "", tooLarge(ref.param, "image_too_large", "image is larger than %d bytes", s.opts.MaxImageBytes)
		case err != nil:
			return nil, "", badRequest(ref.param+".url", "invalid_image_url", "%v", err)
		case !acceptedMediaType(du.MediaType):
			return nil, "", badRequest(ref.param+".url", "unsupported_image", "unsupported image type %q; %s", du.MediaType, supportedImages)
		}
		return du.Data, du.MediaType, nil
	}
	if s.fetcher == nil { // planChat already refused; belt and braces
		return nil, "", badRequest(ref.param+".url", "image_url_not_allowed", "remote image URLs are disabled on this server")
	}
	data, ct, err := s.fetcher.fetch(ctx, ref.url)
	switch {
	case errors.Is(err, errTooLarge):
		return nil, "", tooLarge(ref.param, "image_too_large", "image is larger than %d bytes", s.opts.MaxImageBytes)
	case err != nil && ctx.Err() != nil:
		return nil, "", engineError(ctx.Err())
	case err != nil:
		return nil, "", badRequest(ref.param+".url", "invalid_image_url", "%v", err)
	}
	return data, ct, nil
}

// checkImageParam is prepareImage as an error about the request field
// param; it returns the bytes for the engine (WebP and GIF become PNG).
func checkImageParam(data []byte, declared string, lim imageLimits, param string) ([]byte, *apiError) {
	data, err := prepareImage(data, declared, lim)
	if err != nil {
		var ip *imageProblem
		if errors.As(err, &ip) && ip.tooLarge {
			return nil, tooLarge(param, "image_too_large", "%s", ip.msg)
		}
		code := "invalid_image"
		if ip != nil && ip.code != "" {
			code = ip.code
		}
		return nil, badRequest(param, code, "%v", err)
	}
	return data, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
