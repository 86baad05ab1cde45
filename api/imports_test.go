package api

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"testing"
)

// api receives its settings as Options (cmd/elasticserve fills them from the
// server's configuration) and its cache setting as a validated Spec, so it
// must not read the configuration itself.
func TestAPIDoesNotImportConfig(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range files {
		f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			if path, _ := strconv.Unquote(imp.Path.Value); path == "github.com/elasticserve/elasticserve/config" {
				t.Errorf("%s imports %s: take the setting through Options instead", name, path)
			}
		}
	}
}
