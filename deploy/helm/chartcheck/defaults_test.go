package chartcheck

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"

	"github.com/elasticserve/elasticserve/config"
	"github.com/elasticserve/elasticserve/elasticcache"
)

// TestDefaultCacheSettingAgrees: the server's default cache setting is written in several
// places (elasticcache.DefaultConfig, the config's environment defaults, the Helm values,
// docker-compose.yml, docs/deploy.md and the README). Each deployment path must start the
// server with elasticcache.DefaultConfig(), and the two documents must name it.
func TestDefaultCacheSettingAgrees(t *testing.T) {
	want := elasticcache.DefaultConfig()
	if want.Policy == elasticcache.Full || want.Budget >= 1 {
		t.Fatalf("DefaultConfig() = %+v: the default must compress (budget below 1)", want)
	}
	cacheOf := func(t *testing.T, where string, cfg *config.Config) {
		t.Helper()
		s, err := cfg.Cache()
		if err != nil {
			t.Fatalf("%s: %v", where, err)
		}
		if got := s.Config(); got != want {
			t.Errorf("%s starts the server with %+v, elasticcache.DefaultConfig() is %+v", where, got, want)
		}
	}

	t.Run("config", func(t *testing.T) {
		model := filepath.Join(t.TempDir(), "m.gguf")
		if err := os.WriteFile(model, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := config.Load([]string{"--model", model}, nil)
		if err != nil {
			t.Fatal(err)
		}
		cacheOf(t, "config.Load without cache flags or environment", cfg)
	})
	t.Run("helm", func(t *testing.T) {
		r := renderObjects(t, "")
		cfg, _ := checkServerConfig(t, r, r.one(t, "Deployment").(*appsv1.Deployment))
		cacheOf(t, "the Helm chart's default values", cfg)
	})
	t.Run("compose", func(t *testing.T) {
		p, err := loadCompose(t, repoFile(t, "docker-compose.yml"), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range p.ServiceNames() {
			cacheOf(t, "docker-compose.yml service "+name, checkComposeService(t, p.Services[name]))
		}
	})
	t.Run("deploy guide", func(t *testing.T) {
		text := string(readRepoFile(t, "docs/deploy.md"))
		// The values table's server.<flag> row.
		m := regexp.MustCompile("policy ([a-z0-9]+), budget ([0-9.]+), selection `([a-z-]+)`").FindAllStringSubmatch(text, -1)
		if len(m) == 0 {
			t.Fatal("docs/deploy.md: no \"policy P, budget B, selection `S`\" in the values table")
		}
		for _, g := range m {
			checkNamed(t, "docs/deploy.md: "+g[0], g[1], g[2], g[3], want)
		}
	})
	t.Run("README", func(t *testing.T) {
		text := string(readRepoFile(t, "README.md"))
		row := func(field string) string {
			for _, line := range strings.Split(text, "\n") {
				if strings.HasPrefix(line, "| `elastic_cache."+field+"` |") {
					return line
				}
			}
			t.Fatalf("README: no extension-table row for elastic_cache.%s", field)
			return ""
		}
		def := regexp.MustCompile("`([a-z0-9-]+)` \\(default\\)")
		policy, selection := def.FindStringSubmatch(row("policy")), def.FindStringSubmatch(row("selection"))
		budget := regexp.MustCompile(`default ([0-9.]+)`).FindStringSubmatch(row("budget"))
		if policy == nil || selection == nil || budget == nil {
			t.Fatalf("README: the extension table does not name a default policy, budget and selection")
		}
		checkNamed(t, "README extension table", policy[1], budget[1], selection[1], want)
		// Every prose mention of the default setting ("`elastic`, `S`, budget B").
		m := regexp.MustCompile("`([a-z0-9]+)`, `([a-z-]+)`(?: selection)?, budget ([0-9.]+)").FindAllStringSubmatch(text, -1)
		if len(m) == 0 {
			t.Fatal("README: no \"`elastic`, `S`, budget B\" naming the default")
		}
		for _, g := range m {
			checkNamed(t, "README: "+g[0], g[1], g[3], g[2], want)
		}
	})
}

// checkNamed: a document names the default setting (the paper's selection may be
// named "paper"; a Spec stores it as the empty Selection).
func checkNamed(t *testing.T, where, policy, budget, selection string, want elasticcache.Config) {
	t.Helper()
	b, err := strconv.ParseFloat(budget, 64)
	if err != nil {
		t.Errorf("%s: budget %q: %v", where, budget, err)
	}
	sel, err := elasticcache.ParseSelection(selection)
	if err != nil {
		t.Errorf("%s: %v", where, err)
	}
	if wantSel := elasticcache.MustSpec(want).Selection(); policy != string(want.Policy) || b != want.Budget || sel != wantSel {
		t.Errorf("%s names policy %s, budget %s, selection %s; elasticcache.DefaultConfig() is %s, %v, %s",
			where, policy, budget, selection, want.Policy, want.Budget, wantSel)
	}
}
