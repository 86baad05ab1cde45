package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// OpenAI error types.
const (
	typeInvalidRequest     = "invalid_request_error"
	typeAuthentication     = "authentication_error"
	typeNotFound           = "not_found_error"
	typeRateLimit          = "rate_limit_error"
	typeServer             = "server_error"
	typeServiceUnavailable = "service_unavailable_error"
)

// statusClientClosed is logged (and counted) for a client that hung up
// before its answer was ready; nobody reads it. Not counted as an error.
const statusClientClosed = 499

// apiError is an error on its way to the client.
type apiError struct {
	Status     int
	Type       string
	Message    string
	Param      string // "" -> null
	Code       string // "" -> null
	RetryAfter int    // seconds; 0: no Retry-After header
}

func (e *apiError) Error() string { return e.Message }

func (e *apiError) body() ErrorBody {
	d := ErrorDetail{Message: e.Message, Type: e.Type}
	if e.Type == "" {
		d.Type = typeForStatus(e.Status)
	}
	if e.Param != "" {
		d.Param = &e.Param
	}
	if e.Code != "" {
		d.Code = &e.Code
	}
	return ErrorBody{Error: d}
}

func typeForStatus(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return typeAuthentication
	case status == http.StatusNotFound:
		return typeNotFound
	case status == http.StatusTooManyRequests:
		return typeRateLimit
	case status == http.StatusServiceUnavailable:
		return typeServiceUnavailable
	case status >= 500:
		return typeServer
	}
	return typeInvalidRequest
}

// badRequest is a 400 invalid_request_error.
func badRequest(param, code, format string, a ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: code, Message: fmt.Sprintf(format, a...)}
}

func tooLarge(param, code, format string, a ...any) *apiError {
	return &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Param: param, Code: code, Message: fmt.Sprintf(format, a...)}
}

func notFound(code, format string, a ...any) *apiError {
	return &apiError{Status: http.StatusNotFound, Type: typeNotFound, Code: code, Message: fmt.Sprintf(format, a...)}
}

func internalError(format string, a ...any) *apiError {
	return &apiError{Status: http.StatusInternalServerError, Type: typeServer, Code: "internal_error", Message: fmt.Sprintf(format, a...)}
}

// writeError sends e as the OpenAI error JSON, with the headers that tell
// a client whether to retry: Retry-After when e has one, and
// x-should-retry: false on a deterministic failure.
func writeError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	if !retryable(e.Status) {
		w.Header().Set(shouldRetryHeader, "false")
	}
	writeJSON(w, e.Status, e.body())
}

// shouldRetryHeader is the response header the OpenAI SDKs (Python, Node,
// Go) read before their own status rules: "false" stops their automatic
// retries, "true" forces one.
const shouldRetryHeader = "X-Should-Retry"

// retryable reports whether the same request may succeed when sent again.
// A 4xx is the request's own fault (bad input, auth, unknown route, size,
// media type) and fails the same way every time, except 408 (timed out),
// 409 (conflict) and 429 (busy, with Retry-After): for those, and for every
// 5xx (503 shutting down, 504 past --request-timeout, 500), the header is
// left out and the SDKs' own rule, which retries them, applies.
func retryable(status int) bool {
	switch {
	case status == http.StatusRequestTimeout, status == http.StatusConflict, status == http.StatusTooManyRequests:
		return true
	case status >= 400 && status < 500:
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":{"message":"cannot encode response","type":"server_error","param":null,"code":"internal_error"}}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// engineError maps an error from Backend.Submit or a final Event to the client.
func engineError(err error) *apiError { return planError(err, nil) }

// planError is engineError for the request p planned (nil: unknown): an
// error about one image or text part names that part's field instead of
// "messages".
func planError(err error, p *chatPlan) *apiError {
	var (
		ae       *apiError
		internal *completion.InternalError
		tooLong  *completion.PromptTooLongError
		policy   *completion.PolicyUnsupportedError
		img      *completion.ImageError
		marker   *completion.MarkerInTextError
		cons     *completion.ConstraintError
		ce       *elasticcache.ConfigError
	)
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &internal):
		// Whatever it wraps, it is the server's fault; the details are logged, not sent.
		return internalError("the server failed while generating this answer (request id %q)", internal.RequestID)
	case errors.As(err, &tooLong):
		return badRequest("messages", "context_length_exceeded", "the prompt is %d tokens but a sequence holds at most %d; shorten the messages or raise --ctx-size",
			tooLong.Tokens, tooLong.Limit)
	case errors.As(err, &policy):
		return badRequest("elastic_cache.policy", "unsupported_policy", "%s", policy.Error())
	case errors.As(err, &img):
		param, name := p.imageParam(img.Index)
		return badRequest(param, "invalid_image", "%s cannot be decoded by the vision encoder; it is truncated or corrupt (%v)", name, img.Err)
	case errors.As(err, &marker):
		return markerInText(p.textParam(marker.Message, marker.Part), marker.Marker)
	case errors.As(err, &cons):
		param := "response_format"
		if p != nil && p.constraintParam != "" {
			param = p.constraintParam
		}
		return badRequest(param, "unsupported_schema", "%s: %s", param, cons.Reason)
	case errors.Is(err, completion.ErrNoVision):
		return badRequest("messages", "images_not_supported", "%s", completion.ErrNoVision.Error())
	case errors.Is(err, completion.ErrEmptyPrompt):
		return badRequest("messages", "invalid_value", "the prompt is empty: the messages render to no tokens")
	case errors.As(err, &ce):
		return cacheError(ce)
	case errors.Is(err, completion.ErrQueueFull):
		return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: "queue_full", RetryAfter: 1,
			Message: "the server is busy: every slot is in use and the waiting queue is full; retry shortly"}
	case errors.Is(err, completion.ErrShuttingDown):
		return &apiError{Status: http.StatusServiceUnavailable, Type: typeServiceUnavailable, Code: "shutting_down", RetryAfter: 5,
			Message: "the server is shutting down"}
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{Status: http.StatusGatewayTimeout, Type: typeServer, Code: "request_timeout",
			Message: "the request ran past the server's --request-timeout"}
	case errors.Is(err, context.Canceled):
		// Only the client sees this, and it has gone away.
		return &apiError{Status: statusClientClosed, Type: typeInvalidRequest, Code: "request_cancelled", Message: "the request was cancelled"}
	}
	return internalError("generation failed: %v", err)
}
