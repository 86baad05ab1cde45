package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"image"
	"image/draw"
	"image/gif"    // GIF is decoded here (its first frame) and handed on as PNG
	_ "image/jpeg" // registers the JPEG decoder
	"image/png"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"

	"golang.org/x/image/webp" // the engine's image loader (stb_image) has no WebP decoder
)

// ---- data URLs ----

// errNotBase64 etc. are the data URL problems parseDataURL reports.
var (
	errNotDataURL    = errors.New("not a data URL")
	errDataURLSyntax = errors.New("malformed data URL: want data:<image type>;base64,<data>, e.g. data:image/png;base64,...")
	errNotBase64     = errors.New("data URL is not base64-encoded (want ;base64,)")
	errBadBase64     = errors.New("data URL payload is not valid base64")
	errTooLarge      = errors.New("image is too large")
)

// dataURL is a parsed data: URL.
type dataURL struct {
	MediaType string // lower case, e.g. "image/png"
	Data      []byte
}

// parseDataURL decodes "data:<mediatype>[;params];base64,<payload>". The
// payload is rejected with errTooLarge before decoding when its decoded size
// would exceed maxBytes (maxBytes <= 0: no limit).
func parseDataURL(s string, maxBytes int64) (*dataURL, error) {
	if len(s) < 5 || !strings.EqualFold(s[:5], "data:") {
		return nil, errNotDataURL
	}
	meta, payload, ok := strings.Cut(s[5:], ",")
	if !ok {
		return nil, errDataURLSyntax
	}
	params := strings.Split(meta, ";")
	mediaType := strings.ToLower(strings.TrimSpace(params[0]))
	isBase64 := false
	for _, p := range params[1:] {
		if strings.EqualFold(strings.TrimSpace(p), "base64") {
			isBase64 = true
		}
	}
	if !isBase64 {
		return nil, errNotBase64
	}
	payload = stripSpace(payload)
	if maxBytes > 0 && int64(base64.StdEncoding.DecodedLen(len(payload))) > maxBytes+2 {
		return nil, errTooLarge
	}
	data, err := decodeBase64(payload)
	if err != nil {
		return nil, errBadBase64
	}
	if maxBytes > 0 && int64(len(data)) > maxBytes {
		return nil, errTooLarge
	}
	return &dataURL{MediaType: mediaType, Data: data}, nil
}

// decodeBase64 accepts standard or URL-safe alphabets, padded or not.
func decodeBase64(s string) ([]byte, error) {
	if strings.ContainsAny(s, "-_") {
		if strings.HasSuffix(s, "=") {
			return base64.URLEncoding.DecodeString(s)
		}
		return base64.RawURLEncoding.DecodeString(s)
	}
	if len(s)%4 == 0 {
		return base64.StdEncoding.DecodeString(s)
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// stripSpace removes the blanks some encoders wrap base64 with.
func stripSpace(s string) string {
	if !strings.ContainsAny(s, " \t\r\n") {
		return s
	}
	return strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\r', '\n':
			return -1
		}
		return r
	}, s)
}

// ---- image validation ----

// imageLimits are the checks every image passes before it reaches the engine.
type imageLimits struct {
	MaxBytes  int64
	MaxPixels int64
}

// imageProblem is why an image was refused; tooLarge (bytes) answers 413,
// the rest 400.
type imageProblem struct {
	tooLarge bool
	code     string // "" -> invalid_image
	msg      string
}

func (p *imageProblem) Error() string { return p.msg }

// checkImage makes sure data starts as a PNG, JPEG, WebP or GIF within the
// limits, sniffed by its magic bytes (the declared type only words the
// error). It reads the header only: a decompression bomb is refused before
// any pixel memory is allocated. PNG and JPEG pixels are decoded once, by
// the engine's vision encoder, which refuses a truncated or corrupt body
// (*completion.ImageError); WebP and GIF are decoded by engineImage.
func checkImage(data []byte, declared string, lim imageLimits) (format string, err error) {
	if lim.MaxBytes > 0 && int64(len(data)) > lim.MaxBytes {
		return "", &imageProblem{tooLarge: true, msg: fmt.Sprintf("image is %d bytes; the limit is %d", len(data), lim.MaxBytes)}
	}
	cfg, format, err := image.DecodeConfig(bytes.NewReader(data))
	// Another package of the binary may register more formats with package
	// image; these four are the ones engineImage hands on.
	if err != nil || !acceptedFormat(format) {
		return "", &imageProblem{msg: unsupportedImageMsg(data, declared)}
	}
	if cfg.Width <= 0 || cfg.Height <= 0 {
		return "", &imageProblem{msg: fmt.Sprintf("%s image has no pixels (%dx%d)", format, cfg.Width, cfg.Height)}
	}
	if px := int64(cfg.Width) * int64(cfg.Height); lim.MaxPixels > 0 && px > lim.MaxPixels {
		return "", &imageProblem{code: "image_too_large", msg: fmt.Sprintf("%s image is %dx%d = %d pixels; the limit is %d", format, cfg.Width, cfg.Height, px, lim.MaxPixels)}
	}
	return format, nil
}

func acceptedFormat(format string) bool {
	switch format {
	case "png", "jpeg", "webp", "gif":
		return true
	}
	return false
}

// prepareImage checks data (checkImage) and returns the bytes the engine
// takes for it (engineImage).
func prepareImage(data []byte, declared string, lim imageLimits) ([]byte, error) {
	format, err := checkImage(data, declared, lim)
	if err != nil {
		return nil, err
	}
	return engineImage(data, format)
}

// engineImage returns what the engine's vision encoder is handed for data,
// which passed checkImage as format. PNG and JPEG go as they are. llama.cpp's
// image loader (stb_image) has no WebP decoder, so a WebP, and a GIF (its
// first frame, as a browser shows it before animating), is decoded here and
// re-encoded as a lossless PNG: the encoder sees the same pixels as it would
// for the same picture sent as PNG. checkImage has bounded the pixels, so
// the decode's memory is bounded too.
func engineImage(data []byte, format string) ([]byte, error) {
	var (
		img image.Image
		err error
	)
	switch format {
	case "webp":
		img, err = webp.Decode(bytes.NewReader(data))
	case "gif":
		img, err = gifFirstFrame(data)
	default:
		return data, nil
	}
	if err != nil {
		return nil, &imageProblem{msg: fmt.Sprintf("%s image is truncated or corrupt (%v)", format, err)}
	}
	var buf bytes.Buffer
	enc := png.Encoder{CompressionLevel: png.BestSpeed} // it is decoded again at once; size matters little
	if err := enc.Encode(&buf, img); err != nil {
		return nil, &imageProblem{msg: fmt.Sprintf("%s image cannot be converted to PNG (%v)", format, err)}
	}
	return buf.Bytes(), nil
}

// gifFirstFrame decodes a GIF's first frame onto its logical screen: a
// frame may cover only part of the screen (the rest is transparent, as a
// browser shows it). gif.Decode stops after the first frame.
func gifFirstFrame(data []byte) (image.Image, error) {
	cfg, err := gif.DecodeConfig(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	frame, err := gif.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	screen := image.Rect(0, 0, cfg.Width, cfg.Height)
	if frame.Bounds() == screen {
		return frame, nil
	}
	canvas := image.NewNRGBA(screen)
	draw.Draw(canvas, frame.Bounds(), frame, frame.Bounds().Min, draw.Src)
	return canvas, nil
}

// unsupportedImageMsg explains why bytes are not an image we take.
func unsupportedImageMsg(data []byte, declared string) string {
	sniffed := http.DetectContentType(data)
	switch {
	case len(data) == 0:
		return "image is empty"
	case sniffed == "image/png" || sniffed == "image/jpeg" || sniffed == "image/webp" || sniffed == "image/gif":
		return strings.TrimPrefix(sniffed, "image/") + " image header is corrupt"
	case strings.HasPrefix(sniffed, "image/"):
		return fmt.Sprintf("%s images are not supported; %s", sniffed, supportedImages)
	}
	return "data is not a PNG, JPEG, WebP or GIF image"
}

// supportedImages ends the messages about an image type we do not take.
const supportedImages = "send PNG, JPEG, WebP or GIF"

// acceptedMediaType reports whether a data URL's or a fetched image's
// declared type is one we try ("": undeclared; the bytes decide).
func acceptedMediaType(mt string) bool {
	switch mt {
	case "image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif", "":
		return true
	}
	return false
}

// ---- remote images ----

// imageFetcher downloads http(s) images with SSRF protection.
type imageFetcher struct {
	client   *http.Client
	maxBytes int64
}

const maxImageRedirects = 3

func newImageFetcher(timeout time.Duration, maxBytes int64, allowPrivate bool) *imageFetcher {
	dialer := &net.Dialer{Timeout: timeout}
	if !allowPrivate {
		// Control sees the address actually dialled (after DNS), so a name
		// that resolves differently the second time (rebinding) is caught too.
		dialer.Control = func(network, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("refusing to connect to %q", address)
			}
			if blockedAddr(ap.Addr()) {
				return &blockedAddrError{addr: ap.Addr()}
			}
			return nil
		}
	}
	tr := &http.Transport{
		Proxy:                 nil, // a proxy would hide the real destination from the check above
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          16,
		IdleConnTimeout:       30 * time.Second,
		TLSHandshakeTimeout:   timeout,
		ResponseHeaderTimeout: timeout,
	}
	return &imageFetcher{
		maxBytes: maxBytes,
		client: &http.Client{
			Transport: tr,
			Timeout:   timeout,
			CheckRedirect: func(req *http.Request, via []*http.Request) error {
				if len(via) > maxImageRedirects {
					return fmt.Errorf("more than %d redirects", maxImageRedirects)
				}
				if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
					return fmt.Errorf("redirect to a %q URL", req.URL.Scheme)
				}
				return nil
			},
		},
	}
}

type blockedAddrError struct{ addr netip.Addr }

func (e *blockedAddrError) Error() string {
	return fmt.Sprintf("image URL host resolves to %s, a private, loopback or otherwise non-public address", e.addr)
}

// extraBlocked are special-purpose ranges netip's predicates do not cover.
var extraBlocked = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"), // carrier-grade NAT
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("64:ff9b::/96"), // NAT64 can reach private IPv4
	netip.MustParsePrefix("64:ff9b:1::/48"),
	netip.MustParsePrefix("2001:db8::/32"),
	netip.MustParsePrefix("2002::/16"), // 6to4 embeds arbitrary IPv4
}

// blockedAddr reports whether an image fetch must not connect to a.
func blockedAddr(a netip.Addr) bool {
	a = a.Unmap()
	if !a.IsValid() || a.IsLoopback() || a.IsPrivate() || a.IsUnspecified() || a.IsLinkLocalUnicast() ||
		a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() || a.IsMulticast() {
		return true
	}
	for _, p := range extraBlocked {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// fetch GETs an http(s) URL and returns at most maxBytes of body.
func (f *imageFetcher) fetch(ctx context.Context, rawURL string) ([]byte, string, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, "", errors.New("image URL must be an absolute http(s) URL or a data: URL")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, "", errors.New("invalid image URL")
	}
	req.Header.Set("Accept", "image/png, image/jpeg, image/webp, image/gif")
	req.Header.Set("User-Agent", "elasticserve")
	resp, err := f.client.Do(req)
	if err != nil {
		var be *blockedAddrError
		if errors.As(err, &be) {
			return nil, "", be
		}
		return nil, "", fmt.Errorf("cannot fetch image URL: %s", fetchErrorText(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, "", fmt.Errorf("fetching the image URL returned HTTP %d", resp.StatusCode)
	}
	if f.maxBytes > 0 && resp.ContentLength > f.maxBytes {
		return nil, "", errTooLarge
	}
	var r io.Reader = resp.Body
	if f.maxBytes > 0 {
		r = io.LimitReader(resp.Body, f.maxBytes+1)
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, "", fmt.Errorf("cannot read image URL body: %s", fetchErrorText(err))
	}
	if f.maxBytes > 0 && int64(len(data)) > f.maxBytes {
		return nil, "", errTooLarge
	}
	ct := strings.ToLower(strings.TrimSpace(strings.Split(resp.Header.Get("Content-Type"), ";")[0]))
	return data, ct, nil
}

// fetchErrorText shortens net/http errors (which repeat the whole URL).
func fetchErrorText(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timed out"
	}
	return err.Error()
}
