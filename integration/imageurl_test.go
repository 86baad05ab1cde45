package integration

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// imageHost serves images (and misbehaving variants) on loopback.
func imageHost(tb testing.TB) *httptest.Server {
	tb.Helper()
	png := redCircle(tb)
	mux := http.NewServeMux()
	mux.HandleFunc("/red.png", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		_, _ = w.Write(png)
	})
	mux.HandleFunc("/big.png", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		big := make([]byte, 70000) // over --max-image-bytes 65536
		copy(big, png)
		_, _ = w.Write(big)
	})
	mux.HandleFunc("/slow.png", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("/hop/{n}", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.PathValue("n"))
		if n <= 0 {
			http.Redirect(w, r, "/red.png", http.StatusFound)
			return
		}
		http.Redirect(w, r, fmt.Sprintf("/hop/%d", n-1), http.StatusFound)
	})
	mux.HandleFunc("/to-file", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "file:///etc/passwd", http.StatusFound)
	})
	srv := httptest.NewServer(mux)
	tb.Cleanup(srv.Close)
	return srv
}

func imageURLChat(tb testing.TB, url string) []byte {
	return chatWith(tb, map[string]any{"messages": userParts(textPart("What is it?"), imagePart(url))})
}

// TestImageURLs checks remote images when they are enabled: loopback (and
// other private) hosts are refused unless allowed, and with them allowed the
// size, time and redirect limits hold. Everything runs on 127.0.0.1.
func TestImageURLs(t *testing.T) {
	host := imageHost(t)
	const param = "messages[0].content[1].image_url.url"

	t.Run("private hosts refused", func(t *testing.T) {
		s := launch(t, serverSpec{vision: true, flags: []string{"--parallel", "1", "--ctx-size", "1024", "--allow-image-urls"}})
		r := request(t, http.MethodPost, s.URL+"/v1/chat/completions", imageURLChat(t, host.URL+"/red.png"), nil)
		e := parseError(t, r.Body)
		if r.Status != 400 || e.param() != param || e.code() != "invalid_image_url" || !strings.Contains(e.Message, "127.0.0.1") {
			t.Errorf("loopback image URL: %d %+v (message %q)", r.Status, e, e.Message)
		}
	})

	t.Run("limits", func(t *testing.T) {
		s := launch(t, serverSpec{vision: true, flags: []string{
			"--parallel", "1", "--ctx-size", "1024", "--allow-image-urls", "--allow-private-image-urls",
			"--image-url-timeout", "500ms", "--max-image-bytes", "65536",
		}})
		ok := request(t, http.MethodPost, s.URL+"/v1/chat/completions", imageURLChat(t, host.URL+"/red.png"), nil)
		if ok.Status != 200 || !strings.Contains(string(ok.Body), `"prompt_tokens"`) {
			t.Fatalf("fetching an allowed image URL: %d %s", ok.Status, clip(ok.Body))
		}
		within := request(t, http.MethodPost, s.URL+"/v1/chat/completions", imageURLChat(t, host.URL+"/hop/2"), nil)
		if within.Status != 200 {
			t.Errorf("two redirects: %d %s", within.Status, clip(within.Body))
		}
		cases := []struct {
			name, path string
			status     int
			code, msg  string
			param      string
		}{
			{"too many redirects", "/hop/6", 400, "invalid_image_url", "redirect", param},
			{"redirect to another scheme", "/to-file", 400, "invalid_image_url", "redirect", param},
			{"over the byte limit", "/big.png", 413, "image_too_large", "", "messages[0].content[1].image_url"},
			{"slower than the timeout", "/slow.png", 400, "invalid_image_url", "timed out|deadline|timeout", param},
			{"not found", "/missing.png", 400, "invalid_image_url", "404", param},
		}
		for _, tc := range cases {
			t0 := time.Now()
			r := request(t, http.MethodPost, s.URL+"/v1/chat/completions", imageURLChat(t, host.URL+tc.path), nil)
			e := parseError(t, r.Body)
			if r.Status != tc.status || e.code() != tc.code || e.param() != tc.param {
				t.Errorf("%s: %d %+v (message %q)", tc.name, r.Status, e, e.Message)
			}
			if tc.msg != "" && !regexp.MustCompile("(?i)"+tc.msg).MatchString(e.Message) {
				t.Errorf("%s: message %q does not match %q", tc.name, e.Message, tc.msg)
			}
			if tc.path == "/slow.png" {
				t.Logf("slow image URL refused after %v (--image-url-timeout 500ms)", time.Since(t0).Round(time.Millisecond))
			}
		}
		waitIdle(t, s, nil, 5*time.Second)
	})
}
