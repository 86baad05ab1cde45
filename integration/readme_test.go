package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// readmeCurl returns the first ```sh block of README.md that runs curl.
func readmeCurl(tb testing.TB) string {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		tb.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != "```sh" {
			continue
		}
		var block []string
		for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			block = append(block, lines[i])
		}
		text := strings.Join(block, "\n")
		if strings.Contains(text, "curl ") {
			return text
		}
	}
	tb.Fatal("README.md has no ```sh block with a curl command")
	return ""
}

// readmeAnswer is the answer README.md promises for its curl example.
const readmeAnswer = " red"

// TestReadmeCurl runs the README's curl example against a live server on
// the bundled demo model, as `make run` serves it (the documented address
// is replaced by the test server's), and checks the documented answer.
func TestReadmeCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed; the README example cannot be run")
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash is not installed; the README example cannot be run")
	}
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "The answer is `\""+readmeAnswer+"\"`") {
		t.Fatalf("README.md no longer says the answer is %q; update this test", readmeAnswer)
	}
	s := sharedServer(t, "demo", demoSpec())
	script := readmeCurl(t)
	const documented = "http://127.0.0.1:8080"
	if !strings.Contains(script, documented) {
		t.Fatalf("the README curl example no longer uses %s; update this test:\n%s", documented, script)
	}
	script = strings.ReplaceAll(script, documented, s.URL)
	const examplePNG = "models/demo/example.png"
	if !strings.Contains(script, examplePNG) {
		t.Fatalf("the README curl example no longer sends %s; update this test:\n%s", examplePNG, script)
	}
	// Use the curl found above even where the script says plain "curl".
	script = "curl() { " + shellQuote(curl) + ` "$@"; }` + "\n" + script
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, "-euo", "pipefail", "-c", script)
	cmd.Dir = repoRoot
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("the README example failed: %v\nstderr: %s\nstdout: %s", err, stderr.String(), stdout.String())
	}
	var resp struct {
		Object  string `json:"object"`
		Choices []struct {
			Message struct {
				Role    string `json:"role"`
				Content string `json:"content"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage   struct{ PromptTokens, CompletionTokens int } `json:"usage"`
		KVCache *struct {
			Policy string  `json:"policy"`
			Budget float64 `json:"budget"`
		} `json:"kv_cache"`
		Error json.RawMessage `json:"error"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &resp); err != nil {
		t.Fatalf("the README example did not print JSON: %v\n%s", err, stdout.String())
	}
	if resp.Error != nil || resp.Object != "chat.completion" || len(resp.Choices) != 1 || resp.Choices[0].Message.Role != "assistant" {
		t.Fatalf("unexpected answer to the README example: %s", stdout.String())
	}
	want := regexp.MustCompile(`"policy":\s*"(\w+)"`).FindStringSubmatch(script)
	if want == nil {
		t.Fatalf("the README example sets no elastic_cache policy:\n%s", script)
	}
	if resp.KVCache == nil || resp.KVCache.Policy != want[1] {
		t.Errorf("kv_cache does not reflect the example's policy %q: %s", want[1], stdout.String())
	}
	if got := resp.Choices[0].Message.Content; got != readmeAnswer {
		t.Errorf("the README example answered %q; README.md promises %q", got, readmeAnswer)
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
