"""Held-out evaluation of the trained model in PyTorch (float32, CPU, greedy),
and the reference file the Go check compares the exported model with.

  go run ./cmd/mkdemo data --seed 2 --n 100 --out HO.jsonl --png models/demo/heldout
  python3 evaluate.py --weights W --samples HO.jsonl --out models/demo/heldout.json

Every sample gets its five questions; the first half of the samples put the
image before the question (the API's [image, text] parts), the second half
after it ([text, image]). The output lists each question with its reference
answer and the PyTorch answer ("torch"), which cmd/mkdemo's test compares
with the engine's greedy answers; the printed table gives exact-answer
accuracy (internal/eval/answer's rule) by question kind and prompt order,
and the descriptions' mean ROUGE-L F1 (score.rouge_l) against the reference.
The vocabulary (bytes or words) comes with the weights.

  python3 evaluate.py --rouge-of models/demo/heldout.json
      prints the ROUGE-L of the descriptions already in an output file.
"""
import argparse
import json
import os
import time

import torch

import data
import export
import score
import vlm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights")
    ap.add_argument("--samples", help="JSON lines from mkdemo data --png")
    ap.add_argument("--out")
    ap.add_argument("--rouge-of", help="only print the descriptions' ROUGE-L of this output file")
    ap.add_argument("--image-dir", default="heldout", help="image folder, relative to --out's folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--system", default="", help="system message before every question (\"llava\": LLaVA-1.5's)")
    a = ap.parse_args()
    if a.rouge_of:
        qs = [q for q in json.load(open(a.rouge_of))["questions"] if q["kind"] == "describe"]
        for order, sel in (("image-first", False), ("text-first", True), ("all", None)):
            v = [score.rouge_l(q["torch"], q["reference"]) for q in qs if sel is None or q["text_first"] == sel]
            print(f"describe ROUGE-L {order}: {sum(v) / len(v):.3f} ({len(v)} descriptions)")
        return
    if not (a.weights and a.samples and a.out):
        ap.error("--weights, --samples and --out are required")
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # subnormal weights make CPU matmuls many times slower (train.py)
    system = vlm.LLAVA_SYSTEM if a.system == "llava" else a.system
    model, meta = export.load(a.weights)
    samples = data.read_samples(a.samples)
    half = len(samples) // 2
    qs, hits, total, rouge = [], {}, {}, {}
    t0 = time.time()
    for k, s in enumerate(samples):
        emb = vlm.encode_images(model, data.render(s)[None])[0]
        text_first = k >= half
        for qa in s["qas"]:
            ans, _ = vlm.greedy(model, emb, qa["q"], not text_first, max_new=a.max_new, system=system)
            ans = ans.strip()
            if qa["kind"] == "describe":
                ok = ans == qa["a"]
                rouge.setdefault("text-first" if text_first else "image-first", []).append(score.rouge_l(ans, qa["a"]))
            else:
                ok = score.correct(ans, qa["a"])
            key = (qa["kind"], "text-first" if text_first else "image-first")
            total[key] = total.get(key, 0) + 1
            hits[key] = hits.get(key, 0) + ok
            qs.append({"id": f"{s['id']}-{qa['kind']}", "image": os.path.join(a.image_dir, s.get("image", s["id"] + ".png")),
                       "question": qa["q"], "text_first": text_first, "kind": qa["kind"],
                       **({"system": system} if system else {}),
                       "reference": qa["a"], "torch": ans})
        if (k + 1) % 10 == 0:
            print(f"{k + 1}/{len(samples)} samples, {time.time() - t0:.0f}s", flush=True)
    kinds = ["color", "count", "position", "exists", "describe"]
    summary = {}
    for kind in kinds:
        row = {}
        for order in ("image-first", "text-first"):
            n = total.get((kind, order), 0)
            row[order] = hits.get((kind, order), 0) / n if n else None
        n = sum(total.get((kind, o), 0) for o in ("image-first", "text-first"))
        row["all"] = sum(hits.get((kind, o), 0) for o in ("image-first", "text-first")) / n
        summary[kind] = row
    short = [k for k in kinds if k != "describe"]
    summary["color+count+position"] = sum(hits.get((k, o), 0) for k in ("color", "count", "position")
                                          for o in ("image-first", "text-first")) / \
        sum(total.get((k, o), 0) for k in ("color", "count", "position") for o in ("image-first", "text-first"))
    summary["short (4 kinds)"] = sum(hits.get((k, o), 0) for k in short for o in ("image-first", "text-first")) / \
        sum(total.get((k, o), 0) for k in short for o in ("image-first", "text-first"))
    allr = [x for v in rouge.values() for x in v]
    summary["describe ROUGE-L"] = {o: sum(v) / len(v) for o, v in rouge.items()}
    summary["describe ROUGE-L"]["all"] = sum(allr) / max(1, len(allr))
    summary["vocab"] = model.c.vocab
    summary["system"] = system
    note = ("Held-out questions (internal/eval/shapes, seed 2) with the PyTorch model's greedy answers "
            "(tools/demo-vlm/evaluate.py); describe accuracy is exact match of the whole description.")
    out = {"note": note, "weights": meta.get("step"), "summary": summary, "questions": qs}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"{len(qs)} questions in {time.time() - t0:.0f}s -> {a.out}")


if __name__ == "__main__":
    main()
