// Command mkmodel writes a random-weight LLaVA-style test model:
// DIR/model.gguf (llama text model) and DIR/mmproj.gguf (CLIP + mlp
// projector). The output is deterministic for given flags.
//
//	go run ./cmd/mkmodel --out models/test
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
	"time"

	"github.com/elasticserve/elasticserve/internal/testmodel"
)

func main() {
	o := testmodel.DefaultOptions()
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
	fmt.Printf("wrote %s and %s in %s (%d image tokens per image)\n",
		model, mmproj, time.Since(start).Round(time.Millisecond), o.ImageTokens())
}
