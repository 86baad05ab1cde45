"""Compares one prompt run through llama.cpp (cmd/mkdemo probe) with PyTorch:
prompt tokens, image embeddings and next-token logits.

  python3 probe_check.py --ckpt WEIGHTS --probe P.json --image X.png --question Q [--text-first] [--f16]

With --random N instead of --ckpt, builds a random model (seed N, larger
weights than the training init so the check is not trivially flat), exports it
to --export DIR for cmd/mkdemo convert, and exits (run convert + probe, then
this script again with --random N --probe ...).
"""
import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image

import vlm


def random_model(seed, cfg):
    torch.manual_seed(seed)
    m = vlm.VLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or ".ln" in n or "pre_ln" in n:
                p.uniform_(0.75, 1.25)
            elif p.dim() >= 2:
                p.normal_(0, 1.5 / np.sqrt(p.shape[-1] if p.dim() == 2 else np.prod(p.shape[1:])))
            else:
                p.normal_(0, 0.3)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt")
    ap.add_argument("--random", type=int)
    ap.add_argument("--config", default="{}", help="JSON config overrides for --random")
    ap.add_argument("--export")
    ap.add_argument("--probe")
    ap.add_argument("--image")
    ap.add_argument("--question", default="What color is the circle?")
    ap.add_argument("--text-first", action="store_true")
    ap.add_argument("--f16", action="store_true", help="round matrices to f16 as the F16 file stores them")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.random is not None:
        model = random_model(a.random, vlm.Config(**json.loads(a.config)))
    else:
        import export
        model, _ = export.load(a.ckpt)
    model.eval()
    if a.export:
        vlm.export_weights(model, a.export, f16=a.f16, name="probe-check")
        print("exported to", a.export)
        return
    if a.f16:
        vlm.round_f16_(model)
    p = json.load(open(a.probe))
    pre, post = vlm.prompt_tokens(a.question, not a.text_first)
    text = [c["tokens"] for c in p["chunks"] if c["kind"] == "text"]
    ok = True
    if text != [pre, post]:
        print("TOKENS DIFFER\n llama.cpp:", text, "\n pytorch:  ", [pre, post])
        ok = False
    else:
        print("prompt tokens: identical (%d + image + %d)" % (len(pre), len(post)))
    u8 = vlm.preprocess_u8(np.asarray(Image.open(a.image).convert("RGB")), model.c.image_size)
    with torch.no_grad():
        emb = vlm.encode_images(model, u8[None])[0]
        ge = torch.tensor(p["image_embd"]).view_as(emb)
        d = (emb - ge).abs().max().item()
        print("image embeddings: max |diff| %.3g (scale %.3g)" % (d, emb.abs().max().item()))
        x = vlm.prompt_embeddings(model, emb, a.question, not a.text_first)
        logits = model.text_forward(x)[0, -1]
        gl = torch.tensor(p["logits"])
        d2 = (logits - gl).abs().max().item()
        print("logits: max |diff| %.3g (scale %.3g); argmax torch %d llama %d" % (
            d2, logits.abs().max().item(), int(logits.argmax()), int(gl.argmax())))
        if d > 1e-2 * max(1, emb.abs().max().item()) or d2 > 1e-2 * max(1, logits.abs().max().item()):
            ok = False
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
