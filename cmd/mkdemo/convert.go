package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

// manifest is what tools/demo-vlm/export.py writes next to weights.bin.
type manifest struct {
	Options     testmodel.Options `json:"options"`
	Name        string            `json:"name"`
	Description string            `json:"description"`
	Tensors     []struct {
		Name   string `json:"name"`
		Shape  []int  `json:"shape"` // PyTorch shape (C order); ggml dims are the reverse
		Offset int64  `json:"offset"`
		Count  int    `json:"count"`
	} `json:"tensors"`
}

// loadTrained reads an exported weight folder.
func loadTrained(dir string) (testmodel.Trained, error) {
	var m manifest
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return testmodel.Trained{}, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return testmodel.Trained{}, fmt.Errorf("manifest.json: %w", err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "weights.bin"))
	if err != nil {
		return testmodel.Trained{}, err
	}
	specs, err := testmodel.TensorSpecs(m.Options)
	if err != nil {
		return testmodel.Trained{}, err
	}
	dims := map[string][]uint64{}
	for _, s := range specs {
		dims[s.Name] = s.Dims
	}
	tr := testmodel.Trained{Options: m.Options, Name: m.Name, Description: m.Description, Tensors: map[string][]float32{}}
	var errs []error
	for _, t := range m.Tensors {
		want, ok := dims[t.Name]
		if !ok {
			errs = append(errs, fmt.Errorf("%s: not a tensor of this model", t.Name))
			continue
		}
		// the PyTorch shape, reversed, must be the ggml shape
		if len(t.Shape) != len(want) {
			errs = append(errs, fmt.Errorf("%s: shape %v, want the reverse of %v", t.Name, t.Shape, want))
			continue
		}
		for i := range want {
			if uint64(t.Shape[len(t.Shape)-1-i]) != want[i] {
				errs = append(errs, fmt.Errorf("%s: shape %v, want the reverse of %v", t.Name, t.Shape, want))
				break
			}
		}
		end := t.Offset + 4*int64(t.Count)
		if t.Offset < 0 || end > int64(len(raw)) {
			errs = append(errs, fmt.Errorf("%s: bytes [%d, %d) outside weights.bin (%d bytes)", t.Name, t.Offset, end, len(raw)))
			continue
		}
		v := make([]float32, t.Count)
		for i := range v {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[t.Offset+4*int64(i):]))
		}
		tr.Tensors[t.Name] = v
	}
	return tr, errors.Join(errs...)
}

func convertCmd(fs *flag.FlagSet, args []string) error {
	in := fs.String("in", "", "folder with manifest.json and weights.bin (required)")
	out := fs.String("out", "models/demo", "output folder")
	f16 := fs.String("f16", "", `"true" or "false" overrides the manifest's choice of float16 matrices`)
	fs.Parse(args)
	if *in == "" {
		return errors.New("convert: --in is required")
	}
	tr, err := loadTrained(*in)
	if err != nil {
		return err
	}
	switch *f16 {
	case "true":
		tr.Options.F16 = true
	case "false":
		tr.Options.F16 = false
	case "":
	default:
		return fmt.Errorf("convert: --f16 %q: want true or false", *f16)
	}
	mp, pp, err := testmodel.WriteTrained(*out, tr)
	if err != nil {
		return err
	}
	var total int64
	for _, p := range []string{mp, pp} {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		total += st.Size()
		fmt.Printf("%s: %.2f MB\n", p, float64(st.Size())/1e6)
	}
	fmt.Printf("total %.2f MB, %d image tokens per image\n", float64(total)/1e6, tr.Options.ImageTokens())
	return nil
}
