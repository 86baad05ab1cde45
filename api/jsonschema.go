package api

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// What structured output can enforce. Generation is constrained by a grammar made
// from the schema by llama.cpp's converter; the converter silently ignores keywords
// it does not know, so a schema is checked here first and every keyword outside
// this list is refused by name, rather than promised and not kept.
var (
	// schemaAnnotations change nothing that is generated.
	schemaAnnotations = map[string]bool{
		"title": true, "description": true, "default": true, "examples": true, "$schema": true,
		"$id": true, "$comment": true, "deprecated": true, "readOnly": true, "writeOnly": true,
		"discriminator": true, // OpenAPI's hint over oneOf/anyOf: the alternatives themselves are enforced
	}
	schemaTypes = map[string]bool{
		"string": true, "number": true, "integer": true, "boolean": true, "null": true, "object": true, "array": true,
	}
	// schemaFormats are the string formats the converter has rules for.
	schemaFormats = map[string]bool{
		"date": true, "time": true, "date-time": true,
		"uuid": true, "uuid1": true, "uuid2": true, "uuid3": true, "uuid4": true, "uuid5": true,
	}
)

// maxSchemaDepth bounds nesting: the converter recurses once per level.
const maxSchemaDepth = 32

// schemaProblem is one reason a schema cannot be enforced.
type schemaProblem struct {
	path string // JSON pointer inside the schema ("" is the root)
	msg  string
}

// checkSchema reports why schema cannot be enforced, or nil when it can. The
// problems are sorted by path so the message is stable.
func checkSchema(schema json.RawMessage) []schemaProblem {
	var v any
	dec := json.NewDecoder(strings.NewReader(string(schema)))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return []schemaProblem{{"", "the schema is not valid JSON: " + err.Error()}}
	}
	c := &schemaChecker{}
	c.schema(v, "", 0)
	sort.SliceStable(c.problems, func(i, j int) bool { return c.problems[i].path < c.problems[j].path })
	return c.problems
}

type schemaChecker struct{ problems []schemaProblem }

func (c *schemaChecker) add(path, format string, a ...any) {
	c.problems = append(c.problems, schemaProblem{path, fmt.Sprintf(format, a...)})
}

// schema checks one (sub)schema at path, its keywords in sorted order.
func (c *schemaChecker) schema(v any, path string, depth int) {
	if depth > maxSchemaDepth {
		c.add(path, "the schema nests deeper than %d levels", maxSchemaDepth)
		return
	}
	obj, ok := v.(map[string]any)
	if !ok {
		c.add(path, "a schema must be a JSON object, not %s", jsonTypeOf(v))
		return
	}
	types := c.types(obj["type"], path)
	for _, k := range sortedKeys(obj) {
		val, at := obj[k], path+"/"+escapePointer(k)
		if schemaAnnotations[k] || k == "type" || k == "const" {
			continue
		}
		if c.subschemas(k, val, at, depth) || c.constraint(k, val, at, types) {
			continue
		}
		c.add(at, "keyword %q is not supported", k)
	}
}

// subschemas checks a keyword whose value holds schemas; false when k is not
// one.
func (c *schemaChecker) subschemas(k string, val any, at string, depth int) bool {
	switch k {
	case "properties", "$defs", "definitions":
		m, ok := val.(map[string]any)
		if !ok {
			c.add(at, "%s must be an object of schemas", k)
			return true
		}
		for _, name := range sortedKeys(m) {
			c.schema(m[name], at+"/"+escapePointer(name), depth+1)
		}
	case "additionalProperties":
		if _, ok := val.(bool); !ok {
			c.schema(val, at, depth+1)
		}
	case "items":
		if a, ok := val.([]any); ok {
			for i, x := range a {
				c.schema(x, fmt.Sprintf("%s/%d", at, i), depth+1)
			}
		} else {
			c.schema(val, at, depth+1)
		}
	case "prefixItems", "anyOf", "oneOf", "allOf":
		a, ok := val.([]any)
		if !ok || len(a) == 0 {
			c.add(at, "%s must be a non-empty array of schemas", k)
			return true
		}
		for i, x := range a {
			c.schema(x, fmt.Sprintf("%s/%d", at, i), depth+1)
		}
	default:
		return false
	}
	return true
}

// constraint checks a keyword that restricts the value itself (types: the
// schema's type names); false when k is not one.
func (c *schemaChecker) constraint(k string, val any, at string, types []string) bool {
	switch k {
	case "enum":
		if a, ok := val.([]any); !ok || len(a) == 0 {
			c.add(at, "enum must be a non-empty array")
		}
	case "required":
		c.required(val, at)
	case "minItems", "maxItems", "minLength", "maxLength":
		if !isCount(val) {
			c.add(at, "%s must be a non-negative integer", k)
		}
	case "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum":
		// The converter bounds integers only; a bound on a number would be ignored.
		if len(types) != 1 || types[0] != "integer" {
			c.add(at, "%s is supported on {\"type\": \"integer\"} only", k)
		} else if !isInteger(val) {
			c.add(at, "%s must be an integer", k)
		}
	case "pattern":
		p, ok := val.(string)
		if !ok || !strings.HasPrefix(p, "^") || !strings.HasSuffix(p, "$") {
			c.add(at, "pattern must be a string that starts with ^ and ends with $")
		}
	case "format":
		f, _ := val.(string)
		if !schemaFormats[f] {
			c.add(at, "format %q is not supported (supported: date, time, date-time, uuid)", f)
		}
	case "$ref":
		r, _ := val.(string)
		if !strings.HasPrefix(r, "#") {
			c.add(at, "only local references (\"#/$defs/...\") are supported, not %q", r)
		}
	default:
		return false
	}
	return true
}

func (c *schemaChecker) required(val any, at string) {
	a, ok := val.([]any)
	if !ok {
		c.add(at, "required must be an array of property names")
		return
	}
	for _, x := range a {
		if _, ok := x.(string); !ok {
			c.add(at, "required must be an array of property names")
			return
		}
	}
}

// types returns the schema's type names ("type" is a string or an array of them).
func (c *schemaChecker) types(v any, path string) []string {
	var names []string
	switch t := v.(type) {
	case nil:
		return nil
	case string:
		names = []string{t}
	case []any:
		for _, x := range t {
			s, _ := x.(string)
			names = append(names, s)
		}
	default:
		c.add(path+"/type", "type must be a string or an array of strings")
		return nil
	}
	for _, n := range names {
		if !schemaTypes[n] {
			c.add(path+"/type", "unknown type %q", n)
		}
	}
	return names
}

func isCount(v any) bool {
	n, ok := v.(json.Number)
	if !ok {
		return false
	}
	i, err := n.Int64()
	return err == nil && i >= 0 && i <= 1<<20
}

func isInteger(v any) bool {
	n, ok := v.(json.Number)
	if !ok {
		return false
	}
	_, err := n.Int64()
	return err == nil
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// escapePointer escapes a JSON-pointer token (RFC 6901).
func escapePointer(s string) string {
	return strings.NewReplacer("~", "~0", "/", "~1").Replace(s)
}

func jsonTypeOf(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	case string:
		return "a string"
	case []any:
		return "an array"
	}
	return "an object"
}

// schemaError is the 400 for a schema at param that cannot be enforced.
func schemaError(param string, problems []schemaProblem) *apiError {
	const most = 5
	parts := make([]string, 0, min(len(problems), most))
	for _, p := range problems[:min(len(problems), most)] {
		where := p.path
		if where == "" {
			where = "/"
		}
		parts = append(parts, where+": "+p.msg)
	}
	more := ""
	if len(problems) > most {
		more = fmt.Sprintf(" (and %d more)", len(problems)-most)
	}
	return badRequest(param, "unsupported_schema", "%s cannot be enforced: %s%s", param, strings.Join(parts, "; "), more)
}
