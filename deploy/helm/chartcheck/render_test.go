package chartcheck

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const (
	chartDir    = "../elasticserve"
	releaseName = "es"
	namespace   = "llm"
)

// scaledObject is the part of KEDA's keda.sh/v1alpha1 ScaledObject the chart writes
// (field names from KEDA's reference); any other field fails the strict decode.
type scaledObject struct {
	metav1.TypeMeta `json:",inline"`
	Metadata        metav1.ObjectMeta `json:"metadata"`
	Spec            struct {
		ScaleTargetRef struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Name       string `json:"name"`
		} `json:"scaleTargetRef"`
		MinReplicaCount *int32 `json:"minReplicaCount"`
		MaxReplicaCount *int32 `json:"maxReplicaCount"`
		PollingInterval *int32 `json:"pollingInterval"`
		CooldownPeriod  *int32 `json:"cooldownPeriod"`
		Advanced        *struct {
			HorizontalPodAutoscalerConfig *struct {
				Behavior *autoscalingv2.HorizontalPodAutoscalerBehavior `json:"behavior"`
			} `json:"horizontalPodAutoscalerConfig"`
		} `json:"advanced"`
		Triggers []struct {
			Type       string                         `json:"type"`
			Name       string                         `json:"name"`
			MetricType autoscalingv2.MetricTargetType `json:"metricType"`
			Metadata   map[string]string              `json:"metadata"`
		} `json:"triggers"`
	} `json:"spec"`
}

// newObject returns the Go type a rendered object must decode into.
func newObject(apiVersion, kind string) (any, bool) {
	switch apiVersion + " " + kind {
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, true
	case "v1 Service":
		return &corev1.Service{}, true
	case "v1 PersistentVolumeClaim":
		return &corev1.PersistentVolumeClaim{}, true
	case "v1 Secret":
		return &corev1.Secret{}, true
	case "v1 ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, true
	case "autoscaling/v2 HorizontalPodAutoscaler":
		return &autoscalingv2.HorizontalPodAutoscaler{}, true
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}, true
	case "keda.sh/v1alpha1 ScaledObject":
		return &scaledObject{}, true
	}
	return nil, false
}

// rendered is one chart rendering, every object decoded strictly.
type rendered struct {
	kinds   []string // "Kind/name", sorted
	byKind  map[string][]any
	sources map[string]string // object key -> template file
}

func (r *rendered) one(t *testing.T, kind string) any {
	t.Helper()
	objs := r.byKind[kind]
	if len(objs) != 1 {
		t.Fatalf("want exactly one %s, got %d (objects: %v)", kind, len(objs), r.kinds)
	}
	return objs[0]
}

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	if ch.Metadata.APIVersion != chart.APIVersionV2 {
		t.Fatalf("chart apiVersion %q, want %q (Helm 3)", ch.Metadata.APIVersion, chart.APIVersionV2)
	}
	if err := ch.Validate(); err != nil {
		t.Fatalf("chart metadata: %v", err)
	}
	return ch
}

// render renders the chart with override values (YAML) as `helm install` would (without
// a cluster: lookup finds nothing).
func render(t *testing.T, overrides string) (map[string]string, error) {
	t.Helper()
	ch := loadChart(t)
	vals, err := chartutil.ReadValues([]byte(overrides))
	if err != nil {
		t.Fatalf("override values: %v", err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: namespace, Revision: 1, IsInstall: true,
	}, caps)
	if err != nil {
		t.Fatalf("render values: %v", err)
	}
	return engine.Engine{Strict: true}.Render(ch, rv)
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// renderObjects renders and decodes every object strictly into its API type.
func renderObjects(t *testing.T, overrides string) *rendered {
	t.Helper()
	files, err := render(t, overrides)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	r := &rendered{byKind: map[string][]any{}, sources: map[string]string{}}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !strings.HasSuffix(name, ".yaml") {
			continue // NOTES.txt, helpers
		}
		for _, doc := range docSep.Split(files[name], -1) {
			if strings.TrimSpace(doc) == "" || isOnlyComments(doc) {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s: not YAML: %v\n%s", name, err, doc)
			}
			obj, ok := newObject(tm.APIVersion, tm.Kind)
			if !ok {
				t.Fatalf("%s: no API type known for %s %s: add it to newObject", name, tm.APIVersion, tm.Kind)
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s: %s does not decode strictly: %v\n%s", name, tm.Kind, err, doc)
			}
			meta := objectMeta(obj)
			if meta.Name == "" {
				t.Fatalf("%s: %s without a name", name, tm.Kind)
			}
			key := tm.Kind + "/" + meta.Name
			if _, dup := r.sources[key]; dup {
				t.Fatalf("%s rendered twice (%s and %s)", key, r.sources[key], name)
			}
			r.sources[key] = name
			r.kinds = append(r.kinds, key)
			r.byKind[tm.Kind] = append(r.byKind[tm.Kind], obj)
		}
	}
	sort.Strings(r.kinds)
	return r
}

func isOnlyComments(doc string) bool {
	for _, l := range strings.Split(doc, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

func objectMeta(obj any) metav1.ObjectMeta {
	switch o := obj.(type) {
	case *scaledObject:
		return o.Metadata
	case metav1.Object:
		return metav1.ObjectMeta{Name: o.GetName(), Namespace: o.GetNamespace(), Labels: o.GetLabels()}
	}
	panic(fmt.Sprintf("no metadata for %T", obj))
}

// repoFile is a path in the repository root.
func repoFile(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func readRepoFile(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(repoFile(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// templateBlock returns the body of {{- define "name" -}} ... {{- end -}} in _helpers.tpl.
func templateBlock(t *testing.T, name string) string {
	t.Helper()
	src := readRepoFile(t, "deploy/helm/elasticserve/templates/_helpers.tpl")
	start := bytes.Index(src, []byte(`{{- define "`+name+`" -}}`))
	if start < 0 {
		t.Fatalf("_helpers.tpl has no define %q", name)
	}
	body := src[start:]
	body = body[bytes.IndexByte(body, '\n')+1:]
	end := bytes.Index(body, []byte("{{- end -}}"))
	if end < 0 {
		t.Fatalf("define %q has no end", name)
	}
	return string(body[:end])
}
