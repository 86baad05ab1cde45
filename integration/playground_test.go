package integration

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// The playground page (GET /) driven in a real headless Chromium (Debian's
// chromium, installed by `make deps`).

// chromium is the browser binary. Without one the test skips on a developer
// machine and fails in CI (CI set), where `make deps` installs it.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("chromium is not installed, and CI is set: `make deps` installs it (Debian package chromium)")
	}
	t.Skip("chromium is not installed (Debian package chromium; `make deps` installs it): the playground page is not tested in a browser")
	return ""
}

// browser starts a headless Chromium for the test and returns a tab's context,
// which ends after two minutes.
func browser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, // CI runs as root
		chromedp.WindowSize(1280, 1100),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-gpu", true),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(func() { cancelTab(); cancelAlloc() })
	if err := chromedp.Do(ctx); err != nil { // starts the browser, without a deadline
		t.Fatalf("starting chromium: %v", err)
	}
	ctx, cancelTime := context.WithTimeout(ctx, 2*time.Minute)
	t.Cleanup(cancelTime)
	return ctx
}

// poll waits until the JavaScript expression is true.
func poll(expr string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(90*time.Second), chromedp.WithPollingInterval(50*time.Millisecond))
}

// click scrolls the element to the middle of the window (clear of the composer,
// which sticks to its bottom) and clicks it.
func click(sel string) chromedp.Action[chromedp.Void] {
	return chromedp.Steps(
		chromedp.Poll[chromedp.Void](`(() => { const e = document.querySelector(`+strconv.Quote(sel)+`); if (e) e.scrollIntoView({block: 'center'}); return !!e })()`,
			chromedp.WithPollingTimeout(20*time.Second)),
		chromedp.Click(chromedp.CSS(sel)))
}

// eval runs a JavaScript expression and decodes its value into T.
func eval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("%s: %v", expr, err)
	}
	return v
}

func do(t *testing.T, ctx context.Context, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	for i, step := range steps {
		if err := chromedp.Do(ctx, step); err != nil {
			page, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`Array.from(document.querySelectorAll('#chat > .msg')).map(m => m.className + ': ' + m.innerText.slice(0, 300)).join('\n----\n') + '\nstatus: ' + document.querySelector('#status').textContent`))
			t.Fatalf("step %d of %d: %v\nthe page says:\n%s", i+1, len(steps), err, page)
		}
	}
}

// TestPlayground: on the demo model, the page uploads the README's picture,
// asks the README's question with "compare" on, answers " red" under full and
// under the server's default setting, and its explain view shades one cell per
// image entry (12 x 12) over the picture, by layer and over all layers.
func TestPlayground(t *testing.T) {
	ctx := browser(t)
	s := sharedServer(t, "demo", demoSpec())
	picture := filepath.Join(repoRoot, "models", "demo", "example.png")

	do(t, ctx, chromedp.Navigate(s.URL+"/"), poll(`document.querySelector("#model").textContent !== ""`))
	if eval[bool](t, ctx, `getComputedStyle(document.querySelector('#key-form')).display !== 'none'`) {
		t.Fatal("the page asks for an API key on a server without one")
	}
	if !eval[bool](t, ctx, `!!document.querySelector('input[type=file]#file')`) {
		t.Fatal("the page has no file input")
	}
	if !eval[bool](t, ctx, `(() => { const b = document.querySelector('#budget'); return !!b && b.type === 'range' && !b.disabled })()`) {
		t.Fatal("the page has no budget control")
	}

	// A dropped and a pasted picture are attached too; remove them again.
	_, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`(async () => {
		const c = document.createElement('canvas');
		c.width = c.height = 8;
		const blob = await new Promise((r) => c.toBlob(r, 'image/png'));
		const drop = new DataTransfer();
		drop.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
		document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: drop, bubbles: true, cancelable: true}));
		const paste = new DataTransfer();
		paste.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
		document.querySelector('#prompt').dispatchEvent(new ClipboardEvent('paste', {clipboardData: paste, bubbles: true, cancelable: true}));
		return true;
	})()`, chromedp.EvalAwaitPromise))
	if err != nil {
		t.Fatal(err)
	}
	do(t, ctx, poll(`document.querySelectorAll('#attachments img').length === 2`))
	if names := eval[string](t, ctx, `Array.from(document.querySelectorAll('#attachments img')).map(i => i.alt).join(',')`); names != "dropped.png,pasted.png" {
		t.Errorf("attached %q, want the dropped and the pasted picture", names)
	}
	do(t, ctx,
		click(`#attachments .attachment button`),
		click(`#attachments .attachment button`),
		poll(`document.querySelectorAll('#attachments img').length === 0`),
	)

	do(t, ctx,
		chromedp.SetUploadFiles(chromedp.ID("file"), []string{picture}),
		poll(`document.querySelectorAll('#attachments img').length === 1`),
		chromedp.SendKeys(chromedp.ID("prompt"), "What color is the circle?"),
		click("#compare"),
		click("#send"),
		poll(`document.querySelectorAll('.answer.done').length === 2`),
	)
	type answer struct {
		Policy string `json:"policy"`
		Text   string `json:"text"`
		Error  string `json:"error"`
		Words  string `json:"words"`
	}
	answers := eval[[]answer](t, ctx, `Array.from(document.querySelectorAll('.answer')).map(a => ({
		policy: a.dataset.policy, text: a.querySelector('.text').textContent,
		error: (a.querySelector('.error') || {}).textContent || '', words: (a.querySelector('.kv-words') || {}).textContent || ''}))`)
	if len(answers) != 2 || answers[0].Policy != "full" || answers[1].Policy != "elastic" {
		t.Fatalf("answers %+v; want full, then the server's default (elastic)", answers)
	}
	for _, a := range answers {
		if a.Error != "" || !strings.Contains(a.Text, " red") {
			t.Errorf("%s answered %q (error %q); want \" red\"", a.Policy, a.Text, a.Error)
		}
		if !strings.Contains(a.Words, "prompt entries") {
			t.Errorf("%s: no kv_cache report in words: %q", a.Policy, a.Words)
		}
	}

	const chosen = `.answer[data-policy="elastic"]`
	count := func(sel string) int {
		return eval[int](t, ctx, `document.querySelectorAll('`+chosen+` .explain `+sel+`').length`)
	}
	do(t, ctx,
		click(chosen+` details.explain > summary`),
		poll(`document.querySelectorAll('`+chosen+` .explain .cell').length > 0`),
	)
	cells, kept, merged := count(`.cell[class*="s-"]`), count(`.cell.s-k`), count(`.cell.s-m`)
	columns := eval[int](t, ctx, `getComputedStyle(document.querySelector('`+chosen+` .explain .grid')).gridTemplateColumns.split(' ').length`)
	if cells != 144 || columns != 12 {
		t.Errorf("explain view: %d shaded cells in %d columns; want 144 (the demo model's 12 x 12 grid)", cells, columns)
	}
	if kept == 0 || merged == 0 || kept+merged > cells {
		t.Errorf("layer 1: %d kept, %d merged cells", kept, merged)
	}
	hover := eval[string](t, ctx, `(() => {
		const c = document.querySelector('`+chosen+` .explain .cell.s-m');
		c.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
		return document.querySelector('`+chosen+` .hover-info').textContent;
	})()`)
	if !strings.Contains(hover, "merged into") || count(`.cell.anchor-hl`) > 1 {
		t.Errorf("hovering a merged patch says %q; want its anchor", hover)
	}
	do(t, ctx, click(chosen+` .all-layers`))
	if n := count(`.cell.s-all`); n != 144 {
		t.Errorf("all layers: %d shaded cells, want 144", n)
	}
	do(t, ctx, click(chosen+` .all-layers`))

	if path := os.Getenv("ELASTICSERVE_SCREENSHOT"); path != "" {
		do(t, ctx,
			click(`.answer[data-policy="full"] details.explain > summary`),
			poll(`document.querySelectorAll('.explain .cell').length === 288`),
		)
		// A viewport as tall as the page keeps the composer (sticky at the
		// viewport's bottom) below the answers.
		h := eval[int64](t, ctx, `document.documentElement.scrollHeight`)
		do(t, ctx, chromedp.EmulateViewport(1280, h), poll(`document.documentElement.clientHeight >= `+strconv.FormatInt(h, 10)))
		png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		if !filepath.IsAbs(path) {
			path = filepath.Join(repoRoot, path)
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot written to %s", path)
	}

	// A second turn, without compare: the history (picture and answer) goes
	// along, and the new answer explains the same picture.
	do(t, ctx,
		click("#compare"),
		chromedp.SendKeys(chromedp.ID("prompt"), "What shape is it?"),
		click("#send"),
		poll(`document.querySelectorAll('.answer.done').length === 3`),
		click(`.msg.assistant:last-child details.explain > summary`),
		poll(`document.querySelectorAll('.msg.assistant:last-child .explain .cell').length > 0`),
	)
	last := `.msg.assistant:last-child`
	if e := eval[string](t, ctx, `(document.querySelector('`+last+` .error') || {}).textContent || ''`); e != "" {
		t.Fatalf("second turn: %s", e)
	}
	if n := eval[int](t, ctx, `document.querySelectorAll('`+last+` .answer').length`); n != 1 {
		t.Errorf("second turn: %d answers, want 1 (compare off)", n)
	}
	if n := eval[int](t, ctx, `document.querySelectorAll('`+last+` .explain .cell[class*="s-"]').length`); n != 144 {
		t.Errorf("second turn: %d shaded cells, want 144 (the first turn's picture)", n)
	}
}

// TestPlaygroundAPIKey: against a server with --api-key the page asks for the
// key, and its requests carry it (the models list and a chat turn succeed).
func TestPlaygroundAPIKey(t *testing.T) {
	ctx := browser(t)
	s := sharedServer(t, "restricted", restrictedSpec)
	do(t, ctx,
		chromedp.Navigate(s.URL+"/"),
		poll(`getComputedStyle(document.querySelector('#key-form')).display !== 'none'`),
		chromedp.SendKeys(chromedp.ID("api-key"), testAPIKey),
		click("#key-save"),
		poll(`document.querySelector("#model").textContent !== "" && getComputedStyle(document.querySelector('#key-form')).display === 'none'`),
		chromedp.SetValue(chromedp.ID("max-tokens"), "4"),
		chromedp.SendKeys(chromedp.ID("prompt"), "Hello"),
		click("#send"),
		poll(`document.querySelectorAll('.answer.done').length === 1`),
	)
	text := eval[string](t, ctx, `document.querySelector('.answer .text').textContent`)
	errText := eval[string](t, ctx, `(document.querySelector('.answer .error') || {}).textContent || ''`)
	if errText != "" || text == "" {
		t.Fatalf("with the key: answer %q, error %q", text, errText)
	}
}

// With --ui=false (the main server) GET / is a 404.
func TestPlaygroundOff(t *testing.T) {
	s := sharedServer(t, "main", mainSpec)
	resp, err := http.Get(s.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET / with --ui=false: %d", resp.StatusCode)
	}
}
