package chartcheck

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/rs/zerolog"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/elasticserve/elasticserve/api"
	"github.com/elasticserve/elasticserve/config"
	"github.com/elasticserve/elasticserve/engine/completion"
)

// The server's gauges a router or an autoscaler reads (docs/deploy.md).
const (
	metricQueueDepth = "elasticserve_queue_depth"
	metricRunning    = "elasticserve_requests_running"
	metricKVUsage    = "elasticserve_kv_cache_usage_ratio"
)

// The configurations of the issue: default values, the GPU variant, autoscaling with a
// ServiceMonitor; plus KEDA and the other model sources.
var configurations = []struct {
	name      string
	overrides string
	kinds     []string // the objects it must render, exactly
	gpu       bool
	apiKey    string // the key the pod gets ("" none; "existing": from a Secret the chart does not render)
	autoscale string // "", "hpa", "keda"
	monitor   bool
}{
	{
		name:      "default",
		overrides: ``,
		kinds:     []string{"Deployment/es-elasticserve", "PersistentVolumeClaim/es-elasticserve-models", "PodDisruptionBudget/es-elasticserve", "Service/es-elasticserve"},
	},
	{
		name: "gpu",
		overrides: `
gpu: {enabled: true, count: 1, layers: -1, runtimeClassName: nvidia}
model:
  file: llava/llava-v1.5-7b.Q4_K_M.gguf
  mmproj: llava/mmproj-model-f16.gguf
  persistence: {existingClaim: llava-models}
apiKey: {existingSecret: elasticserve-key, secretKey: token}
server:
  ctx-size: 16384
  parallel: 8
  queue-size: 32
  max-image-pixels: 16777216
  max-body-bytes: 64MiB
  request-timeout: 10m
  kv-type: f16
  flash-attn: false
  policy: elastic
  budget: 0.5
  selection: text-tail
  n-predict: 1024
  log-level: info
shutdownGraceSeconds: 120
extraArgs: ["--model-alias=llava-1.5-7b"]
strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}
`,
		kinds:  []string{"Deployment/es-elasticserve", "PodDisruptionBudget/es-elasticserve", "Service/es-elasticserve"},
		gpu:    true,
		apiKey: "existing",
	},
	{
		name: "autoscaling-hpa-servicemonitor",
		overrides: `
apiKey: {value: sk-chart-test-0123456789}
serviceMonitor: {enabled: true, labels: {release: prometheus}}
autoscaling: {enabled: true, mode: hpa, minReplicas: 2, maxReplicas: 6, targetQueueDepth: 3, targetKVCacheUsage: "0.75"}
service: {sessionAffinity: ClientIP}
serviceAccount: {create: true}
`,
		kinds: []string{"Deployment/es-elasticserve", "HorizontalPodAutoscaler/es-elasticserve", "PersistentVolumeClaim/es-elasticserve-models",
			"PodDisruptionBudget/es-elasticserve", "Secret/es-elasticserve-api-key", "Service/es-elasticserve", "ServiceAccount/es-elasticserve", "ServiceMonitor/es-elasticserve"},
		apiKey:    "sk-chart-test-0123456789",
		autoscale: "hpa",
		monitor:   true,
	},
	{
		name: "autoscaling-keda-nfs-generated-key",
		overrides: `
apiKey: {generate: true}
serviceMonitor: {enabled: true}
autoscaling: {enabled: true, mode: keda, maxReplicas: 3}
model:
  source: volume
  volume: {nfs: {server: nfs.example.internal, path: /exports/models}}
podDisruptionBudget: {maxUnavailable: null, minAvailable: 1}
`,
		kinds: []string{"Deployment/es-elasticserve", "PodDisruptionBudget/es-elasticserve", "ScaledObject/es-elasticserve",
			"Secret/es-elasticserve-api-key", "Service/es-elasticserve", "ServiceMonitor/es-elasticserve"},
		apiKey:    "generated",
		autoscale: "keda",
		monitor:   true,
	},
	{
		name:      "bundled-demo-model",
		overrides: `{model: {source: image}, podDisruptionBudget: {enabled: false}}`,
		kinds:     []string{"Deployment/es-elasticserve", "Service/es-elasticserve"},
	},
}

func TestChartConfigurations(t *testing.T) {
	for _, tc := range configurations {
		t.Run(tc.name, func(t *testing.T) {
			r := renderObjects(t, tc.overrides)
			if !slices.Equal(r.kinds, tc.kinds) {
				t.Fatalf("rendered objects\n  %v\nwant\n  %v", r.kinds, tc.kinds)
			}
			dep := r.one(t, "Deployment").(*appsv1.Deployment)
			pod := dep.Spec.Template.Spec
			if len(pod.Containers) != 1 {
				t.Fatalf("want one container, got %d", len(pod.Containers))
			}
			c := pod.Containers[0]

			cfg, key := checkServerConfig(t, r, dep)
			checkTermination(t, pod, c, cfg)
			handler := probeHandler(cfg)
			checkProbes(t, c, handler)
			checkSecurity(t, pod, c)
			checkService(t, r, dep, c)

			// GPU variant: the device request, the CUDA image, all layers offloaded.
			gpus := c.Resources.Limits[corev1.ResourceName("nvidia.com/gpu")]
			if tc.gpu {
				if gpus.Cmp(resource.MustParse("1")) != 0 {
					t.Errorf("gpu: nvidia.com/gpu limit %s, want 1", gpus.String())
				}
				if !strings.HasSuffix(c.Image, ":cuda") {
					t.Errorf("gpu: image %q, want the CUDA image", c.Image)
				}
				if cfg.GPULayers != -1 {
					t.Errorf("gpu: --gpu-layers %d, want -1", cfg.GPULayers)
				}
				if pod.RuntimeClassName == nil || *pod.RuntimeClassName != "nvidia" {
					t.Errorf("gpu: runtimeClassName %v", pod.RuntimeClassName)
				}
				if !slices.ContainsFunc(pod.Tolerations, func(tl corev1.Toleration) bool { return tl.Key == "nvidia.com/gpu" }) {
					t.Errorf("gpu: no toleration of nvidia.com/gpu: %v", pod.Tolerations)
				}
			} else {
				if !gpus.IsZero() {
					t.Errorf("cpu: nvidia.com/gpu limit %s", gpus.String())
				}
				if strings.HasSuffix(c.Image, ":cuda") || cfg.GPULayers != 0 {
					t.Errorf("cpu: image %q, gpu-layers %d", c.Image, cfg.GPULayers)
				}
			}

			switch tc.apiKey {
			case "":
				if cfg.APIKey != "" {
					t.Errorf("an API key without one configured")
				}
			case "existing", "generated":
				if cfg.APIKey == "" || key.Name == "" {
					t.Errorf("no API key from a Secret")
				}
			default:
				if cfg.APIKey != tc.apiKey {
					t.Errorf("API key %q, want %q", cfg.APIKey, tc.apiKey)
				}
			}
			if tc.autoscale != "" && dep.Spec.Replicas != nil {
				t.Errorf("autoscaling: the Deployment sets replicas (%d), fighting the autoscaler", *dep.Spec.Replicas)
			}
			if tc.autoscale == "" && (dep.Spec.Replicas == nil || *dep.Spec.Replicas < 1) {
				t.Errorf("replicas %v", dep.Spec.Replicas)
			}

			metricsBody := scrapeMetrics(t, handler, cfg.APIKey)
			if tc.monitor {
				checkServiceMonitor(t, r, key, handler, cfg.APIKey)
			}
			switch tc.autoscale {
			case "hpa":
				checkHPA(t, r, dep, metricsBody)
			case "keda":
				checkScaledObject(t, r, dep, metricsBody)
			}
			if objs := r.byKind["PodDisruptionBudget"]; len(objs) == 1 {
				pdb := objs[0].(*policyv1.PodDisruptionBudget)
				if !selects(pdb.Spec.Selector.MatchLabels, dep.Spec.Template.Labels) {
					t.Errorf("PodDisruptionBudget selects %v, pods have %v", pdb.Spec.Selector.MatchLabels, dep.Spec.Template.Labels)
				}
				if (pdb.Spec.MinAvailable == nil) == (pdb.Spec.MaxUnavailable == nil) {
					t.Errorf("PodDisruptionBudget wants exactly one of minAvailable and maxUnavailable")
				}
			}
		})
	}
}

// checkServerConfig runs the container's arguments and environment through the server's
// own parser (config.Load, which validates). The model files are made as empty files in a
// temporary root, at the paths the pod would see, after checking those paths lie on the
// model volume. It returns the parsed config and the API key's Secret reference, if any.
func checkServerConfig(t *testing.T, r *rendered, dep *appsv1.Deployment) (*config.Config, corev1.SecretKeySelector) {
	t.Helper()
	c := dep.Spec.Template.Spec.Containers[0]
	known := configEnvNames()
	root := t.TempDir()
	env := map[string]string{}
	var key corev1.SecretKeySelector
	for _, e := range c.Env {
		if _, dup := env[e.Name]; dup {
			t.Errorf("env %s set twice", e.Name)
		}
		if strings.HasPrefix(e.Name, config.EnvPrefix) && !known[e.Name] {
			t.Errorf("env %s is not an elasticserve option (the server would ignore it)", e.Name)
		}
		v := e.Value
		if e.ValueFrom != nil {
			ref := e.ValueFrom.SecretKeyRef
			if ref == nil || e.Value != "" {
				t.Fatalf("env %s: only a plain value or a secretKeyRef is expected", e.Name)
			}
			key = *ref
			v = secretValue(t, r, ref)
		}
		switch e.Name {
		case "ELASTICSERVE_MODEL", "ELASTICSERVE_MMPROJ":
			if v == "" && e.Name == "ELASTICSERVE_MMPROJ" {
				break
			}
			if !path.IsAbs(v) {
				t.Fatalf("%s=%q is not an absolute path", e.Name, v)
			}
			checkOnModelVolume(t, dep, c, v)
			p := filepath.Join(root, filepath.FromSlash(v))
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			v = p
		}
		env[e.Name] = v
	}
	if _, ok := env["ELASTICSERVE_MODEL"]; !ok {
		t.Fatalf("no ELASTICSERVE_MODEL in the container's environment")
	}
	cfg, err := config.Load(c.Args, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatalf("the server refuses the rendered configuration: %v\nargs %q\nenv %v", err, c.Args, env)
	}
	return cfg, key
}

// checkOnModelVolume: a model path is on the read-only model volume, or (source=image)
// in the directory the Dockerfile copies the demo model to.
func checkOnModelVolume(t *testing.T, dep *appsv1.Deployment, c corev1.Container, p string) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == "models" && strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/") {
			if !m.ReadOnly {
				t.Errorf("the model volume is mounted read-write")
			}
			if !slices.ContainsFunc(dep.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool {
				return v.Name == "models"
			}) {
				t.Errorf("no models volume in the pod: %+v", dep.Spec.Template.Spec.Volumes)
			}
			return
		}
	}
	const bundled = "/app/models/demo/"
	if strings.HasPrefix(p, bundled) {
		if !strings.Contains(string(readRepoFile(t, "Dockerfile")), bundled) {
			t.Errorf("%s: the Dockerfile does not copy the demo model to %s", p, bundled)
		}
		if _, err := os.Stat(repoFile(t, "models/demo/"+strings.TrimPrefix(p, bundled))); err != nil {
			t.Errorf("%s: %v", p, err)
		}
		return
	}
	t.Errorf("model path %s is on no volume mount (%+v)", p, c.VolumeMounts)
}

func secretValue(t *testing.T, r *rendered, ref *corev1.SecretKeySelector) string {
	t.Helper()
	for _, o := range r.byKind["Secret"] {
		s := o.(*corev1.Secret)
		if s.Name != ref.Name {
			continue
		}
		v, ok := s.Data[ref.Key]
		if !ok {
			t.Fatalf("Secret %s has no key %q", s.Name, ref.Key)
		}
		if len(v) < 16 {
			t.Errorf("Secret %s: key of %d bytes", s.Name, len(v))
		}
		return string(v)
	}
	return "from-an-existing-secret" // not rendered by the chart (apiKey.existingSecret)
}

// configEnvNames is every ELASTICSERVE_* variable the server reads.
func configEnvNames() map[string]bool {
	names := map[string]bool{}
	typ := reflect.TypeFor[config.Config]()
	for i := range typ.NumField() {
		if tag := typ.Field(i).Tag.Get("env"); tag != "" {
			names[config.EnvPrefix+tag] = true
		}
	}
	return names
}

// checkTermination: the pod's grace covers the preStop sleep, the server's drain grace
// and the 5 s the server may add to send the final errors.
func checkTermination(t *testing.T, pod corev1.PodSpec, c corev1.Container, cfg *config.Config) {
	t.Helper()
	if pod.TerminationGracePeriodSeconds == nil {
		t.Fatalf("no terminationGracePeriodSeconds")
	}
	tgps := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	var preStop time.Duration
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil {
		cmd := c.Lifecycle.PreStop.Exec.Command
		if len(cmd) != 2 || cmd[0] != "sleep" {
			t.Fatalf("preStop %q, want [sleep N]", cmd)
		}
		n, err := strconv.Atoi(cmd[1])
		if err != nil {
			t.Fatalf("preStop %q: %v", cmd, err)
		}
		preStop = time.Duration(n) * time.Second
	}
	if need := preStop + cfg.ShutdownGrace + 5*time.Second; tgps <= need {
		t.Errorf("terminationGracePeriodSeconds %s <= preStop %s + shutdown grace %s + 5s", tgps, preStop, cfg.ShutdownGrace)
	}
}

// checkProbes: startup, liveness and readiness probe GET routes the server serves
// without the API key (the kubelet sends none), on the container's named port.
func checkProbes(t *testing.T, c corev1.Container, h http.Handler) {
	t.Helper()
	probes := map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe}
	paths := map[string]string{}
	for name, p := range probes {
		if p == nil || p.HTTPGet == nil {
			t.Fatalf("%s probe: want an httpGet probe, got %+v", name, p)
		}
		if p.HTTPGet.Port != intstr.FromString("http") || !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool { return cp.Name == "http" }) {
			t.Errorf("%s probe on port %v, the container's ports are %+v", name, p.HTTPGet.Port, c.Ports)
		}
		paths[name] = p.HTTPGet.Path
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, p.HTTPGet.Path, nil))
		if rec.Code == http.StatusNotFound || rec.Code == http.StatusMethodNotAllowed {
			t.Errorf("%s probe: GET %s is not a route of the server (%d)", name, p.HTTPGet.Path, rec.Code)
		} else if rec.Code != http.StatusOK {
			t.Errorf("%s probe: GET %s answers %d on a ready server (API key needed?)", name, p.HTTPGet.Path, rec.Code)
		}
	}
	if paths["liveness"] != "/health" || paths["readiness"] != "/ready" {
		t.Errorf("liveness on %q, readiness on %q; want /health and /ready", paths["liveness"], paths["readiness"])
	}
	// Model loading: the server listens only once the model is loaded.
	if s := c.StartupProbe; time.Duration(s.PeriodSeconds*s.FailureThreshold)*time.Second < 5*time.Minute {
		t.Errorf("startup probe allows %ds for loading the model, want >= 5 minutes", s.PeriodSeconds*s.FailureThreshold)
	}
}

func checkSecurity(t *testing.T, pod corev1.PodSpec, c corev1.Container) {
	t.Helper()
	psc, sc := pod.SecurityContext, c.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("pod securityContext %+v: want runAsNonRoot with a non-zero runAsUser", psc)
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container securityContext %+v: want readOnlyRootFilesystem, no privilege escalation", sc)
	}
	if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == "/tmp" && !m.ReadOnly }) {
		t.Errorf("no writable /tmp under a read-only root filesystem")
	}
	// The image's USER must be numeric for runAsNonRoot to be checkable, and match.
	for _, f := range []string{"Dockerfile", "Dockerfile.cuda"} {
		if !strings.Contains(string(readRepoFile(t, f)), "\nUSER "+strconv.FormatInt(*psc.RunAsUser, 10)+":") {
			t.Errorf("%s: no numeric USER %d (the chart's runAsUser)", f, *psc.RunAsUser)
		}
	}
}

func checkService(t *testing.T, r *rendered, dep *appsv1.Deployment, c corev1.Container) {
	t.Helper()
	svc := r.one(t, "Service").(*corev1.Service)
	if !selects(dep.Spec.Selector.MatchLabels, dep.Spec.Template.Labels) {
		t.Errorf("Deployment selector %v does not select its pods %v", dep.Spec.Selector.MatchLabels, dep.Spec.Template.Labels)
	}
	if !selects(svc.Spec.Selector, dep.Spec.Template.Labels) {
		t.Errorf("Service selector %v does not select the pods %v", svc.Spec.Selector, dep.Spec.Template.Labels)
	}
	for _, p := range svc.Spec.Ports {
		if !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool { return intstr.FromString(cp.Name) == p.TargetPort }) {
			t.Errorf("Service port %s targets %v, not a container port", p.Name, p.TargetPort)
		}
	}
}

func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// scrapeMetrics GETs /metrics as Prometheus would (with the key when one is set).
func scrapeMetrics(t *testing.T, h http.Handler, key string) string {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics: %d", rec.Code)
	}
	body, _ := io.ReadAll(rec.Body)
	for _, m := range []string{metricQueueDepth, metricRunning, metricKVUsage} {
		if !hasMetric(string(body), m) {
			t.Errorf("/metrics has no %s", m)
		}
	}
	return string(body)
}

func hasMetric(body, name string) bool {
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") {
			return true
		}
	}
	return false
}

func checkServiceMonitor(t *testing.T, r *rendered, key corev1.SecretKeySelector, h http.Handler, apiKey string) {
	t.Helper()
	sm := r.one(t, "ServiceMonitor").(*monitoringv1.ServiceMonitor)
	svc := r.one(t, "Service").(*corev1.Service)
	if !selects(sm.Spec.Selector.MatchLabels, svc.Labels) {
		t.Errorf("ServiceMonitor selects %v, the Service has labels %v", sm.Spec.Selector.MatchLabels, svc.Labels)
	}
	if len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("ServiceMonitor endpoints: %d", len(sm.Spec.Endpoints))
	}
	ep := sm.Spec.Endpoints[0]
	if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port }) {
		t.Errorf("ServiceMonitor scrapes port %v, not a Service port", ep.Port)
	}
	if ep.Path != "/metrics" {
		t.Errorf("ServiceMonitor path %q", ep.Path)
	}
	auth := ep.Authorization
	if apiKey == "" {
		if auth != nil {
			t.Errorf("ServiceMonitor sends credentials without an API key")
		}
		return
	}
	// /metrics is behind the key: without it the scrape fails, so the ServiceMonitor
	// must send the pod's own key.
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusUnauthorized {
		t.Errorf("GET /metrics without the key: %d, want 401", rec.Code)
	}
	if auth == nil || auth.Credentials == nil || (auth.Type != "" && auth.Type != "Bearer") {
		t.Fatalf("ServiceMonitor sends no Bearer credentials: %+v", auth)
	}
	if auth.Credentials.Name != key.Name || auth.Credentials.Key != key.Key {
		t.Errorf("ServiceMonitor token from %s/%s, the pod's key from %s/%s", auth.Credentials.Name, auth.Credentials.Key, key.Name, key.Key)
	}
}

func checkHPA(t *testing.T, r *rendered, dep *appsv1.Deployment, metrics string) {
	t.Helper()
	hpa := r.one(t, "HorizontalPodAutoscaler").(*autoscalingv2.HorizontalPodAutoscaler)
	if ref := hpa.Spec.ScaleTargetRef; ref.Kind != "Deployment" || ref.Name != dep.Name || ref.APIVersion != "apps/v1" {
		t.Errorf("HPA scales %+v", ref)
	}
	if hpa.Spec.MinReplicas == nil || *hpa.Spec.MinReplicas > hpa.Spec.MaxReplicas {
		t.Errorf("HPA replicas %v..%d", hpa.Spec.MinReplicas, hpa.Spec.MaxReplicas)
	}
	var names []string
	for _, m := range hpa.Spec.Metrics {
		if m.Type != autoscalingv2.PodsMetricSourceType || m.Pods == nil || m.Pods.Target.AverageValue == nil {
			t.Errorf("HPA metric %+v: want a Pods metric with an AverageValue target", m)
			continue
		}
		names = append(names, m.Pods.Metric.Name)
		if !hasMetric(metrics, m.Pods.Metric.Name) {
			t.Errorf("HPA metric %s is not on /metrics", m.Pods.Metric.Name)
		}
		if m.Pods.Metric.Name == metricKVUsage {
			if v := m.Pods.Target.AverageValue.AsApproximateFloat64(); v <= 0 || v > 1 {
				t.Errorf("KV usage target %v outside (0, 1]", v)
			}
		}
	}
	sort.Strings(names)
	if !slices.Equal(names, []string{metricKVUsage, metricQueueDepth}) {
		t.Errorf("HPA metrics %v", names)
	}
}

func checkScaledObject(t *testing.T, r *rendered, dep *appsv1.Deployment, metrics string) {
	t.Helper()
	so := r.one(t, "ScaledObject").(*scaledObject)
	if ref := so.Spec.ScaleTargetRef; ref.Name != dep.Name || ref.Kind != "Deployment" {
		t.Errorf("ScaledObject scales %+v", ref)
	}
	var found []string
	for _, tr := range so.Spec.Triggers {
		if tr.Type != "prometheus" {
			t.Errorf("trigger type %q", tr.Type)
		}
		for _, k := range []string{"serverAddress", "query", "threshold"} {
			if tr.Metadata[k] == "" {
				t.Errorf("trigger %s: no %s", tr.Name, k)
			}
		}
		if _, err := strconv.ParseFloat(tr.Metadata["threshold"], 64); err != nil {
			t.Errorf("trigger %s: threshold %q", tr.Name, tr.Metadata["threshold"])
		}
		for _, m := range []string{metricQueueDepth, metricKVUsage} {
			if strings.Contains(tr.Metadata["query"], m+"{") {
				found = append(found, m)
				if !hasMetric(metrics, m) {
					t.Errorf("trigger %s queries %s, not on /metrics", tr.Name, m)
				}
			}
		}
		if !slices.Contains([]autoscalingv2.MetricTargetType{autoscalingv2.AverageValueMetricType, autoscalingv2.ValueMetricType}, tr.MetricType) {
			t.Errorf("trigger %s: metricType %q", tr.Name, tr.MetricType)
		}
	}
	sort.Strings(found)
	if !slices.Equal(found, []string{metricKVUsage, metricQueueDepth}) {
		t.Errorf("ScaledObject triggers query %v", found)
	}
}

// fakeBackend is a ready engine for the probe and metrics checks. The embedded
// interface keeps it compiling when api.Backend grows; only these methods are called.
type fakeBackend struct{ api.Backend }

func (*fakeBackend) Submit(context.Context, *completion.Request) (<-chan completion.Event, error) {
	return nil, completion.ErrShuttingDown
}
func (*fakeBackend) Info() api.BackendInfo {
	return api.BackendInfo{ModelID: "model.gguf", Created: time.Unix(1700000000, 0), CtxPerSeq: 2048, Vision: true, Slots: 4}
}
func (*fakeBackend) Stats() completion.Stats {
	return completion.Stats{QueueDepth: 3, SlotsBusy: 4, SlotsTotal: 4, KVCellsUsed: 6000, KVCellsTotal: 8192}
}
func (*fakeBackend) Ready() bool { return true }

// probeHandler is the API of a ready server started with cfg, as far as probes
// and health checks see it: which routes answer without a key depends on
// --api-key alone (cmd/elasticserve passes the other options, which these
// paths do not read).
func probeHandler(cfg *config.Config) http.Handler {
	return api.New(api.Options{APIKey: cfg.APIKey}, &fakeBackend{}, zerolog.Nop())
}

// TestServerOptionsMatchConfig: the chart's list of `server:` options plus the options it
// sets itself are exactly the server's flags, so every option can be set from values and
// an unknown name fails `helm install`.
func TestServerOptionsMatchConfig(t *testing.T) {
	chartNames := map[string]string{}
	for _, name := range strings.Fields(templateBlock(t, "elasticserve.serverOptions")) {
		chartNames[config.EnvName(name)] = "server." + name
	}
	for _, line := range strings.Split(strings.TrimSpace(templateBlock(t, "elasticserve.managedOptions")), "\n") {
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			t.Fatalf("managedOptions line %q", line)
		}
		if prev, dup := chartNames[config.EnvName(name)]; dup {
			t.Errorf("%s is both %s and set by the chart", name, prev)
		}
		chartNames[config.EnvName(name)] = strings.TrimSpace(value)
	}
	want := configEnvNames()
	for env := range want {
		if _, ok := chartNames[env]; !ok {
			t.Errorf("config option %s cannot be set from the chart: add its flag name to elasticserve.serverOptions in deploy/helm/elasticserve/templates/_helpers.tpl", env)
		}
	}
	for env, where := range chartNames {
		if !want[env] {
			t.Errorf("chart option %s (%s) is not a config option", where, env)
		}
	}
	// The list is the one the flags are declared with (names, not just env tags).
	usage := config.Usage()
	for env, where := range chartNames {
		flagName := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(env, config.EnvPrefix), "_", "-"))
		if !strings.Contains(usage, "-"+flagName+" ") && !strings.Contains(usage, "-"+flagName+"\n") {
			t.Errorf("%s: no flag --%s in the server's --help", where, flagName)
		}
	}
}

// TestChartRefusesBadValues: mistakes fail `helm install` with a message instead of
// rendering a pod that would crash-loop or drop streams.
func TestChartRefusesBadValues(t *testing.T) {
	cases := []struct{ name, overrides, want string }{
		{"unknown option", `{server: {ctx-sise: 4096}}`, "server.ctx-sise: not an elasticserve option"},
		{"option set by the chart", `{server: {api-key: secret}}`, "server.api-key: set by the chart; use apiKey"},
		{"grace set in server", `{server: {shutdown-grace: 10s}}`, "use shutdownGraceSeconds"},
		{"margin too small", `{terminationMarginSeconds: 2}`, "terminationMarginSeconds must be >= 6"},
		{"model source", `{model: {source: s3}}`, "model.source must be pvc, volume or image"},
		{"volume without source", `{model: {source: volume}}`, "needs model.volume"},
		{"bundled model on GPU", `{model: {source: image}, gpu: {enabled: true}}`, "only the CPU image bundles a model"},
		{"both PDB bounds", `{podDisruptionBudget: {minAvailable: 1, maxUnavailable: 1}}`, "set only one of maxUnavailable and minAvailable"},
		{"autoscaling mode", `{autoscaling: {enabled: true, mode: vpa}}`, "autoscaling.mode must be hpa or keda"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, tc.overrides)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("render error %v, want one containing %q", err, tc.want)
			}
		})
	}
}
