package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseDataURL(t *testing.T) {
	payload := []byte("\x89PNG\r\n\x1a\nabcdefgh")
	std := base64.StdEncoding.EncodeToString(payload)
	tests := []struct {
		name    string
		in      string
		max     int64
		mt      string
		err     error // nil: success
		wantLen int
	}{
		{"png", "data:image/png;base64," + std, 0, "image/png", nil, len(payload)},
		{"upper case", "DATA:IMAGE/PNG;BASE64," + std, 0, "image/png", nil, len(payload)},
		{"jpeg with params", "data:image/jpeg;name=x.jpg;base64," + std, 0, "image/jpeg", nil, len(payload)},
		{"no media type", "data:;base64," + std, 0, "", nil, len(payload)},
		{"unpadded", "data:image/png;base64," + strings.TrimRight(std, "="), 0, "image/png", nil, len(payload)},
		{"url alphabet", "data:image/png;base64," + base64.URLEncoding.EncodeToString([]byte{0xfb, 0xff, 0xfe}), 0, "image/png", nil, 3},
		{"wrapped lines", "data:image/png;base64," + std[:8] + "\r\n" + std[8:], 0, "image/png", nil, len(payload)},
		{"exactly at limit", "data:image/png;base64," + std, int64(len(payload)), "image/png", nil, len(payload)},
		{"over limit", "data:image/png;base64," + std, int64(len(payload) - 1), "", errTooLarge, 0},
		{"far over limit", "data:image/png;base64," + strings.Repeat("A", 4000), 100, "", errTooLarge, 0},
		{"not data", "http://x/y.png", 0, "", errNotDataURL, 0},
		{"too short", "dat", 0, "", errNotDataURL, 0},
		{"no comma", "data:image/png;base64", 0, "", errDataURLSyntax, 0},
		{"not base64", "data:image/png," + std, 0, "", errNotBase64, 0},
		{"bad base64", "data:image/png;base64,@@@@", 0, "", errBadBase64, 0},
		{"bad padding", "data:image/png;base64,QQ=", 0, "", errBadBase64, 0},
		{"empty payload", "data:image/png;base64,", 0, "image/png", nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			du, err := parseDataURL(tt.in, tt.max)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if du.MediaType != tt.mt || len(du.Data) != tt.wantLen {
				t.Fatalf("got %q len %d", du.MediaType, len(du.Data))
			}
		})
	}
}

func TestCheckImage(t *testing.T) {
	p, j := pngBytes(t, 10, 10), jpegBytes(t, 16, 8)
	lim := imageLimits{MaxBytes: 1 << 20, MaxPixels: 1000}
	tests := []struct {
		name     string
		data     []byte
		lim      imageLimits
		format   string // "" : must fail
		tooLarge bool
		msg      string
	}{
		{"png", p, lim, "png", false, ""},
		{"jpeg", j, lim, "jpeg", false, ""},
		{"empty", nil, lim, "", false, "empty"},
		{"text", []byte("plain text, not an image"), lim, "", false, "not a PNG, JPEG, WebP or GIF"},
		{"bmp", []byte("BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00"), lim, "", false, "image/bmp images are not supported; send PNG, JPEG, WebP or GIF"},
		// WebP and GIF are taken now; their headers are checked here, their
		// bodies by engineImage (TestPrepareImage).
		{"gif header", []byte("GIF89a\x01\x00\x01\x00\x00\x00\x00;"), lim, "gif", false, ""},
		{"webp cut inside the header", []byte("RIFF\x1a\x00\x00\x00WEBPVP8 \x00\x00"), lim, "", false, "webp image header is corrupt"},
		{"webp too many pixels", webpHeader(100, 100), lim, "", false, "webp image is 100x100 = 10000 pixels"},
		{"gif too many pixels", gifHeader(100, 100), lim, "", false, "gif image is 100x100 = 10000 pixels"},
		// Only the header is read here; the engine refuses a bad body.
		{"truncated png", p[:len(p)/2], lim, "png", false, ""},
		{"truncated jpeg", j[:len(j)-20], lim, "jpeg", false, ""},
		{"png header only", p[:33], lim, "png", false, ""},
		{"png cut inside the header", p[:20], lim, "", false, "corrupt"},
		{"too many bytes", p, imageLimits{MaxBytes: 10, MaxPixels: 1000}, "", true, "bytes"},
		{"too many pixels", p, imageLimits{MaxBytes: 1 << 20, MaxPixels: 99}, "", false, "pixels"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			format, err := checkImage(tt.data, "", tt.lim)
			if tt.format != "" {
				if err != nil || format != tt.format {
					t.Fatalf("got %q, %v", format, err)
				}
				return
			}
			var ip *imageProblem
			if !errors.As(err, &ip) {
				t.Fatalf("err = %v, want an imageProblem", err)
			}
			if ip.tooLarge != tt.tooLarge || !strings.Contains(ip.msg, tt.msg) {
				t.Fatalf("problem %+v, want tooLarge=%v msg~%q", ip, tt.tooLarge, tt.msg)
			}
		})
	}
}

// A PNG header claiming a huge canvas is refused before any pixel memory is used.
func TestDecompressionBomb(t *testing.T) {
	p := pngBytes(t, 1, 1)
	bomb := append([]byte(nil), p...)
	// IHDR width/height live at bytes 16..24; claim 60000x60000 and fix the
	// chunk CRC (over type and data, bytes 12..29).
	copy(bomb[16:24], []byte{0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60})
	binary.BigEndian.PutUint32(bomb[29:33], crc32.ChecksumIEEE(bomb[12:29]))
	_, err := checkImage(bomb, "image/png", imageLimits{MaxBytes: 1 << 20, MaxPixels: 16777216})
	if err == nil || !strings.Contains(err.Error(), "pixels") {
		t.Fatalf("err = %v", err)
	}
}

func TestBlockedAddr(t *testing.T) {
	for addr, blocked := range map[string]bool{
		"127.0.0.1": true, "10.1.2.3": true, "172.16.0.1": true, "192.168.1.1": true, "169.254.169.254": true,
		"0.0.0.0": true, "100.64.0.1": true, "224.0.0.1": true, "255.255.255.255": true,
		"::1": true, "::": true, "fe80::1": true, "fc00::1": true, "::ffff:127.0.0.1": true, "::ffff:10.0.0.1": true,
		"64:ff9b::a00:1": true, "ff02::1": true,
		"8.8.8.8": false, "1.1.1.1": false, "2606:4700:4700::1111": false, "::ffff:8.8.8.8": false,
	} {
		if got := blockedAddr(netip.MustParseAddr(addr)); got != blocked {
			t.Errorf("blockedAddr(%s) = %v, want %v", addr, got, blocked)
		}
	}
}

// imageServer serves a PNG at /img.png, a redirect loop at /loop, a 404 at
// /missing, a big body at /big and a redirect to the image at /hop.
func imageServer(t *testing.T, img []byte) *httptest.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/img.png", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		_, _ = w.Write(img)
	})
	mux.HandleFunc("/hop", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/img.png", http.StatusFound) })
	mux.HandleFunc("/loop", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/loop", http.StatusFound) })
	mux.HandleFunc("/big", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		// No Content-Length (flushed): the limit must hold while reading.
		w.(http.Flusher).Flush()
		_, _ = w.Write(bytes.Repeat([]byte{1}, 3<<20))
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestImageURLs(t *testing.T) {
	img := pngBytes(t, 12, 12)
	srv := imageServer(t, img)
	tests := []struct {
		name         string
		allowPrivate bool
		path         string
		status       int
		code         string
		msg          string
	}{
		{"private refused", false, "/img.png", 400, "invalid_image_url", "non-public address"},
		{"private allowed", true, "/img.png", 200, "", ""},
		{"one redirect", true, "/hop", 200, "", ""},
		{"redirect loop", true, "/loop", 400, "invalid_image_url", "redirects"},
		{"http 404", true, "/missing", 400, "invalid_image_url", "HTTP 404"},
		{"too big", true, "/big", 413, "image_too_large", ""},
		{"timeout", true, "/slow", 400, "invalid_image_url", "timed out"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := testOptions()
			opts.AllowImageURLs = true
			opts.AllowPrivateImageURLs = tt.allowPrivate
			opts.ImageURLTimeout = 300 * time.Millisecond
			fb := newFake()
			h := newHandler(t, opts, fb)
			w := postChat(h, chatBody(t, map[string]any{"messages": userParts(textPart("see"), imagePart(srv.URL+tt.path))}))
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			if tt.status == 200 {
				if got := fb.lastRequest(t).Images(); len(got) != 1 || !bytes.Equal(got[0], img) {
					t.Fatal("fetched image did not reach the backend intact")
				}
				return
			}
			e := decodeError(t, w)
			if str(e.Code) != tt.code || !strings.Contains(e.Message, tt.msg) {
				t.Fatalf("error %s", w.Body)
			}
		})
	}
}

func TestFetcherRejectsSchemes(t *testing.T) {
	f := newImageFetcher(time.Second, 1<<20, false)
	for _, u := range []string{"file:///etc/passwd", "gopher://x", "http://", "::bad"} {
		if _, _, err := f.fetch(context.Background(), u); err == nil {
			t.Errorf("fetch(%q) succeeded", u)
		}
	}
}
