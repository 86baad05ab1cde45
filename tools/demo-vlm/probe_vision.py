"""Linear probes on the vision tower: at each stage (after pre-LN, after each
ViT block, and the projected image embeddings the text model reads), can a
linear classifier tell a shape patch's grid cell, kind and color? This is
how the stage-2 model's weakness was found (see README.md).

  python3 probe_vision.py --weights ../../models/demo --samples data/heldout.jsonl

Trains on 70% of the shape patches of the first --n pictures and prints the
accuracy on the other 30% (chance: cell 11%, kind 20%, color 12.5%).
"""
import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import export
import vlm

TARGETS = (("cell", 3, 9), ("kind", 0, len(data.KINDS)), ("color", 1, len(data.COLORS)))


def stages(vision, u8):
    """name -> [B, n_patches, dim] activations of patches 0..N-1 (the
    projected embeddings are shifted so that row p is patch p; row 0 is
    left empty because clip.cpp drops patch 0)."""
    with torch.no_grad():
        img = vlm.normalize(u8)
        x = vision.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([x, vision.cls.expand(x.shape[0], 1, -1)], 1) + vision.pos
        x = vision.pre_ln(x)
        out = {"pre-LN": x[:, :-1]}
        for i, b in enumerate(vision.blocks):
            x = b(x)
            out[f"block {i}"] = x[:, :-1]
        emb = vision.project(x)  # row t is patch t+1
        out["embeddings"] = torch.cat([torch.zeros_like(emb[:, :1]), emb[:, :-1]], 1)
    return out


def probe(z, y, classes, steps=300):
    n = int(len(y) * 0.7)
    z = (z - z[:n].mean(0)) / (z[:n].std(0) + 1e-5)
    lin = torch.nn.Linear(z.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(z[:n]), y[:n]).backward()
        opt.step()
    with torch.no_grad():
        return (lin(z[n:]).argmax(-1) == y[n:]).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="GGUF folder, --npz folder or ckpt.pt")
    ap.add_argument("--samples", default="data/heldout.jsonl")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _ = export.load(a.weights)
    ss = data.read_samples(a.samples)[:a.n]
    u8 = torch.from_numpy(np.stack([data.render(s) for s in ss]))
    lab = torch.from_numpy(np.stack([data.patch_labels(s) for s in ss]))  # [B, N, 4]
    shape = lab[..., 0] < len(data.KINDS)
    shape[:, 0] = False  # patch 0 never reaches the text model
    print("stage        " + "  ".join(f"{name:>5}" for name, _, _ in TARGETS))
    for name, z in stages(model.vision, u8).items():
        accs = [probe(z[shape], lab[..., col][shape], k) for _, col, k in TARGETS]
        print(f"{name:<12} " + "  ".join(f"{100 * acc:4.0f}%" for acc in accs))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
