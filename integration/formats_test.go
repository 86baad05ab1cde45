package integration

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"image"
	"image/color"
	"image/draw"
	"image/gif"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"golang.org/x/image/webp"
)

// examplePictures returns the README's picture (models/demo/example.png)
// as PNG, WebP and GIF, the same pixels in each.
//
// testdata/example.webp cannot be made with golang.org/x/image (it only
// decodes); it was made once with Debian's cwebp 1.2.4 (apt-get install
// webp), losslessly:
//
//	cwebp -lossless -exact models/demo/example.png -o integration/testdata/example.webp
//
// The GIF is made here: the picture has 3 colours, so a palette of exactly
// those loses nothing.
func examplePictures(tb testing.TB) (pngPic, webpPic, gifPic []byte) {
	tb.Helper()
	pngPic, err := os.ReadFile(filepath.Join(repoRoot, "models", "demo", "example.png"))
	if err != nil {
		tb.Fatal(err)
	}
	webpPic, err = os.ReadFile(filepath.Join(repoRoot, "integration", "testdata", "example.webp"))
	if err != nil {
		tb.Fatal(err)
	}
	img, _, err := image.Decode(bytes.NewReader(pngPic))
	if err != nil {
		tb.Fatal(err)
	}
	// The fixture must really be the same picture, or the test proves nothing.
	wimg, err := webp.Decode(bytes.NewReader(webpPic))
	if err != nil {
		tb.Fatal(err)
	}
	if !samePixels(img, wimg) {
		tb.Fatal("testdata/example.webp is not the pixels of models/demo/example.png")
	}
	var pal color.Palette
	seen := map[color.Color]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			c := color.NRGBAModel.Convert(img.At(x, y))
			if !seen[c] {
				seen[c] = true
				pal = append(pal, c)
			}
		}
	}
	if len(pal) > 256 {
		tb.Fatalf("example.png has %d colours; a GIF holds 256", len(pal))
	}
	pm := image.NewPaletted(b, pal)
	draw.Draw(pm, b, img, b.Min, draw.Src)
	var buf bytes.Buffer
	if err := gif.Encode(&buf, pm, nil); err != nil {
		tb.Fatal(err)
	}
	if g, err := gif.Decode(bytes.NewReader(buf.Bytes())); err != nil || !samePixels(img, g) {
		tb.Fatalf("the GIF is not the picture (%v)", err)
	}
	return pngPic, webpPic, buf.Bytes()
}

func samePixels(a, b image.Image) bool {
	ab, bb := a.Bounds(), b.Bounds()
	if ab.Size() != bb.Size() {
		return false
	}
	for y := 0; y < ab.Dy(); y++ {
		for x := 0; x < ab.Dx(); x++ {
			if color.NRGBAModel.Convert(a.At(ab.Min.X+x, ab.Min.Y+y)) != color.NRGBAModel.Convert(b.At(bb.Min.X+x, bb.Min.Y+y)) {
				return false
			}
		}
	}
	return true
}

// webpBomb is an extended (VP8X) WebP header claiming a w x h canvas, with
// nothing after it: refused from the header alone.
func webpBomb(w, h int) []byte {
	b := []byte("RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00")
	b = append(b, byte(w-1), byte((w-1)>>8), byte((w-1)>>16), byte(h-1), byte((h-1)>>8), byte((h-1)>>16))
	binary.LittleEndian.PutUint32(b[4:8], uint32(len(b)-8))
	return b
}

// gifBomb is a GIF header claiming a w x h screen, with no frame.
func gifBomb(w, h int) []byte {
	b := []byte("GIF89a\x00\x00\x00\x00\x00\x00\x00;")
	binary.LittleEndian.PutUint16(b[6:8], uint16(w))
	binary.LittleEndian.PutUint16(b[8:10], uint16(h))
	return b
}

// TestWebPAndGIFAnswerLikePNG: the demo model, asked about the README's
// picture as PNG, answers " red" (TestAnswerDependsOnImage); the same
// picture as WebP (with detail "original") and as GIF must get the same
// answer from the same number of prompt tokens: the server decodes them
// and hands the engine the same pixels.
func TestWebPAndGIFAnswerLikePNG(t *testing.T) {
	s := sharedServer(t, "demo", demoSpec())
	c := sdkClient(s, "")
	model := servedModel(t, c)
	pngPic, webpPic, gifPic := examplePictures(t)
	const question = "What color is the circle?"
	type answer struct {
		text   string
		prompt int64
	}
	ask := func(mediaType string, pic []byte, detail string) answer {
		t.Helper()
		resp, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model: model,
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
				openai.TextContentPart(question),
				openai.ImageContentPart(openai.ChatCompletionContentPartImageImageURLParam{
					URL: "data:" + mediaType + ";base64," + base64.StdEncoding.EncodeToString(pic), Detail: detail}),
			})},
			MaxTokens:   openai.Int(8),
			Temperature: openai.Float(0),
		}, option.WithJSONSet("elastic_cache", map[string]any{"policy": "full"}))
		if err != nil {
			t.Fatalf("%s: %v", mediaType, err)
		}
		return answer{resp.Choices[0].Message.Content, resp.Usage.PromptTokens}
	}
	want := ask("image/png", pngPic, "")
	if want.text != " red" {
		t.Fatalf("the PNG answered %q, want \" red\"", want.text)
	}
	for _, tc := range []struct {
		name, mediaType string
		pic             []byte
		detail          string
	}{
		{"WebP", "image/webp", webpPic, "original"},
		{"GIF", "image/gif", gifPic, ""},
	} {
		if got := ask(tc.mediaType, tc.pic, tc.detail); got != want {
			t.Errorf("%s answered %q from %d prompt tokens; the PNG %q from %d", tc.name, got.text, got.prompt, want.text, want.prompt)
		}
	}
}

// TestCORSPreflight: a server started with --cors-origins answers a
// browser's preflight, which carries no API key, before auth, allowing the
// OpenAI JS SDK's headers for the listed origin only; the real call then
// carries Access-Control-Allow-Origin and exposes X-Request-Id.
func TestCORSPreflight(t *testing.T) {
	const app = "https://app.example"
	s := launch(t, serverSpec{flags: []string{"--parallel", "1", "--ctx-size", "1024", "--api-key", testAPIKey, "--cors-origins", app + ",http://localhost:5173"}})
	preflight := func(origin string) response {
		return send(t, http.MethodOptions, s.URL+"/v1/chat/completions", nil, map[string]string{
			"Origin":                         origin,
			"Access-Control-Request-Method":  "POST",
			"Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang,x-stainless-os,x-stainless-retry-count,openai-project",
		})
	}
	r := preflight(app)
	if r.Status != http.StatusOK && r.Status != http.StatusNoContent {
		t.Fatalf("preflight: status %d %s", r.Status, r.Body)
	}
	if got := r.Header.Get("Access-Control-Allow-Origin"); got != app {
		t.Errorf("preflight: Access-Control-Allow-Origin %q, want %q", got, app)
	}
	allowed := strings.ToLower(r.Header.Get("Access-Control-Allow-Headers"))
	for _, h := range []string{"authorization", "content-type", "x-stainless-os", "openai-project"} {
		if !strings.Contains(allowed, h) {
			t.Errorf("preflight: Access-Control-Allow-Headers %q lacks %s", allowed, h)
		}
	}
	if r := preflight("https://evil.example"); r.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("preflight from an origin not listed got Access-Control-Allow-Origin %q", r.Header.Get("Access-Control-Allow-Origin"))
	}
	real := request(t, http.MethodPost, s.URL+"/v1/chat/completions", mustJSON(t, textChat("hi", 1, nil)),
		map[string]string{"Origin": app, "Authorization": "Bearer " + testAPIKey})
	if real.Status != http.StatusOK || real.Header.Get("Access-Control-Allow-Origin") != app {
		t.Fatalf("the call after the preflight: status %d, Access-Control-Allow-Origin %q", real.Status, real.Header.Get("Access-Control-Allow-Origin"))
	}
	if exp := strings.ToLower(real.Header.Get("Access-Control-Expose-Headers")); !strings.Contains(exp, "x-request-id") || !strings.Contains(exp, "retry-after") {
		t.Errorf("Access-Control-Expose-Headers %q", exp)
	}
}

// TestTokenizeCountsLikeUsage: /tokenize with a chat body holding an image
// (and one forcing a tool call) counts what the chat completion of the same
// body reports as prompt_tokens; content round-trips through /tokenize and
// /detokenize.
func TestTokenizeCountsLikeUsage(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	question := textPart("What colour is the circle?")
	textOnly := mustJSON(t, map[string]any{"messages": userParts(question)})
	var textCount struct{ Count int }
	if r := request(t, http.MethodPost, s.URL+"/v1/tokenize", textOnly, nil); r.Status != http.StatusOK || json.Unmarshal(r.Body, &textCount) != nil {
		t.Fatalf("/v1/tokenize: %d %s", r.Status, r.Body)
	}
	weather := []any{map[string]any{"type": "function", "function": map[string]any{"name": "get_weather",
		"parameters": map[string]any{"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string"}}}}}}
	for _, tc := range []struct {
		name string
		body map[string]any
	}{
		{"one image", map[string]any{"messages": userParts(question, imagePart("data:image/png;base64,"+b64(redCircle(t))))}},
		// A forced tool call starts the answer with a prefix the engine
		// writes into the prompt: it is counted too.
		{"one image and a forced tool call", map[string]any{"messages": userParts(question, imagePart("data:image/png;base64,"+b64(redCircle(t)))),
			"tools": weather, "tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "get_weather"}}}},
	} {
		tc.body["max_tokens"], tc.body["temperature"] = 1, 0
		body := mustJSON(t, tc.body)
		r := request(t, http.MethodPost, s.URL+"/tokenize", body, nil)
		var counted struct {
			Count  int             `json:"count"`
			Tokens json.RawMessage `json:"tokens"`
		}
		if r.Status != http.StatusOK || json.Unmarshal(r.Body, &counted) != nil {
			t.Fatalf("%s: /tokenize: %d %s", tc.name, r.Status, r.Body)
		}
		r = request(t, http.MethodPost, s.URL+"/v1/chat/completions", body, nil)
		var done struct {
			Usage struct {
				PromptTokens int `json:"prompt_tokens"`
			} `json:"usage"`
		}
		if r.Status != http.StatusOK || json.Unmarshal(r.Body, &done) != nil {
			t.Fatalf("%s: chat: %d %s", tc.name, r.Status, r.Body)
		}
		// The image's tokens are counted: more than the same chat without it.
		if counted.Count != done.Usage.PromptTokens || counted.Count <= textCount.Count || counted.Tokens != nil {
			t.Errorf("%s: /tokenize counted %d (tokens %s), the completion reported %d prompt tokens, the text alone %d",
				tc.name, counted.Count, counted.Tokens, done.Usage.PromptTokens, textCount.Count)
		}
	}

	const text = "Hello world, what a circle"
	var tok struct {
		Tokens []int32 `json:"tokens"`
		Count  int     `json:"count"`
	}
	if r := request(t, http.MethodPost, s.URL+"/tokenize", mustJSON(t, map[string]any{"content": text}), nil); r.Status != http.StatusOK || json.Unmarshal(r.Body, &tok) != nil {
		t.Fatalf("/tokenize content: %d %s", r.Status, r.Body)
	}
	if len(tok.Tokens) == 0 || tok.Count != len(tok.Tokens) {
		t.Fatalf("/tokenize content: %d tokens, count %d", len(tok.Tokens), tok.Count)
	}
	var detok struct{ Content string }
	if r := request(t, http.MethodPost, s.URL+"/v1/detokenize", mustJSON(t, map[string]any{"tokens": tok.Tokens}), nil); r.Status != http.StatusOK || json.Unmarshal(r.Body, &detok) != nil {
		t.Fatalf("/detokenize: %d %s", r.Status, r.Body)
	}
	if detok.Content != text {
		t.Errorf("detokenize(tokenize(%q)) = %q", text, detok.Content)
	}
	var pieces struct {
		Tokens []struct {
			ID    int32  `json:"id"`
			Piece string `json:"piece"`
		} `json:"tokens"`
	}
	if r := request(t, http.MethodPost, s.URL+"/tokenize", mustJSON(t, map[string]any{"content": text, "with_pieces": true}), nil); r.Status != http.StatusOK || json.Unmarshal(r.Body, &pieces) != nil {
		t.Fatalf("/tokenize with_pieces: %d %s", r.Status, r.Body)
	}
	var joined strings.Builder
	for i, p := range pieces.Tokens {
		if i >= len(tok.Tokens) || p.ID != tok.Tokens[i] {
			t.Fatalf("with_pieces ids differ from the plain answer at %d", i)
		}
		joined.WriteString(p.Piece)
	}
	// A SentencePiece vocabulary (the test model's) marks the first word with
	// the space it adds in front; detokenize drops it, the pieces keep it.
	if got := strings.TrimPrefix(joined.String(), " "); got != text {
		t.Errorf("the pieces join to %q, want %q", joined.String(), text)
	}
}
