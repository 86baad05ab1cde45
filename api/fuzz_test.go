package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"image"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// FuzzDecodeChatRequest: decoding and validation never panic, errors are
// 4xx, and in a valid plan every image ref fills its own image part and
// every image part has a ref; text never holds the marker.
func FuzzDecodeChatRequest(f *testing.F) {
	png := dataURLOf("image/png", pngBytes(f, 2, 2))
	for _, s := range []string{
		`{"messages":[{"role":"user","content":"hi"}]}`,
		`{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"` + png + `"}}]}],"stream":true,"stream_options":{"include_usage":true}}`,
		`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":"data:image/jpeg;base64,/9j/"}]}],"stop":["a","b"],"seed":-1}`,
		`{"messages":[{"role":"assistant","content":null}],"max_tokens":3,"temperature":0.2,"top_p":0.9,"top_k":5,"min_p":0.1,"repeat_penalty":1.1}`,
		`{"messages":[{"role":"developer","content":"x"}],"elastic_cache":{"policy":"h2o","budget":0.5,"sink":1,"distance":-3}}`,
		`{"messages":"x"}`, `[]`, `null`, `{"messages":[{"role":"user","content":[1]}]}`, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
	} {
		f.Add([]byte(s))
	}
	lim := planLimits{maxImages: 4, vision: true, marker: testMarker, cache: elasticcache.DefaultSpec()}
	s := &server{opts: Options{MaxImageBytes: 1 << 16, MaxImagePixels: 1 << 16}.withDefaults()}
	s.opts.MaxImageBytes, s.opts.MaxImagePixels = 1<<16, 1<<16
	f.Fuzz(func(t *testing.T, body []byte) {
		cr, aerr := decodeChatRequest(body)
		if aerr != nil {
			checkClientError(t, aerr)
			return
		}
		plan, aerr := planChat(cr, lim)
		if aerr != nil {
			checkClientError(t, aerr)
			return
		}
		imageParts := 0
		for i, m := range plan.req.Messages {
			for j, p := range m.Parts {
				if p.Field == "" {
					t.Fatalf("message %d part %d names no field", i, j)
				}
				switch p.Kind {
				case completion.PartImage:
					if imageParts >= len(plan.images) || plan.images[imageParts].param != p.Field {
						t.Fatalf("image part %d (%s) is not the plan's image %d", imageParts, p.Field, imageParts)
					}
					imageParts++
				case completion.PartText:
					if strings.Contains(p.Text, testMarker) {
						t.Fatalf("text part %q holds the marker", p.Text)
					}
				}
			}
		}
		if imageParts != len(plan.images) || len(plan.images) > lim.maxImages {
			t.Fatalf("%d image parts for %d images", imageParts, len(plan.images))
		}
		if plan.req.Cache.IsZero() || plan.req.Cache.Config().Validate() != nil {
			t.Fatalf("invalid cache setting passed: %+v", plan.req.Cache.Config())
		}
		imgs, aerr := s.loadImages(context.Background(), plan.images)
		if aerr != nil {
			checkClientError(t, aerr)
			return
		}
		if len(imgs) != len(plan.images) {
			t.Fatalf("%d images loaded for %d refs", len(imgs), len(plan.images))
		}
		plan.setImages(imgs)
		for i, img := range plan.req.Images() {
			if !bytes.Equal(img, imgs[i]) {
				t.Fatalf("image %d is not in its part", i)
			}
		}
	})
}

func checkClientError(t *testing.T, e *apiError) {
	t.Helper()
	if e.Status < 400 || e.Status >= 500 || e.Message == "" {
		t.Fatalf("unexpected error %+v", e)
	}
	if e.Status == http.StatusBadRequest && e.Type != typeInvalidRequest {
		t.Fatalf("400 with type %q", e.Type)
	}
}

// FuzzParseDataURL: never panics, never returns more than the limit, and
// round-trips what it accepts.
func FuzzParseDataURL(f *testing.F) {
	for _, s := range []string{
		"data:image/png;base64,iVBORw0KGgo=",
		"data:image/jpeg;base64,/9j/4AAQ",
		"data:;base64,",
		"data:image/png,abc",
		"DATA:image/webp;charset=x;base64,UklGRg",
		"data:image/png;base64,a-_b",
		"data:image/png;base64,QQ\r\n==",
		"http://example.com/a.png",
	} {
		f.Add(s, int64(16))
	}
	f.Fuzz(func(t *testing.T, s string, max int64) {
		if max < 0 {
			max = -max
		}
		max %= 1 << 20
		du, err := parseDataURL(s, max)
		if err != nil {
			return
		}
		if max > 0 && int64(len(du.Data)) > max {
			t.Fatalf("%d bytes over the limit %d", len(du.Data), max)
		}
		if du.MediaType != strings.ToLower(du.MediaType) {
			t.Fatalf("media type not lower-cased: %q", du.MediaType)
		}
		again, err := parseDataURL("data:"+du.MediaType+";base64,"+base64.StdEncoding.EncodeToString(du.Data), max)
		if err != nil || string(again.Data) != string(du.Data) {
			t.Fatalf("round trip failed: %v", err)
		}
	})
}

// FuzzCheckImage: image validation never panics, and what it accepts has a
// PNG, JPEG, WebP or GIF header within the pixel limit; what prepareImage
// hands the engine is then a PNG or JPEG (the body of which is the
// engine's to decode).
func FuzzCheckImage(f *testing.F) {
	good := pngBytes(f, 3, 2)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte("\xff\xd8\xff\xe0 not really a jpeg"))
	f.Add([]byte("GIF89a"))
	f.Add([]byte("GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"))
	f.Add(webpHeader(3, 2))
	if b, err := os.ReadFile("testdata/test12x8-lossless.webp"); err == nil {
		f.Add(b)
	}
	lim := imageLimits{MaxBytes: 1 << 16, MaxPixels: 1 << 12}
	f.Fuzz(func(t *testing.T, data []byte) {
		format, err := checkImage(data, "", lim)
		if err != nil {
			var p *imageProblem
			if !errors.As(err, &p) || p.msg == "" {
				t.Fatalf("error %v is not an imageProblem with a message", err)
			}
			return
		}
		cfg, _, derr := image.DecodeConfig(bytes.NewReader(data))
		if derr != nil || int64(cfg.Width)*int64(cfg.Height) > lim.MaxPixels || !acceptedFormat(format) {
			t.Fatalf("accepted %s %dx%d (%v)", format, cfg.Width, cfg.Height, derr)
		}
		out, err := prepareImage(data, "", lim)
		if err != nil {
			return // a corrupt WebP or GIF body
		}
		if _, f2, err := image.DecodeConfig(bytes.NewReader(out)); err != nil || (f2 != "png" && f2 != "jpeg") {
			t.Fatalf("the engine would get %q (%v)", f2, err)
		}
	})
}
