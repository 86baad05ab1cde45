package main

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/elasticserve/elasticserve/internal/eval/shapes"
)

// The training data of the demo VLM comes from internal/eval/shapes (the same
// generator as elastic-eval's synthetic set). `mkdemo data` writes the samples
// as JSON lines -- the shapes (enough for tools/demo-vlm/data.py to redraw
// the picture pixel for pixel) and the questions -- instead of PNG files, so
// hundreds of thousands of samples stay small; --png also writes the pictures.

type dataShape struct {
	Kind   string `json:"kind"`
	RGB    [3]int `json:"rgb"`
	X      int    `json:"x"`
	Y      int    `json:"y"`
	Radius int    `json:"r"`
}

type dataQA struct {
	Kind     string `json:"kind"`
	Question string `json:"q"`
	Answer   string `json:"a"`
}

type dataSample struct {
	ID     string      `json:"id"`
	Size   int         `json:"size"`
	Shapes []dataShape `json:"shapes"`
	QAs    []dataQA    `json:"qas"`
	Image  string      `json:"image,omitempty"`
}

func dataCmd(fs *flag.FlagSet, args []string) error {
	seed := fs.Int64("seed", 1000, "generator seed")
	start := fs.Int("start", 0, "first sample index")
	n := fs.Int("n", 1000, "samples")
	out := fs.String("out", "", "output .jsonl or .jsonl.gz (required)")
	pngDir := fs.String("png", "", "also write each picture as PNG into this folder")
	fs.Parse(args)
	if *out == "" || *n < 0 || *start < 0 {
		return errors.New("data: --out is required; --n and --start must be >= 0")
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	defer f.Close()
	var w io.Writer = f
	var gz *gzip.Writer
	if strings.HasSuffix(*out, ".gz") {
		gz = gzip.NewWriter(f)
		w = gz
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	enc := json.NewEncoder(bw)
	o := shapes.DefaultOptions()
	if *pngDir != "" {
		if err := os.MkdirAll(*pngDir, 0o755); err != nil {
			return err
		}
	}
	for i := *start; i < *start+*n; i++ {
		s, err := shapes.New(o, *seed, i)
		if err != nil {
			return err
		}
		d := dataSample{ID: fmt.Sprintf("%s-s%d", s.ID, *seed), Size: o.Size}
		for _, sh := range s.Shapes {
			c := sh.Color.RGBA
			d.Shapes = append(d.Shapes, dataShape{string(sh.Kind), [3]int{int(c.R), int(c.G), int(c.B)}, sh.Center.X, sh.Center.Y, sh.Radius})
		}
		for _, qa := range s.QAs {
			d.QAs = append(d.QAs, dataQA{string(qa.Kind), qa.Question, qa.Answer})
		}
		if *pngDir != "" {
			b, err := s.PNG()
			if err != nil {
				return err
			}
			d.Image = d.ID + ".png"
			if err := os.WriteFile(filepath.Join(*pngDir, d.Image), b, 0o644); err != nil {
				return err
			}
		}
		if err := enc.Encode(d); err != nil {
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if gz != nil {
		if err := gz.Close(); err != nil {
			return err
		}
	}
	return f.Close()
}
