// Command mkmodel writes a random-weight vision-language test model:
// DIR/model.gguf (text model) and DIR/mmproj.gguf (vision encoder + projector)
// of one family (--arch: llava15, the default, llava16, smolvlm, minicpmv,
// gemma3, qwen25vl), with the family's tensor names, metadata, projector and chat
// template. The output is deterministic for given flags; shape flags given on the
// command line override the family's tiny defaults.
//
//	go run ./cmd/mkmodel --out models/test
//	go run ./cmd/mkmodel --arch gemma3 --out models/gemma3
//
// A LLaVA-1.5-7B-shaped model (~13 GB):
//
//	go run ./cmd/mkmodel --out models/7b --layers 32 --embd 4096 --heads 32 \
//	  --kv-heads 32 --ff 11008 --vocab 32000 --f16 --image-size 336 \
//	  --patch-size 14 --vision-embd 1024 --vision-layers 24 \
//	  --vision-heads 16 --vision-ff 4096
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

func main() {
	// The family's defaults are applied before the shape flags are parsed.
	arch := testmodel.ArchLLaVA15
	for i, a := range os.Args[1:] {
		if v, ok := strings.CutPrefix(a, "--arch="); ok {
			arch = v
		} else if v, ok := strings.CutPrefix(a, "-arch="); ok {
			arch = v
		} else if (a == "--arch" || a == "-arch") && i+2 < len(os.Args) {
			arch = os.Args[i+2]
		}
	}
	o, err := testmodel.FamilyOptions(arch)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkmodel:", err)
		os.Exit(2)
	}
	flag.StringVar(&o.Arch, "arch", o.Arch, fmt.Sprintf("model family: %s", strings.Join(testmodel.Families(), ", ")))
	out := flag.String("out", "", "output folder (required)")
	flag.IntVar(&o.Layers, "layers", o.Layers, "text model blocks")
	flag.IntVar(&o.Embd, "embd", o.Embd, "text model width (n_embd); also the projector output size")
	flag.IntVar(&o.Heads, "heads", o.Heads, "attention heads")
	flag.IntVar(&o.KVHeads, "kv-heads", o.KVHeads, "key/value heads (GQA)")
	flag.IntVar(&o.FF, "ff", o.FF, "feed-forward size")
	flag.IntVar(&o.CtxTrain, "ctx", o.CtxTrain, "training context length (llama.context_length)")
	flag.IntVar(&o.VocabSize, "vocab", o.VocabSize, fmt.Sprintf("pad the vocabulary with unused tokens to this size (minimum %d)", testmodel.BaseVocabSize))
	flag.BoolVar(&o.F16, "f16", o.F16, "store matrices as float16")
	flag.Int64Var(&o.Seed, "seed", o.Seed, "random seed")
	flag.IntVar(&o.ImageSize, "image-size", o.ImageSize, "vision input size in pixels")
	flag.IntVar(&o.PatchSize, "patch-size", o.PatchSize, "vision patch size in pixels")
	flag.IntVar(&o.VisionEmbd, "vision-embd", o.VisionEmbd, "vision encoder width")
	flag.IntVar(&o.VisionLayers, "vision-layers", o.VisionLayers, "vision encoder blocks (llama.cpp runs all but the last)")
	flag.IntVar(&o.VisionHeads, "vision-heads", o.VisionHeads, "vision encoder attention heads")
	flag.IntVar(&o.VisionFF, "vision-ff", o.VisionFF, "vision encoder feed-forward size")
	flag.IntVar(&o.SlidingWindow, "sliding-window", o.SlidingWindow, "gemma3: sliding-window size")
	flag.IntVar(&o.MergeFactor, "merge", o.MergeFactor, "gemma3, smolvlm: patch-grid reduction factor")
	flag.IntVar(&o.PreprocSize, "preproc-size", o.PreprocSize, "smolvlm: longest image edge before splitting")
	flag.IntVar(&o.Queries, "queries", o.Queries, "minicpmv: resampler queries per slice")
	flag.IntVar(&o.HeadSize, "head-size", o.HeadSize, "gemma3: attention head size when not embd/heads")
	flag.IntVar(&o.WindowPattern, "window-pattern", o.WindowPattern, "qwen25vl: every n-th vision block attends the whole image (n_wa_pattern)")
	flag.Parse()
	if *out == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: mkmodel --out DIR [flags]")
		flag.PrintDefaults()
		os.Exit(2)
	}
	start := time.Now()
	model, mmproj, err := testmodel.Write(*out, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkmodel:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s (%s) and %s in %s (%d tokens per image tile)\n",
		model, o.Arch, mmproj, time.Since(start).Round(time.Millisecond), o.TileTokens())
}
