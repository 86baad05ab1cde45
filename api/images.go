package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"image"
	_ "image/jpeg" // registers the JPEG decoder
	_ "image/png"  // registers the PNG decoder
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// ---- data URLs ----

// errNotBase64 etc. are the data URL problems parseDataURL reports.
var (
	errNotDataURL    = errors.New("not a data URL")
	errDataURLSyntax = errors.New("malformed data URL: want data:image/png;base64,<data> or data:image/jpeg;base64,<data>")
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

// checkImage makes sure data starts as a PNG or JPEG within the limits. It
// reads the header only: a decompression bomb is refused before any pixel
// memory is allocated, and the pixels are decoded once, by the engine's
// vision encoder, which refuses a truncated or corrupt body
// (*completion.ImageError).
func checkImage(data []byte, declared string, lim imageLimits) (format string, err error) {
	if lim.MaxBytes > 0 && int64(len(data)) > lim.MaxBytes {
		return "", &imageProblem{tooLarge: true, msg: fmt.Sprintf("image is %d bytes; the limit is %d", len(data), lim.MaxBytes)}
	}
	cfg, format, err := image.DecodeConfig(bytes.NewReader(data))
	// Another package of the binary may register more formats (GIF, WebP)
	// with package image; the vision encoder takes these two.
	if err != nil || (format != "png" && format != "jpeg") {
		return "", &imageProblem{msg: unsupportedImageMsg(data, declared)}
	}
	if cfg.Width <= 0 || cfg.Height <= 0 {
		return "", &imageProblem{msg: fmt.Sprintf("%s image has no pixels (%dx%d)", format, cfg.Width, cfg.Height)}
	}
	if px := int64(cfg.Width) * int64(cfg.Height); lim.MaxPixels > 0 && px > lim.MaxPixels {
		return "", &imageProblem{code: "image_too_large", msg: fmt.Sprintf("image is %dx%d = %d pixels; the limit is %d", cfg.Width, cfg.Height, px, lim.MaxPixels)}
	}
	return format, nil
}

// unsupportedImageMsg explains why bytes are not an image we take.
func unsupportedImageMsg(data []byte, declared string) string {
	sniffed := http.DetectContentType(data)
	switch {
	case len(data) == 0:
		return "image is empty"
	case sniffed == "image/webp" || declared == "image/webp":
		return "WebP images are not supported; send PNG or JPEG"
	case sniffed == "image/gif" || declared == "image/gif":
		return "GIF images are not supported; send PNG or JPEG"
	case strings.HasPrefix(sniffed, "image/png") || strings.HasPrefix(sniffed, "image/jpeg"):
		return strings.TrimPrefix(sniffed, "image/") + " image header is corrupt"
	case strings.HasPrefix(sniffed, "image/"):
		return fmt.Sprintf("%s images are not supported; send PNG or JPEG", sniffed)
	}
	return "data is not a PNG or JPEG image"
}

// acceptedMediaType reports whether a data URL's declared type is one we try.
// image/webp is tried too (and then refused with a clear message when it
// does not decode as PNG/JPEG).
func acceptedMediaType(mt string) bool {
	switch mt {
	case "image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "":
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
	req.Header.Set("Accept", "image/png, image/jpeg")
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
