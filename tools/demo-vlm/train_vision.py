"""Stage 3 of the demo model: trains the vision tower alone (ViT +
projector) so that every image token says which shape it belongs to; the text
model is kept as it is (stage 4, train.py --freeze-vision, teaches it to read
the new tokens).

Why: linear probes (probe_vision.py) show that the stage-2 tower is a bag of
colored patches. Its position embeddings (row norm ~1.2 against ~46 for the
patch embeddings) are lost in the pre-LN (grid cell of a shape patch: 15%,
chance 11%); with a position pattern of norm 25 added they survive the pre-LN
(100%) but the first block's output swamps them again (13%); and a patch's
shape kind is near chance at every stage (22-31%, chance 20%). Without the
kind, "What color is the circle?" with two shapes drawn is a coin toss, which
is what the stage-2 model answered.

--reinit starts the blocks and the projector afresh, --pos-norm adds a 2-D
sine-cosine pattern of that row norm to the position embeddings, and the loss
per picture is on the image embeddings the text model reads (token t is patch
t+1; clip.cpp drops patch 0): kind / color / cell cross-entropy of a linear
head on layer-normed embeddings of the patches a shape paints
(data.patch_labels), background-vs-shape on the rest, plus --distill times
the squared distance to the starting model's embeddings relative to their
variance (after --reinit it stays at ~1 and does nothing useful; it matters
only when the blocks are kept). --match-scale then restores the starting
model's embedding size (see below).

  python3 train_vision.py --init ../../models/demo --train data/train.jsonl.gz \
      --out /tmp/vis --minutes 24 --lr 2e-3 --reinit --pos-norm 40 --match-scale
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import export
import vlm

HEADS = (len(data.KINDS) + 1, len(data.COLORS) + 1, 10)  # label columns 0, 1, 3


def labels(samples):
    """[B, N-1, 3] int64: kind, color, cell of patches 1..N-1."""
    lab = np.stack([data.patch_labels(s) for s in samples])[:, 1:]
    return torch.from_numpy(lab[..., [0, 1, 3]])


def losses(head, emb, lab):
    """Per-head cross-entropies on the shape patches, plus the kind head on
    background patches (it must say "background" there)."""
    x = emb[:, :lab.shape[1]]
    logits = torch.split(head(F.layer_norm(x, (x.shape[-1],))), HEADS, dim=-1)
    fg = lab[..., 0] < len(data.KINDS)
    out = {}
    for name, k, lg in zip(("kind", "color", "cell"), range(3), logits):
        out[name] = F.cross_entropy(lg[fg], lab[..., k][fg])
    out["bg"] = F.cross_entropy(logits[0][~fg], lab[..., 0][~fg])
    acc = (logits[0][fg].argmax(-1) == lab[..., 0][fg]).float().mean()
    return out, acc


def reinit(vision):
    """Fresh ViT blocks, pre-LN and projector (GPT-2 style init); the
    stage-2 blocks swamp the residual stream so that no patch keeps its
    position past the first block (a linear probe drops from 100% to chance)."""
    with torch.no_grad():
        for n, p in vision.named_parameters():
            if n.startswith(("blocks.", "mm0.", "mm2.", "pre_ln.")):
                if n.endswith("bias"):
                    p.zero_()
                elif "ln" in n:
                    p.fill_(1.0)
                else:
                    p.normal_(0, 0.02)
        for b in vision.blocks:
            b.o.weight.mul_(1 / math.sqrt(2 * len(vision.blocks)))
            b.down.weight.mul_(1 / math.sqrt(2 * len(vision.blocks)))


def sincos_2d(g, dim):
    """[g*g, dim] unit-norm rows: sines and cosines of the patch row (first
    half of the columns) and column (second half) at geometric frequencies."""
    q = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float64) / q))
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij")
    parts = []
    for c in (ys.reshape(-1), xs.reshape(-1)):
        ang = c[:, None] * freq[None]
        parts += [torch.sin(ang), torch.cos(ang)]
    pe = torch.cat(parts, dim=1)
    return (pe / pe.norm(dim=1, keepdim=True)).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="trained weights (GGUF folder, --npz folder or ckpt.pt)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", default="data/heldout.jsonl")
    ap.add_argument("--out", required=True, help="folder for the weights (text.npz + vision.npz, as train.py --npz)")
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--distill", type=float, default=1.0, help="weight of the stay-close-to-the-start term")
    ap.add_argument("--pos-norm", type=float, default=0.0,
                    help="add a 2-D sine-cosine pattern of this row norm to the position embeddings (0: keep them)")
    ap.add_argument("--reinit", action="store_true",
                    help="start the ViT blocks and the projector afresh (the patch embedding is kept)")
    ap.add_argument("--match-scale", action="store_true",
                    help="at the end, scale the projector output to the starting model's embedding RMS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)

    model, meta = export.load(a.init)
    start_vision = vlm.Vision(model.c)
    start_vision.load_state_dict(model.vision.state_dict())
    if a.reinit:
        reinit(model.vision)
    if a.pos_norm > 0:
        with torch.no_grad():
            model.vision.pos[:-1] += a.pos_norm * sincos_2d(model.c.image_size // model.c.patch_size, model.c.vision_embd)
    start_vision.eval()
    for p in list(start_vision.parameters()) + list(model.parameters()):
        p.requires_grad_(False)
    for p in model.vision.parameters():
        p.requires_grad_(True)
    vision = model.vision.train()
    head = torch.nn.Linear(model.c.embd, sum(HEADS))
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)

    train = data.read_samples(a.train)
    held = data.read_samples(a.heldout)[:200]
    held_u8 = torch.from_numpy(np.stack([data.render(s) for s in held]))
    held_lab = labels(held)
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "vision_log.jsonl"), "a")

    def heldout_acc():
        vision.eval()
        with torch.no_grad():
            _, acc = losses(head, vision(vlm.normalize(held_u8)), held_lab)
        vision.train()
        return acc.item()

    t0, step, budget = time.time(), 0, a.minutes * 60
    run = {}
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        lr = a.lr * min(1.0, (step + 1) / 30) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        picks = [train[rng.randrange(len(train))] for _ in range(a.batch)]
        u8 = torch.from_numpy(np.stack([data.render(s) for s in picks]))
        img = vlm.normalize(u8)
        emb = vision(img)
        with torch.no_grad():
            ref = start_vision(img)
        parts, acc = losses(head, emb, labels(picks))
        parts["distill"] = F.mse_loss(emb, ref) / ref.var()
        total = parts["kind"] + parts["color"] + parts["cell"] + parts["bg"] + a.distill * parts["distill"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in parts.items():
            run[k] = run.get(k, 0.0) + v.item()
        run["acc"] = run.get("acc", 0.0) + acc.item()
        if step % 25 == 0:
            rec = {"step": step, "lr": lr, "elapsed_s": round(time.time() - t0, 1), **{k: v / 25 for k, v in run.items()}}
            if step % 100 == 0:
                rec["heldout_kind_acc"] = heldout_acc()
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            run = {}
    rec = {"step": step, "done": True, "heldout_kind_acc": heldout_acc(), "elapsed_s": round(time.time() - t0, 1)}
    print(json.dumps(rec), flush=True)
    log.write(json.dumps(rec) + "\n")
    if a.match_scale:
        # The text model was trained on image embeddings of the starting
        # model's size (RMS ~1000 against ~0.03 for token embeddings): at that
        # size the text blocks' outputs cannot overwrite an image position.
        # Scaling the projector's last layer keeps every probe above (they
        # read layer-normed embeddings) and restores that size.
        vision.eval()
        with torch.no_grad():
            img = vlm.normalize(held_u8)
            s = (start_vision(img).pow(2).mean().sqrt() / vision(img).pow(2).mean().sqrt()).item()
            vision.mm2.weight.mul_(s)
            vision.mm2.bias.mul_(s)
        print(f"projector output scaled by {s:.1f} to the starting model's embedding size", flush=True)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for part in ("text", "vision"):
        np.savez(os.path.join(a.out, part + ".npz"), **{k: v for k, v in state.items() if k.startswith("vision.") == (part == "vision")})
    with open(os.path.join(a.out, "model_config.json"), "w") as f:
        json.dump({"config": model.c.to_dict(), "step": meta.get("step"), "tokens": meta.get("tokens"),
                   "vision_steps": step}, f)


if __name__ == "__main__":
    main()
