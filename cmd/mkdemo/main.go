// Command mkdemo is the Go side of the demo VLM (tools/demo-vlm, shipped in
// models/demo): it writes the training data, turns the trained weights into
// the GGUF pair the server runs, and checks the result with llama.cpp.
//
//	mkdemo data --seed S --n N --out F.jsonl.gz [--png DIR]
//	    writes N samples of internal/eval/shapes (shapes and questions; the
//	    trainer redraws the pictures) as JSON lines.
//	mkdemo convert --in DIR --out models/demo
//	    reads DIR/manifest.json and DIR/weights.bin (written by
//	    tools/demo-vlm/export.py) and writes model.gguf + mmproj.gguf with
//	    internal/testmodel's GGUF writer (same vocabulary and chat template).
//	mkdemo probe --dir models/demo --image X.png --question Q --out P.json
//	    runs one prompt through llama.cpp (no engine) and writes the prompt
//	    tokens, the image embeddings and the next-token logits, so that
//	    tools/demo-vlm/probe_check.py can compare them with PyTorch.
//	mkdemo answer --dir models/demo --questions Q.json --out A.json
//	    answers every question of Q.json with the engine (greedy, policy full
//	    unless --policy/--budget say otherwise) and writes the answers.
//	mkdemo plans --dir models/demo --questions Q.json --policy elastic --budget B --out F.json [--scores]
//	    answers the questions with the engine and records, per question, the
//	    phase 1 plan the engine applied (N, K, per-layer kept and merged sets),
//	    the entries held and evicted after each decode step and the greedy
//	    answer (selection paper unless --selection says otherwise; --scores adds
//	    llama.cpp's importance scores and image embeddings), for
//	    tools/demo-vlm/elastic_check.py.
//	mkdemo vocab --out V.json [--golden G.json]
//	    writes internal/testmodel's word-level vocabulary (pieces, scores,
//	    types) for tools/demo-vlm/wordvocab.py and, with --golden, llama.cpp's
//	    tokenizations of sample texts for `wordvocab.py --check`.
package main

import (
	"flag"
	"fmt"
	"os"
)

func usage() {
	fmt.Fprintln(os.Stderr, `usage: mkdemo data|convert|probe|answer|plans|vocab [flags]   (mkdemo CMD -h for the flags)`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	var err error
	switch os.Args[1] {
	case "convert":
		err = convertCmd(fs, os.Args[2:])
	case "probe":
		err = probeCmd(fs, os.Args[2:])
	case "answer":
		err = answerCmd(fs, os.Args[2:])
	case "plans":
		err = plansCmd(fs, os.Args[2:])
	case "data":
		err = dataCmd(fs, os.Args[2:])
	case "vocab":
		err = vocabCmd(fs, os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkdemo:", err)
		os.Exit(1)
	}
}
