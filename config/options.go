package config

import (
	"flag"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/elasticserve/elasticserve/elasticcache"
)

// A server option is declared once, as a field of Config with these tags:
//
//   - env: its name. The environment variable is EnvPrefix+env and the flag is
//     env lower-cased with '_' turned into '-' (CTX_SIZE: --ctx-size), so the
//     two cannot drift apart.
//   - envDefault: its default, which caarlos0/env applies and --help shows.
//   - help: its --help text; newFlagSet adds "(env NAME)". "{policies}" reads
//     as elasticcache.PolicyList(), so the help names the one list of policies.
//   - arg (optional): the word of help that names the value in --help (flag's
//     backquote rule, which a struct tag cannot spell).
//   - log (optional): its key in String, the start-up summary; "key,redact"
//     shows only whether it is set.
//
// Flag parsing, --help, String and the flag names in Validate's errors all read
// these tags through options; a field without an env tag is not an option (it
// is derived by Load).

// option is one server option as its Config field declares it.
type option struct {
	flag   string // "ctx-size"
	help   string // as given in the tag, placeholders not yet filled in
	arg    string
	logKey string // "": not in String
	redact bool
	field  int // index in Config
}

// options lists Config's options in field order.
var options = declaredOptions()

func declaredOptions() []option {
	typ := reflect.TypeFor[Config]()
	var out []option
	for i := range typ.NumField() {
		f := typ.Field(i)
		name := f.Tag.Get("env")
		if name == "" {
			continue
		}
		o := option{flag: strings.ToLower(strings.ReplaceAll(name, "_", "-")), help: f.Tag.Get("help"), arg: f.Tag.Get("arg"), field: i}
		if key, flags, _ := strings.Cut(f.Tag.Get("log"), ","); key != "" {
			o.logKey, o.redact = key, flags == "redact"
		}
		out = append(out, o)
	}
	return out
}

// isOption reports whether name is an option's flag name.
func isOption(name string) bool {
	for _, o := range options {
		if o.flag == name {
			return true
		}
	}
	return false
}

// usage is the option's --help text.
func (o option) usage() string {
	text := strings.ReplaceAll(o.help, "{policies}", elasticcache.PolicyList())
	if o.arg != "" {
		text = strings.Replace(text, o.arg, "`"+o.arg+"`", 1)
	}
	return text + " (env " + EnvName(o.flag) + ")"
}

// newFlagSet declares every option as a flag with cfg's current value as its
// default, so parsing only overrides what the command line sets. It panics on a
// field type it cannot parse (a declaration error, caught by the tests).
func newFlagSet(cfg *Config) *flag.FlagSet {
	fs := flag.NewFlagSet("elasticserve", flag.ContinueOnError)
	v := reflect.ValueOf(cfg).Elem()
	for _, o := range options {
		name, usage := o.flag, o.usage()
		switch p := v.Field(o.field).Addr().Interface().(type) {
		case flag.Value:
			fs.Var(p, name, usage)
		case *string:
			fs.StringVar(p, name, *p, usage)
		case *bool:
			fs.BoolVar(p, name, *p, usage)
		case *int:
			fs.IntVar(p, name, *p, usage)
		case *int64:
			fs.Int64Var(p, name, *p, usage)
		case *float64:
			fs.Float64Var(p, name, *p, usage)
		case *time.Duration:
			fs.DurationVar(p, name, *p, usage)
		default:
			panic(fmt.Sprintf("config: option --%s has a type %T that no flag parses", name, p))
		}
	}
	return fs
}

// String renders the options that have a log tag as key=value pairs in field
// order, for a start-up log line; redacted values show only "(set)".
func (c *Config) String() string {
	v := reflect.ValueOf(c).Elem()
	var b strings.Builder
	for _, o := range options {
		if o.logKey == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(o.logKey + "=" + logValue(v.Field(o.field), o.redact))
	}
	return b.String()
}

func logValue(f reflect.Value, redact bool) string {
	switch {
	case redact && f.IsZero():
		return ""
	case redact:
		return "(set)"
	case f.Kind() == reflect.Float64:
		return strconv.FormatFloat(f.Float(), 'g', -1, 64)
	}
	return fmt.Sprint(f.Interface())
}
