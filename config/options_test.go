package config

import (
	"flag"
	"reflect"
	"strings"
	"testing"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// derived are Config's fields that are not options (Load sets them).
var derived = map[string]bool{"ThreadsSource": true}

// Every option is declared once, by its field's tags, and nothing else
// declares one: each exported field is an option or derived, each option has
// help, a flag and an environment variable of its own, appears in --help once
// with its env name, and its envDefault is the default the flag shows.
func TestOptionsDeclaredOnce(t *testing.T) {
	typ := reflect.TypeFor[Config]()
	byField := map[string]option{}
	for _, o := range options {
		byField[typ.Field(o.field).Name] = o
	}
	for i := range typ.NumField() {
		f := typ.Field(i)
		if _, ok := byField[f.Name]; !ok && !derived[f.Name] {
			t.Errorf("field %s has no env tag: declare it as an option or list it in derived", f.Name)
		}
	}
	defaults := &Config{}
	if err := loadEnv(defaults, func(string) (string, bool) { return "", false }); err != nil {
		t.Fatal(err)
	}
	fs := newFlagSet(defaults)
	usage := Usage()
	flags, logKeys := map[string]string{}, map[string]string{}
	for _, o := range options {
		field := typ.Field(o.field)
		t.Run(o.flag, func(t *testing.T) {
			if prev, dup := flags[o.flag]; dup {
				t.Errorf("--%s is declared by %s and %s", o.flag, prev, field.Name)
			}
			flags[o.flag] = field.Name
			if o.logKey != "" {
				if prev, dup := logKeys[o.logKey]; dup {
					t.Errorf("String key %s is declared by %s and %s", o.logKey, prev, field.Name)
				}
				logKeys[o.logKey] = field.Name
			}
			if strings.TrimSpace(o.help) == "" || strings.Contains(o.help, "(env ") {
				t.Errorf("help tag %q: want the text alone (newFlagSet names the env variable)", o.help)
			}
			if o.arg != "" && !strings.Contains(o.help, o.arg) {
				t.Errorf("arg %q is not a word of the help text", o.arg)
			}
			f := fs.Lookup(o.flag)
			if f == nil || f.Usage != o.usage() || !strings.HasSuffix(f.Usage, "(env "+EnvName(o.flag)+")") {
				t.Fatalf("flag %+v, want usage %q", f, o.usage())
			}
			lines := 0
			for _, l := range strings.Split(usage, "\n") {
				if name, _, _ := strings.Cut(strings.TrimPrefix(l, "  -"), " "); strings.HasPrefix(l, "  -") && name == o.flag {
					lines++
				}
			}
			if _, text := flag.UnquoteUsage(f); lines != 1 || !strings.Contains(usage, text) {
				t.Errorf("--help shows -%s %d times (want once, with its help)", o.flag, lines)
			}
			// The envDefault tag, parsed as the flag parses it, is the default
			// the environment reader applied: the default is written once.
			if def, ok := field.Tag.Lookup("envDefault"); ok {
				got := &Config{}
				if err := newFlagSet(got).Set(o.flag, def); err != nil {
					t.Fatalf("envDefault %q does not parse as --%s: %v", def, o.flag, err)
				}
				if want := reflect.ValueOf(defaults).Elem().Field(o.field).Interface(); reflect.ValueOf(got).Elem().Field(o.field).Interface() != want {
					t.Errorf("--%s=%s gives %v, the environment default is %v", o.flag, def, reflect.ValueOf(got).Elem().Field(o.field), want)
				}
			}
		})
	}
	// The help names the one list of policies, not a copy of it.
	if f := fs.Lookup("policy"); f == nil || !strings.HasSuffix(f.Usage, ": "+elasticcache.PolicyList()+" (env ELASTICSERVE_POLICY)") {
		t.Errorf("--policy help does not list elasticcache.Policies: %+v", f)
	}
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n != len(options) {
		t.Errorf("%d flags for %d options: a flag is declared outside the field tags", n, len(options))
	}
}

// String is the start-up summary: the options with a log tag, in field order,
// the API key redacted. Its keys are what operators grep for, so they are
// spelled out here.
func TestString(t *testing.T) {
	c := &Config{}
	if err := loadEnv(c, func(string) (string, bool) { return "", false }); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"defaults", func(*Config) {},
			"model= mmproj= alias= addr=127.0.0.1:8080 ctx-size=0 parallel=4 kv-unified=false prefill-ctx-size=0 prefill-streams=0 decode-flash-attn=auto kv-type=f16 threads=0 batch=512 ubatch=512 flash-attn=false policy=elastic budget=0.8 sink=4 distance=-25 selection=paper api-key= queue=64 ui=true"},
		{"set", func(c *Config) { c.Model, c.APIKey, c.Budget, c.UI = "/m.gguf", "sk-secret", 1e-7, false },
			"model=/m.gguf mmproj= alias= addr=127.0.0.1:8080 ctx-size=0 parallel=4 kv-unified=false prefill-ctx-size=0 prefill-streams=0 decode-flash-attn=auto kv-type=f16 threads=0 batch=512 ubatch=512 flash-attn=false policy=elastic budget=1e-07 sink=4 distance=-25 selection=paper api-key=(set) queue=64 ui=false"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := *c
			tt.change(&cc)
			if got := cc.String(); got != tt.want {
				t.Errorf("String()\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}
