package chartcheck

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"

	"github.com/elasticserve/elasticserve/config"
)

// loadCompose parses and validates a compose file with the compose specification's own
// loader (schema validation, interpolation, merges), all profiles on, with env as the
// only environment.
func loadCompose(t *testing.T, file string, env []string) (*types.Project, error) {
	t.Helper()
	opts, err := cli.NewProjectOptions([]string{file},
		cli.WithWorkingDirectory(filepath.Dir(file)),
		cli.WithName("elasticserve"),
		cli.WithEnv(env),
		cli.WithProfiles([]string{"*"}),
	)
	if err != nil {
		t.Fatal(err)
	}
	return opts.LoadProject(context.Background())
}

func TestComposeFile(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"defaults", nil},
		{"own model", []string{"MODEL_DIR=" + repoFile(t, "models/demo"), "MODEL_FILE=model.gguf", "API_KEY=sk-compose-0123456789", "BUDGET=0.5"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := loadCompose(t, repoFile(t, "docker-compose.yml"), tc.env)
			if err != nil {
				t.Fatalf("compose loader: %v", err)
			}
			if got := strings.Join(p.ServiceNames(), ","); got != "elasticserve,elasticserve-gpu" {
				t.Fatalf("services %s", got)
			}
			hostPorts := map[string]bool{}
			for _, name := range p.ServiceNames() {
				svc := p.Services[name]
				cfg := checkComposeService(t, svc)
				for _, port := range svc.Ports {
					if hostPorts[port.Published] {
						t.Errorf("%s: host port %s is used by another service too", name, port.Published)
					}
					hostPorts[port.Published] = true
				}
				if name == "elasticserve-gpu" {
					if svc.Deploy == nil || svc.Deploy.Resources.Reservations == nil || len(svc.Deploy.Resources.Reservations.Devices) != 1 ||
						!slices.Contains(svc.Deploy.Resources.Reservations.Devices[0].Capabilities, "gpu") {
						t.Errorf("%s: no GPU device reservation", name)
					}
					if cfg.GPULayers != -1 {
						t.Errorf("%s: --gpu-layers %d", name, cfg.GPULayers)
					}
					if len(svc.Profiles) != 1 || svc.Profiles[0] != "gpu" {
						t.Errorf("%s: profiles %v, want [gpu] (not started by a plain `up`)", name, svc.Profiles)
					}
				}
				for _, kv := range tc.env {
					if k, v, _ := strings.Cut(kv, "="); k == "API_KEY" && cfg.APIKey != v {
						t.Errorf("%s: API key %q, want %q", name, cfg.APIKey, v)
					}
				}
			}
		})
	}
}

// checkComposeService runs the service's environment, on top of its Dockerfile's ENV, through
// the server's config parser, with the model paths mapped to the mounted host directory
// (whose files must exist), and checks ports, health check, stop grace and read-only root.
func checkComposeService(t *testing.T, svc types.ServiceConfig) *config.Config {
	t.Helper()
	if svc.Build == nil {
		t.Fatalf("%s: no build section", svc.Name)
	}
	dockerfile := svc.Build.Dockerfile
	if dockerfile == "" {
		dockerfile = "Dockerfile"
	}
	env := dockerfileEnv(t, filepath.Join(svc.Build.Context, dockerfile))
	for k, v := range svc.Environment {
		if v == nil {
			t.Errorf("%s: %s has no value", svc.Name, k)
			continue
		}
		if strings.HasPrefix(k, config.EnvPrefix) && !configEnvNames()[k] {
			t.Errorf("%s: %s is not an elasticserve option", svc.Name, k)
		}
		env[k] = *v
	}
	mounts := map[string]string{} // container path -> host path
	for _, v := range svc.Volumes {
		if v.Type == types.VolumeTypeBind {
			if !v.ReadOnly {
				t.Errorf("%s: bind mount %s is writable", svc.Name, v.Target)
			}
			mounts[v.Target] = v.Source
		}
	}
	for _, k := range []string{"ELASTICSERVE_MODEL", "ELASTICSERVE_MMPROJ"} {
		p := env[k]
		if p == "" {
			continue
		}
		host := ""
		for target, src := range mounts {
			if rel, ok := strings.CutPrefix(p, target+"/"); ok {
				host = filepath.Join(src, filepath.FromSlash(rel))
			}
		}
		if host == "" {
			t.Errorf("%s: %s=%s is on no mounted volume", svc.Name, k, p)
			continue
		}
		if _, err := os.Stat(host); err != nil {
			t.Errorf("%s: %s: %v", svc.Name, k, err)
		}
		env[k] = host
	}
	cfg, err := config.Load(nil, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatalf("%s: the server refuses the compose configuration: %v", svc.Name, err)
	}

	_, port, _ := strings.Cut(cfg.Addr, ":")
	for _, p := range svc.Ports {
		if strconv.Itoa(int(p.Target)) != port {
			t.Errorf("%s: port %d published, the server listens on %s", svc.Name, p.Target, cfg.Addr)
		}
		if p.HostIP != "127.0.0.1" {
			t.Errorf("%s: port published on %q, want loopback only", svc.Name, p.HostIP)
		}
	}

	hc := svc.HealthCheck
	if hc == nil || len(hc.Test) < 2 {
		t.Fatalf("%s: no health check", svc.Name)
	}
	url := hc.Test[len(hc.Test)-1]
	wantPrefix := "http://127.0.0.1:" + port
	if !strings.HasPrefix(url, wantPrefix+"/") {
		t.Errorf("%s: health check %q, the server listens on %s", svc.Name, url, cfg.Addr)
	}
	h := probeHandler(cfg)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path.Clean(strings.TrimPrefix(url, wantPrefix)), nil))
	if rec.Code != http.StatusOK {
		t.Errorf("%s: health check GET %s answers %d", svc.Name, url, rec.Code)
	}

	if svc.StopGracePeriod == nil || time.Duration(*svc.StopGracePeriod) <= cfg.ShutdownGrace+5*time.Second {
		t.Errorf("%s: stop_grace_period %v does not cover the shutdown grace %s + 5s", svc.Name, svc.StopGracePeriod, cfg.ShutdownGrace)
	}
	if !svc.ReadOnly || !strings.Contains(strings.Join(svc.Tmpfs, ","), "/tmp") {
		t.Errorf("%s: want read_only with a /tmp tmpfs", svc.Name)
	}
	return cfg
}

// dockerfileEnv is the ENV of a Dockerfile's last stage (ENV k=v ..., continuation lines).
func dockerfileEnv(t *testing.T, file string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(b), "\\\n", " ")
	env := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "FROM":
			clear(env)
		case "ENV":
			if len(f) == 3 && !strings.Contains(f[1], "=") { // ENV key value
				env[f[1]] = f[2]
				continue
			}
			for _, kv := range f[1:] {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					t.Fatalf("%s: cannot read %q", file, line)
				}
				env[k] = strings.Trim(v, `"`)
			}
		}
	}
	return env
}

// TestComposeValidationIsStrict: the loader refuses a field the compose specification
// does not have, so TestComposeFile's pass means something.
func TestComposeValidationIsStrict(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "compose.yml")
	if err := os.WriteFile(file, []byte("services:\n  a:\n    image: x\n    stop_grace: 40s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadCompose(t, file, nil); err == nil || !strings.Contains(err.Error(), "stop_grace") {
		t.Fatalf("unknown field accepted: %v", err)
	}
}
