package testmodel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
)

// Trained weights.
//
// WriteTrained writes the same pair of files as Write -- same metadata keys,
// vocabulary, chat template, tensor names, shapes and element types -- but
// with tensor values supplied by the caller (a model trained elsewhere, e.g.
// tools/demo-vlm) instead of the seeded random fill. A trainer that mirrors
// the graph llama.cpp builds for these files (see the package documentation
// and TensorSpecs) gets a model that llama.cpp runs with the same results.

// TensorSpec names one tensor of the written files and its ggml shape: Dims[0]
// is the fastest varying dimension, so a matrix {in, out} is stored as out
// rows of in values (PyTorch's nn.Linear weight [out, in] in C order), and the
// patch embedding {P, P, 3, VisionEmbd} is a conv weight [VisionEmbd, 3, P, P].
type TensorSpec struct {
	File string // ModelFile or MMProjFile
	Name string
	Dims []uint64
	F16  bool // stored as float16 (matrices when Options.F16 is set)
}

// Elements is the number of values the tensor holds.
func (s TensorSpec) Elements() int {
	n := 1
	for _, d := range s.Dims {
		n *= int(d)
	}
	return n
}

// TensorSpecs lists every tensor Write and WriteTrained store for opt, text
// model first, in file order.
func TensorSpecs(opt Options) ([]TensorSpec, error) {
	if err := opt.validate(); err != nil {
		return nil, fmt.Errorf("testmodel: %w", err)
	}
	var out []TensorSpec
	add := func(file string, ts []tensorInfo) {
		for _, t := range ts {
			out = append(out, TensorSpec{File: file, Name: t.name, Dims: append([]uint64(nil), t.dims...), F16: t.typ == ggmlTypeF16})
		}
	}
	_, ts := opt.textModel()
	add(ModelFile, ts)
	_, ts = opt.mmproj()
	add(MMProjFile, ts)
	return out, nil
}

// Trained is a model whose weights come from training.
type Trained struct {
	Options Options // shapes; Seed is ignored, F16 picks the matrix type
	// Name and Description go to general.name and general.description of
	// model.gguf; the projector file gets Name + "-mmproj". Empty keeps the
	// test model's texts.
	Name        string
	Description string
	// Tensors holds every tensor of TensorSpecs(Options) by name, in ggml
	// order (see TensorSpec), as float32. Values are rounded to float16 for
	// tensors stored as float16.
	Tensors map[string][]float32
}

// WriteTrained writes dir/model.gguf and dir/mmproj.gguf with m's weights,
// creating dir if needed. Every tensor must be supplied with the right number
// of finite values; unknown names are an error too.
func WriteTrained(dir string, m Trained) (modelPath, mmprojPath string, err error) {
	opt := m.Options
	if err := opt.validate(); err != nil {
		return "", "", fmt.Errorf("testmodel: %w", err)
	}
	textKV, textTS := opt.textModel()
	projKV, projTS := opt.mmproj()
	used := make(map[string]bool, len(m.Tensors))
	var errs []error
	attach := func(ts []tensorInfo) {
		for i := range ts {
			t := &ts[i]
			v, ok := m.Tensors[t.name]
			switch {
			case !ok:
				errs = append(errs, fmt.Errorf("tensor %s is missing", t.name))
				continue
			case uint64(len(v)) != t.elements():
				errs = append(errs, fmt.Errorf("tensor %s has %d values, want %d (dims %v)", t.name, len(v), t.elements(), t.dims))
				continue
			}
			for j, x := range v {
				if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
					errs = append(errs, fmt.Errorf("tensor %s: value %d is %v", t.name, j, x))
					break
				}
			}
			used[t.name] = true
			t.data = v
		}
	}
	attach(textTS)
	attach(projTS)
	var unknown []string
	for name := range m.Tensors {
		if !used[name] {
			unknown = append(unknown, name)
		}
	}
	sort.Strings(unknown)
	for _, name := range unknown {
		errs = append(errs, fmt.Errorf("tensor %s is not part of the model", name))
	}
	if err := errors.Join(errs...); err != nil {
		return "", "", fmt.Errorf("testmodel: %w", err)
	}
	if m.Name != "" {
		setKV(textKV, "general.name", m.Name)
		setKV(projKV, "general.name", m.Name+"-mmproj")
	}
	if m.Description != "" {
		setKV(textKV, "general.description", m.Description)
		setKV(projKV, "general.description", m.Description)
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	modelPath = filepath.Join(dir, ModelFile)
	mmprojPath = filepath.Join(dir, MMProjFile)
	if err := writeFile(modelPath, textKV, textTS, 0); err != nil {
		return "", "", fmt.Errorf("testmodel: %s: %w", modelPath, err)
	}
	if err := writeFile(mmprojPath, projKV, projTS, 0); err != nil {
		return "", "", fmt.Errorf("testmodel: %s: %w", mmprojPath, err)
	}
	return modelPath, mmprojPath, nil
}

func setKV(kvs []kv, key string, val any) {
	for i := range kvs {
		if kvs[i].key == key {
			kvs[i].val = val
			return
		}
	}
}

// writeData streams a tensor's supplied values (t.data) to g in t's type.
func writeData(g *ggufWriter, t *tensorInfo) error {
	const chunk = 1 << 16
	size := 4
	if t.typ == ggmlTypeF16 {
		size = 2
	}
	buf := make([]byte, chunk*size)
	for start := 0; start < len(t.data); start += chunk {
		part := t.data[start:min(start+chunk, len(t.data))]
		b := buf[:len(part)*size]
		for i, x := range part {
			if t.typ == ggmlTypeF16 {
				binary.LittleEndian.PutUint16(b[2*i:], f32ToF16(x))
			} else {
				binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
			}
		}
		g.write(b)
	}
	return g.err
}

// RoundF16 is x rounded to the nearest float16 value (as stored in an F16
// file), for trainers that want to compute with exactly the written weights.
func RoundF16(x float32) float32 { return f16ToF32(f32ToF16(x)) }
