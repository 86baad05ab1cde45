package testmodel

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// valuesOf reads every tensor of the pair Write produced in dir.
func valuesOf(t *testing.T, dir string) map[string][]float32 {
	t.Helper()
	out := map[string][]float32{}
	for _, name := range []string{ModelFile, MMProjFile} {
		f := readGGUF(t, filepath.Join(dir, name))
		for i := range f.tensors {
			out[f.tensors[i].name] = f.values(t, &f.tensors[i])
		}
	}
	return out
}

// Feeding WriteTrained the values Write generated gives the same bytes: the
// two share metadata, layout and encoding.
func TestWriteTrainedMatchesWrite(t *testing.T) {
	for _, f16 := range []bool{false, true} {
		opt := DefaultOptions()
		opt.F16 = f16
		ref := t.TempDir()
		if _, _, err := Write(ref, opt); err != nil {
			t.Fatal(err)
		}
		got := t.TempDir()
		if _, _, err := WriteTrained(got, Trained{Options: opt, Tensors: valuesOf(t, ref)}); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{ModelFile, MMProjFile} {
			a, _ := os.ReadFile(filepath.Join(ref, name))
			b, _ := os.ReadFile(filepath.Join(got, name))
			if !bytes.Equal(a, b) {
				t.Errorf("f16=%v %s: WriteTrained differs from Write (%d vs %d bytes)", f16, name, len(b), len(a))
			}
		}
	}
}

func TestWriteTrainedValuesAndNames(t *testing.T) {
	opt := DefaultOptions()
	specs, err := TensorSpecs(opt)
	if err != nil {
		t.Fatal(err)
	}
	tensors := map[string][]float32{}
	for k, s := range specs {
		v := make([]float32, s.Elements())
		for i := range v {
			v[i] = float32(k) + float32(i%97)/128 // exact in f16 too
		}
		tensors[s.Name] = v
	}
	dir := t.TempDir()
	mp, pp, err := WriteTrained(dir, Trained{Options: opt, Name: "demo", Description: "trained", Tensors: tensors})
	if err != nil {
		t.Fatal(err)
	}
	m, p := readGGUF(t, mp), readGGUF(t, pp)
	checkLayout(t, m)
	checkLayout(t, p)
	wantKV(t, m, "general.name", "demo")
	wantKV(t, p, "general.name", "demo-mmproj")
	wantKV(t, m, "general.description", "trained")
	wantKV(t, m, "tokenizer.chat_template", ChatTemplate)
	n := 0
	for _, f := range []*ggufFile{m, p} {
		for i := range f.tensors {
			ti := &f.tensors[i]
			got, want := f.values(t, ti), tensors[ti.name]
			if len(got) != len(want) {
				t.Fatalf("%s: %d values, want %d", ti.name, len(got), len(want))
			}
			for j := range got {
				if got[j] != want[j] {
					t.Fatalf("%s[%d] = %v, want %v", ti.name, j, got[j], want[j])
				}
			}
			n++
		}
	}
	if n != len(specs) {
		t.Errorf("%d tensors written, %d specs", n, len(specs))
	}
	if RoundF16(1.0/3) == float32(1.0/3) || math.Abs(float64(RoundF16(1.0/3))-1.0/3) > 1e-3 {
		t.Errorf("RoundF16(1/3) = %v", RoundF16(1.0/3))
	}
}

func TestWriteTrainedRejectsBadTensors(t *testing.T) {
	opt := DefaultOptions()
	specs, _ := TensorSpecs(opt)
	good := func() map[string][]float32 {
		m := map[string][]float32{}
		for _, s := range specs {
			m[s.Name] = make([]float32, s.Elements())
		}
		return m
	}
	for _, c := range []struct {
		name   string
		change func(map[string][]float32)
		want   string
	}{
		{"missing", func(m map[string][]float32) { delete(m, "output.weight") }, "output.weight is missing"},
		{"extra", func(m map[string][]float32) { m["blk.9.attn_q.weight"] = []float32{1} }, "blk.9.attn_q.weight is not part"},
		{"size", func(m map[string][]float32) { m["v.class_embd"] = m["v.class_embd"][1:] }, "v.class_embd has"},
		{"nan", func(m map[string][]float32) { m["mm.0.bias"][3] = float32(math.NaN()) }, "mm.0.bias: value 3"},
	} {
		m := good()
		c.change(m)
		dir := t.TempDir()
		_, _, err := WriteTrained(dir, Trained{Options: opt, Tensors: m})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", c.name, err, c.want)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("%s: files written despite the error", c.name)
		}
	}
}
