package api

import (
	"embed"
	"io/fs"
	"net/http"
	"path"
	"strconv"
	"time"
)

// The playground page (GET /) and its files (GET /ui/...), built into the binary:
// plain HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere.
// The page itself needs no API key; it asks for one when the API answers 401
// and sends it on every request.
//
//go:embed ui
var uiFiles embed.FS

// uiCSP keeps the page to its own files: no inline script, pictures from data:
// and blob: URLs (the user's own files), requests to this server only.
const uiCSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

var uiModTime = time.Now()

// serveUI answers GET / (the page) and GET /ui/{file}.
func serveUI(w http.ResponseWriter, r *http.Request) {
	name := "ui/index.html"
	if r.URL.Path != "/" {
		name = path.Clean("ui/" + path.Base(r.URL.Path))
	}
	b, err := fs.ReadFile(uiFiles, name)
	if err != nil {
		writeError(w, notFound("not_found", "unknown endpoint %s %s", r.Method, r.URL.Path))
		return
	}
	h := w.Header()
	switch path.Ext(name) {
	case ".html":
		h.Set("Content-Type", "text/html; charset=utf-8")
	case ".js":
		h.Set("Content-Type", "text/javascript; charset=utf-8")
	case ".css":
		h.Set("Content-Type", "text/css; charset=utf-8")
	case ".svg":
		h.Set("Content-Type", "image/svg+xml")
	default:
		h.Set("Content-Type", "application/octet-stream")
	}
	h.Set("Content-Security-Policy", uiCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-cache")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(b)
}
