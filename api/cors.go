package api

import (
	"net/http"
	"strings"

	"github.com/go-chi/cors"
)

// corsAllowedHeaders are the request headers a browser client may send
// cross-origin: the API's own, and those of the OpenAI JS SDK, which (with
// dangerouslyAllowBrowser) adds X-Stainless-* platform headers and, when
// configured, OpenAI-Organization / OpenAI-Project / OpenAI-Beta. The SDK
// adds new X-Stainless-* names from release to release, so these two are
// matched as prefixes.
var (
	corsAllowedHeaders  = []string{"Authorization", "Content-Type", "Accept", "X-Request-Id"}
	corsAllowedPrefixes = []string{"X-Stainless-", "Openai-"} // canonical form of OpenAI-
	// corsExposedHeaders are the response headers a browser lets the page
	// (and the SDK's retry logic) read.
	corsExposedHeaders = []string{requestIDHeader, "Retry-After", shouldRetryHeader}
)

// corsMiddleware answers CORS for the origins listed ("*": any). It goes
// before auth: a browser sends its preflight (OPTIONS) without the
// Authorization header, and go-chi/cors answers a preflight itself (200)
// without calling the rest of the chain.
//
// go-chi/cors matches allowed request headers by exact name, or allows all
// of them with "*" (echoing the requested list in
// Access-Control-Allow-Headers). To allow the SDK's header prefixes, a
// preflight whose requested headers all pass corsHeaderAllowed goes to an
// instance that allows "*"; any other goes to one that allows only the
// exact names, which refuses it (no Access-Control-Allow-Origin).
func corsMiddleware(origins []string) func(http.Handler) http.Handler {
	base := cors.Options{
		AllowedOrigins: origins,
		AllowedMethods: []string{http.MethodGet, http.MethodPost},
		ExposedHeaders: corsExposedHeaders,
		MaxAge:         600, // seconds a browser may cache a preflight
	}
	open, strict := base, base
	open.AllowedHeaders = []string{"*"}
	strict.AllowedHeaders = corsAllowedHeaders
	openMW, strictMW := cors.Handler(open), cors.Handler(strict)
	return func(next http.Handler) http.Handler {
		openH, strictH := openMW(next), strictMW(next)
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodOptions && !corsHeadersAllowed(r.Header.Get("Access-Control-Request-Headers")) {
				strictH.ServeHTTP(w, r)
				return
			}
			openH.ServeHTTP(w, r)
		})
	}
}

// corsHeadersAllowed reports whether every header in a preflight's
// Access-Control-Request-Headers list may be sent.
func corsHeadersAllowed(list string) bool {
	for _, h := range strings.Split(list, ",") {
		h = http.CanonicalHeaderKey(strings.TrimSpace(h))
		if h != "" && !corsHeaderAllowed(h) {
			return false
		}
	}
	return true
}

func corsHeaderAllowed(h string) bool {
	for _, a := range corsAllowedHeaders {
		if h == a {
			return true
		}
	}
	for _, p := range corsAllowedPrefixes {
		if len(h) > len(p) && strings.HasPrefix(h, p) {
			return true
		}
	}
	return false
}
