package api

import (
	"fmt"
	"mime"
	"net/http"
	"strings"
)

// requireJSON answers 415 to a POST whose Content-Type is not application/json
// (a charset, when given, must be UTF-8). chi's AllowContentType does not fit:
// it answers with an empty body instead of an OpenAI error, lets a POST that
// declares Content-Length 0 through whatever its type, and ignores the charset.
func requireJSON(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			ct := r.Header.Get("Content-Type")
			mt, params, err := mime.ParseMediaType(ct)
			cs := strings.ToLower(params["charset"])
			if err != nil || mt != "application/json" || (cs != "" && cs != "utf-8" && cs != "utf8") {
				writeError(w, &apiError{Status: http.StatusUnsupportedMediaType, Type: typeInvalidRequest, Code: "unsupported_media_type",
					Message: fmt.Sprintf("Content-Type must be application/json, got %q", ct)})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}
