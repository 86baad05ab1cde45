package api

import (
	"bytes"
	"encoding/binary"
	"errors"
	"image"
	"image/color"
	"image/draw"
	"image/gif"
	"image/png"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
)

// The WebP fixtures cannot be made with golang.org/x/image (it only
// decodes). They were made once with Debian's cwebp 1.2.4 (apt-get install
// webp) from testImage(12, 8) written as PNG:
//
//	cwebp -lossless -exact test12x8.png -o testdata/test12x8-lossless.webp
//	cwebp -q 80 test12x8.png -o testdata/test12x8-lossy.webp
func readFixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// webpHeader is an extended (VP8X) WebP header claiming a w x h canvas and
// nothing after it: a decompression bomb's shape, which only a check of
// the header alone refuses as too large (a decode would call it corrupt).
func webpHeader(w, h int) []byte {
	b := []byte("RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00")
	b = append(b, byte(w-1), byte((w-1)>>8), byte((w-1)>>16), byte(h-1), byte((h-1)>>8), byte((h-1)>>16))
	binary.LittleEndian.PutUint32(b[4:8], uint32(len(b)-8))
	return b
}

// gifHeader is a GIF header (no colour table, no frame) claiming a w x h
// logical screen.
func gifHeader(w, h int) []byte {
	b := []byte("GIF89a\x00\x00\x00\x00\x00\x00\x00")
	binary.LittleEndian.PutUint16(b[6:8], uint16(w))
	binary.LittleEndian.PutUint16(b[8:10], uint16(h))
	return b
}

// exactPalette is every colour of img (at most 256 for the pictures
// here), so a GIF of img loses nothing.
func exactPalette(t *testing.T, img image.Image) color.Palette {
	t.Helper()
	seen := map[color.RGBA]bool{}
	var p color.Palette
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			c := color.RGBAModel.Convert(img.At(x, y)).(color.RGBA)
			if !seen[c] {
				seen[c] = true
				p = append(p, c)
			}
		}
	}
	if len(p) > 256 {
		t.Fatalf("%d colours do not fit a GIF palette", len(p))
	}
	return p
}

func paletted(t *testing.T, img image.Image) *image.Paletted {
	pm := image.NewPaletted(img.Bounds(), exactPalette(t, img))
	draw.Draw(pm, pm.Bounds(), img, img.Bounds().Min, draw.Src)
	return pm
}

func gifOf(t *testing.T, g *gif.GIF) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := gif.EncodeAll(&b, g); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// samePixels fails unless a and b show the same RGBA colour at every pixel
// (their bounds' origins may differ).
func samePixels(t *testing.T, got, want image.Image) {
	t.Helper()
	gb, wb := got.Bounds(), want.Bounds()
	if gb.Dx() != wb.Dx() || gb.Dy() != wb.Dy() {
		t.Fatalf("size %v, want %v", gb.Size(), wb.Size())
	}
	for y := 0; y < wb.Dy(); y++ {
		for x := 0; x < wb.Dx(); x++ {
			g := color.NRGBAModel.Convert(got.At(gb.Min.X+x, gb.Min.Y+y))
			w := color.NRGBAModel.Convert(want.At(wb.Min.X+x, wb.Min.Y+y))
			if g != w {
				t.Fatalf("pixel (%d,%d) = %v, want %v", x, y, g, w)
			}
		}
	}
}

// TestPrepareImage: PNG and JPEG reach the engine as sent; WebP and GIF
// reach it as a PNG of the same pixels (GIF: the first frame on its
// screen); limits are checked on the header, a bad body is an
// invalid_image.
func TestPrepareImage(t *testing.T) {
	pic := testImage(12, 8)
	pngPic, jpegPic := pngBytes(t, 12, 8), jpegBytes(t, 12, 8)
	lossless, lossy := readFixture(t, "test12x8-lossless.webp"), readFixture(t, "test12x8-lossy.webp")

	stillGIF := gifOf(t, &gif.GIF{Image: []*image.Paletted{paletted(t, pic)}, Delay: []int{0}})
	// Two frames: only the first is the picture.
	blue := image.NewUniform(color.RGBA{B: 255, A: 255})
	second := image.NewPaletted(pic.Bounds(), color.Palette{color.RGBA{B: 255, A: 255}})
	draw.Draw(second, second.Bounds(), blue, image.Point{}, draw.Src)
	animated := gifOf(t, &gif.GIF{Image: []*image.Paletted{paletted(t, pic), second}, Delay: []int{10, 10}})
	// A first frame covering part of a 20x10 screen, at (3, 1): the rest of
	// the screen is transparent.
	offset := paletted(t, pic)
	offset.Rect = offset.Rect.Add(image.Pt(3, 1))
	partial := gifOf(t, &gif.GIF{Image: []*image.Paletted{offset}, Delay: []int{0},
		Config: image.Config{Width: 20, Height: 10, ColorModel: offset.Palette}})
	onScreen := image.NewNRGBA(image.Rect(0, 0, 20, 10))
	draw.Draw(onScreen, image.Rect(3, 1, 15, 9), pic, image.Point{}, draw.Src)

	lim := imageLimits{MaxBytes: 1 << 20, MaxPixels: 1000}
	tests := []struct {
		name string
		data []byte
		lim  imageLimits
		same bool        // the bytes pass unchanged
		want image.Image // else: the PNG must show these pixels (nil: only its size is checked)
		size image.Point
		code string // "" : must succeed; "413" for the byte limit
		msg  string
	}{
		{name: "png as sent", data: pngPic, lim: lim, same: true},
		{name: "jpeg as sent", data: jpegPic, lim: lim, same: true},
		{name: "lossless webp", data: lossless, lim: lim, want: pic},
		// Lossy WebP changes the pixels; only the size is the picture's.
		{name: "lossy webp", data: lossy, lim: lim, size: image.Pt(12, 8)},
		{name: "gif", data: stillGIF, lim: lim, want: pic},
		{name: "animated gif: first frame", data: animated, lim: lim, want: pic},
		{name: "gif frame smaller than its screen", data: partial, lim: lim, want: onScreen},

		{name: "webp over the pixel limit", data: lossless, lim: imageLimits{MaxBytes: 1 << 20, MaxPixels: 95}, code: "image_too_large", msg: "12x8 = 96 pixels"},
		{name: "gif over the pixel limit", data: stillGIF, lim: imageLimits{MaxBytes: 1 << 20, MaxPixels: 95}, code: "image_too_large", msg: "12x8 = 96 pixels"},
		{name: "webp bomb header", data: webpHeader(16000, 16000), lim: imageLimits{MaxBytes: 1 << 20, MaxPixels: 16777216}, code: "image_too_large", msg: "16000x16000"},
		{name: "gif bomb header", data: gifHeader(65535, 65535), lim: imageLimits{MaxBytes: 1 << 20, MaxPixels: 16777216}, code: "image_too_large", msg: "65535x65535"},
		{name: "webp over the byte limit", data: lossless, lim: imageLimits{MaxBytes: int64(len(lossless) - 1), MaxPixels: 1000}, code: "413", msg: "bytes"},
		{name: "truncated webp", data: lossless[:len(lossless)-10], lim: lim, code: "invalid_image", msg: "webp image is truncated or corrupt"},
		{name: "truncated gif", data: stillGIF[:len(stillGIF)/2], lim: lim, code: "invalid_image", msg: "gif image is truncated or corrupt"},
		{name: "gif without a frame", data: append(gifHeader(4, 4), ';'), lim: lim, code: "invalid_image", msg: "gif image is truncated or corrupt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := prepareImage(tt.data, "", tt.lim)
			if tt.code != "" {
				var ip *imageProblem
				if !errors.As(err, &ip) {
					t.Fatalf("err = %v, want an imageProblem", err)
				}
				code := ip.code
				if code == "" {
					code = "invalid_image"
				}
				if ip.tooLarge {
					code = "413"
				}
				if code != tt.code || !strings.Contains(ip.msg, tt.msg) {
					t.Fatalf("problem %+v, want code %s and a message with %q", ip, tt.code, tt.msg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.same {
				if !bytes.Equal(out, tt.data) {
					t.Fatal("the bytes were changed")
				}
				return
			}
			// What the engine gets must be a PNG (stb_image has no WebP).
			if !bytes.HasPrefix(out, []byte("\x89PNG\r\n\x1a\n")) {
				t.Fatalf("engine bytes are not a PNG: % x", out[:min(8, len(out))])
			}
			got, err := png.Decode(bytes.NewReader(out))
			if err != nil {
				t.Fatal(err)
			}
			if tt.want != nil {
				samePixels(t, got, tt.want)
			} else if got.Bounds().Size() != tt.size {
				t.Fatalf("size %v, want %v", got.Bounds().Size(), tt.size)
			}
		})
	}
}

// A chat with WebP and GIF images (data URLs of either declared type, and
// a fetched URL) hands the engine PNGs; detail "original" is accepted.
func TestChatWebPAndGIF(t *testing.T) {
	lossless := readFixture(t, "test12x8-lossless.webp")
	stillGIF := gifOf(t, &gif.GIF{Image: []*image.Paletted{paletted(t, testImage(12, 8))}, Delay: []int{0}})
	mux := http.NewServeMux()
	mux.HandleFunc("/pic.webp", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "image/webp")
		_, _ = w.Write(lossless)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	opts := testOptions()
	opts.AllowImageURLs, opts.AllowPrivateImageURLs = true, true
	fb := newFake()
	h := newHandler(t, opts, fb)
	original := map[string]any{"type": "image_url", "image_url": map[string]any{"url": dataURLOf("image/webp", lossless), "detail": "original"}}
	w := postChat(h, chatBody(t, map[string]any{"messages": userParts(textPart("see"), original,
		imagePart(dataURLOf("image/gif", stillGIF)),
		imagePart(dataURLOf("image/png", lossless)), // the bytes decide, not the declared type
		imagePart(srv.URL+"/pic.webp"))}))
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	imgs := fb.lastRequest(t).Images()
	if len(imgs) != 4 {
		t.Fatalf("%d images reached the engine, want 4", len(imgs))
	}
	for i, b := range imgs {
		got, err := png.Decode(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("image %d is not a PNG: %v", i, err)
		}
		samePixels(t, got, testImage(12, 8))
	}
}

// Bad WebP and GIF images are refused naming the part, before the engine.
func TestChatBadWebPAndGIF(t *testing.T) {
	lossless := readFixture(t, "test12x8-lossless.webp")
	tests := []struct {
		name   string
		url    string
		status int
		param  string
		code   string
		msg    string
	}{
		{"corrupt webp", dataURLOf("image/webp", lossless[:len(lossless)-10]), 400, "messages[0].content[1].image_url", "invalid_image", "webp image is truncated or corrupt"},
		{"webp over the pixel limit", dataURLOf("image/webp", webpHeader(2000, 2000)), 400, "messages[0].content[1].image_url", "image_too_large", "2000x2000"},
		{"gif over the pixel limit", dataURLOf("image/gif", gifHeader(2000, 2000)), 400, "messages[0].content[1].image_url", "image_too_large", "2000x2000"},
		{"bmp declared", dataURLOf("image/bmp", lossless), 400, "messages[0].content[1].image_url.url", "unsupported_image", "send PNG, JPEG, WebP or GIF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fb := newFake()
			h := newHandler(t, testOptions(), fb) // 1<<20 pixels at most
			w := postChat(h, chatBody(t, map[string]any{"messages": userParts(textPart("see"), imagePart(tt.url))}))
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			e := decodeError(t, w)
			if str(e.Param) != tt.param || str(e.Code) != tt.code || !strings.Contains(e.Message, tt.msg) {
				t.Fatalf("error %s, want param %s code %s message ~%q", w.Body, tt.param, tt.code, tt.msg)
			}
			if fb.submitted() != 0 {
				t.Fatal("a bad image reached the engine")
			}
		})
	}
}
