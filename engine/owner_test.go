package engine

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// cellCalls are the llama.Context methods that read or change one sequence's
// cells.
var cellCalls = map[string]bool{
	"SeqRemove": true, "SeqClear": true, "SeqPosMin": true, "SeqPosMax": true, "SeqCells": true,
	"RewriteCells": true, "EvictCell": true, "ReadCellRows": true, "ExportCells": true,
	"ImportCells": true, "ReadSeqCache": true, "WriteSeqCache": true,
}

// seqCache is the only owner of a sequence's cells: no other engine file calls
// the llama operations on them, so the engine's record of which cell holds which
// entry cannot fall out of step with llama.cpp's behind seqCache's back.
func TestOnlySeqCacheTouchesCells(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") || f == "seqcache.go" {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		ast.Inspect(file, func(n ast.Node) bool {
			if call, ok := n.(*ast.CallExpr); ok {
				if sel, ok := call.Fun.(*ast.SelectorExpr); ok && cellCalls[sel.Sel.Name] {
					t.Errorf("%s: %s is called outside seqcache.go", fset.Position(call.Pos()), sel.Sel.Name)
				}
			}
			return true
		})
	}
	if checked < 10 {
		t.Fatalf("only %d engine files checked", checked)
	}
}
