package api

import (
	"io/fs"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// GET / serves the embedded page and /ui/ its files, without an API key (the
// page asks for the key); --ui=false leaves both 404.
func TestPlaygroundPage(t *testing.T) {
	opts := testOptions()
	opts.UI = true
	opts.APIKey = "sk-page"
	h := newHandler(t, opts, newFake())
	w := do(h, http.MethodGet, "/", "")
	if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %d %q", w.Code, w.Header().Get("Content-Type"))
	}
	page := w.Body.String()
	for _, want := range []string{`<input type="file" id="file"`, `id="budget"`, `id="policy"`, `id="selection"`, `id="compare"`, `src="ui/app.js"`, `href="ui/style.css"`} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %s", want)
		}
	}
	if csp := w.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || !strings.Contains(csp, "connect-src 'self'") {
		t.Errorf("CSP %q", csp)
	}
	for file, ctype := range map[string]string{"/ui/app.js": "text/javascript", "/ui/style.css": "text/css", "/ui/index.html": "text/html"} {
		w := do(h, http.MethodGet, file, "")
		if w.Code != 200 || !strings.HasPrefix(w.Header().Get("Content-Type"), ctype) || w.Body.Len() == 0 {
			t.Errorf("GET %s: %d %q", file, w.Code, w.Header().Get("Content-Type"))
		}
	}
	for _, path := range []string{"/ui/nothing.js", "/ui/", "/ui/../server.go"} {
		if w := do(h, http.MethodGet, path, ""); w.Code != 404 {
			t.Errorf("GET %s: %d", path, w.Code)
		}
	}
	if w := do(h, http.MethodGet, "/v1/models", ""); w.Code != 401 {
		t.Errorf("the API without a key: %d", w.Code)
	}

	opts.UI = false
	h = newHandler(t, opts, newFake())
	for _, path := range []string{"/", "/ui/app.js"} {
		w := do(h, http.MethodGet, path, "")
		if w.Code != 404 {
			t.Fatalf("--ui=false: GET %s: %d", path, w.Code)
		}
		if d := decodeError(t, w); d.Type == "" {
			t.Errorf("--ui=false: GET %s: %+v", path, d)
		}
	}
}

// The page needs nothing from elsewhere: no http(s) URL in its files but links
// in text, no inline script or style (the CSP forbids them).
func TestPlaygroundSelfContained(t *testing.T) {
	remote := regexp.MustCompile(`(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import|fetch\(\s*["']https?:`)
	err := fs.WalkDir(uiFiles, "ui", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(uiFiles, path)
		if err != nil {
			return err
		}
		if m := remote.Find(b); m != nil {
			t.Errorf("%s loads from elsewhere: %s", path, m)
		}
		if strings.HasSuffix(path, ".html") {
			s := string(b)
			if regexp.MustCompile(`<script>|<script [^>]*>[^<]`).MatchString(s) || strings.Contains(s, "<style") || strings.Contains(s, " style=") || regexp.MustCompile(` on[a-z]+=`).MatchString(s) {
				t.Errorf("%s has inline script or style", path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// /v1/models tells the page the server's default cache setting.
func TestModelsCacheDefault(t *testing.T) {
	fb := newFake()
	fb.info.CachePolicies = []ModelPolicy{{Policy: "full", Supported: true}, {Policy: "elastic", Supported: true}}
	opts := testOptions()
	opts.Cache = elasticcache.MustSpec(elasticcache.Config{Policy: elasticcache.H2O, Budget: 0.4, Sink: 2, Distance: -9, Selection: elasticcache.TextTailSelection})
	h := newHandler(t, opts, fb)
	w := do(h, http.MethodGet, "/v1/models", "")
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"default":{"policy":"h2o","budget":0.4,"selection":"text-tail","sink":2,"distance":-9}`) {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}
