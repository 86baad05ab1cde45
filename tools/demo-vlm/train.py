"""Trains the demo VLM end to end (vision tower, projector and text model, all
from scratch) on shapes samples, with the loss on the assistant answer only.

  python3 train.py --train data/train.jsonl.gz --heldout data/heldout.jsonl --out runs/cpu \
      --config "$(cat config.json)" --steps 6000 --batch 16 --threads 2

Writes run/ckpt.pt (every --ckpt-every steps / --ckpt-minutes and at the end;
usable at any time, --resume continues it), run/log.jsonl (loss, tokens,
speed, periodic held-out accuracy) and run/config.json; --npz DIR also writes
the weights as numpy files (what export.py reads). --max-minutes stops early
with a checkpoint; with --time-schedule the learning rate decays over that
time budget instead of --steps. gpu_train.sh has the shipped model's settings.

--attn-sup-weight adds a training-only loss that teaches one head of text
block --attn-sup-layer to look at the image tokens of the shape a short
question names, from every position that predicts an answer token;
--freeze-vision trains the text model alone (README.md: the CPU experiments).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import score
import vlm



class Batches(torch.utils.data.IterableDataset):
    """Endless training batches, built on the CPU (in DataLoader workers when
    --workers > 0): each batch holds --batch (picture, question) pairs of one
    group (describe, or the short questions) so that lengths are similar."""

    def __init__(self, samples, batch, describe_frac, text_first_frac, seed, n_patches, count_sup=False,
                 kind_weights=None, system_frac=0.0, describe_sup=False):
        self.samples, self.batch, self.n, self.count_sup = samples, batch, n_patches, count_sup
        self.describe_sup = describe_sup
        self.describe_frac, self.text_first_frac, self.seed = describe_frac, text_first_frac, seed
        self.system_frac = system_frac
        self.groups, self.kinds = {}, {}
        for i, s in enumerate(samples):
            for j, qa in enumerate(s["qas"]):
                self.groups.setdefault("describe" if qa["kind"] == "describe" else "short", []).append((i, j))
                self.kinds.setdefault(qa["kind"], []).append((i, j))
        # kind_weights {kind: weight}: a short batch draws each question's
        # kind by these weights (kinds not named weigh 1) instead of uniformly
        # over all short questions
        self.short_kinds, self.short_w = [], []
        if kind_weights:
            self.short_kinds = sorted(k for k in self.kinds if k != "describe")
            self.short_w = [kind_weights.get(k, 1.0) for k in self.short_kinds]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            kind = "describe" if rng.random() < self.describe_frac else "short"
            if kind == "short" and self.short_kinds:
                picks = [rng.choice(self.kinds[k]) for k in rng.choices(self.short_kinds, self.short_w, k=self.batch)]
            else:
                picks = rng.sample(self.groups[kind], self.batch)
            tf = [rng.random() < self.text_first_frac for _ in picks]
            # no draws at all without system prompts: earlier stages' batches stay reproducible
            systems = ([rng.choice(vlm.SYSTEMS) if rng.random() < self.system_frac else "" for _ in picks]
                       if self.system_frac > 0 else None)
            yield self.make(picks, tf, systems)

    def make(self, picks, text_first, systems=None):
        N = self.n
        u8 = np.stack([data.render(self.samples[i]) for i, _ in picks])
        rows, tgts, offs, sup, readable = [], [], [], [], []
        for b, (i, j) in enumerate(picks):
            qa = self.samples[i]["qas"][j]
            pre, post = vlm.prompt_tokens(qa["q"], not text_first[b], systems[b] if systems else "")
            ans = vlm.answer_tokens(qa["a"])
            last = len(pre) + N + len(post) - 1
            if self.describe_sup and qa["kind"] == "describe":
                sup.append(describe_targets(self.samples[i], qa, len(pre), last))
            else:
                q, k = attention_targets(self.samples[i], qa, len(pre), N, last, len(ans), self.count_sup)
                sup.append((q, [k] * len(q)))
            readable.append(qa["kind"] not in ("count", "describe"))
            # input: pre, N image slots (token 0, replaced by the image
            # embeddings), post, the answer without its last token; position p
            # predicts token p+1, so the answer is predicted from the last
            # prompt position onwards
            rows.append(pre + [0] * N + post + ans[:-1])
            tgts.append([-100] * (len(pre) + N + len(post) - 1) + ans)
            offs.append(len(pre))
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        tgt = torch.tensor([t + [-100] * (T - len(t)) for t in tgts])
        aux = torch.from_numpy(np.stack([data.patch_labels(self.samples[i]) for i, _ in picks]))
        Q = max(1, max(len(q) for q, _ in sup))
        sq = torch.full((len(picks), Q), -1, dtype=torch.long)
        sk = torch.zeros((len(picks), Q, T), dtype=torch.bool)
        for b, (q, ks) in enumerate(sup):
            sq[b, :len(q)] = torch.tensor(q, dtype=torch.long)
            for j, k in enumerate(ks):
                sk[b, j, k] = True
        return torch.from_numpy(u8), ids, tgt, torch.tensor(offs), aux, sq, sk, torch.tensor(readable)


def attention_targets(sample, qa, off, N, last, n_ans, count=False):
    """Training-only attention targets for the short questions about one shape
    (color, position, and "is there" when a shape of that kind is drawn): the
    query positions that predict the answer tokens (last prompt position
    onwards) and the sequence positions of that shape's image tokens. The
    image tokens are patches 1..N-1 then the class token (clip.cpp drops
    patch 0), so patch p sits at off + p - 1. With count, "how many" also
    gets targets: the image tokens of every shape, since counting needs all
    of them in view. Empty lists: no supervision."""
    lab = data.patch_labels(sample)[:, 0]
    if count and qa["kind"] == "count":
        keys = [off + p - 1 for p in np.nonzero(lab != len(data.KINDS))[0] if p >= 1]
        return (list(range(last, last + n_ans)), keys) if keys else ([], [])
    if qa["kind"] not in ("color", "position", "exists"):
        return [], []
    m = re.search(r"(\w+)\?$", qa["q"])
    if not m or m.group(1) not in data.KINDS:
        return [], []
    keys = [off + p - 1 for p in np.nonzero(lab == data.KINDS.index(m.group(1)))[0] if p >= 1]
    if not keys:
        return [], []
    return list(range(last, last + n_ans)), keys


_SENTENCE = re.compile(r"[^.]+\.")


def describe_targets(sample, qa, off, last):
    """Training-only attention targets for a description (--describe-sup):
    every answer token of the sentence about one shape ("A small red circle
    is at the top.") is a query whose targets are that shape's image tokens;
    the count sentence's tokens look at every shape, as count questions do.
    A sentence that names no drawn shape, or whose tokens are not a prefix of
    the whole answer's tokenisation, gets no queries. Returns (queries,
    key lists, one per query)."""
    owner = data.patch_owner(sample)
    full = vlm.tokenize_piece(qa["a"])
    sents = [t.strip() for t in _SENTENCE.findall(qa["a"])]
    qs, ks, start = [], [], 0
    for n in range(1, len(sents) + 1):
        prefix = vlm.tokenize_piece(" ".join(sents[:n]))
        end = len(prefix)
        words = sents[n - 1].lower().rstrip(".").split()
        if words[0] == "there":
            shapes = range(len(sample["shapes"]))
        else:
            shapes = [k for k, sh in enumerate(sample["shapes"])
                      if sh["kind"] in words and data.COLOR_NAMES[data.COLORS.index(tuple(sh["rgb"]))] in words]
        keys = [off + p - 1 for p in np.nonzero(np.isin(owner, list(shapes)))[0] if p >= 1]
        if full[start:end] == prefix[start:] and keys:
            qs += range(last + start, last + end)
            ks += [keys] * (end - start)
        start = end
    return qs, ks


AUX_CLASSES = (len(data.KINDS) + 1, len(data.COLORS) + 1, 3, 10)


def embed_batch(model, u8, ids, offs, aux_head=None, aux=None):
    """Input embeddings [B, T, E]: token embeddings with the image embeddings
    written at offs[b] .. offs[b]+N-1; plus, with aux_head, the auxiliary
    patch-label loss of the vision tower (training only; the head is not
    part of the exported model)."""
    dev = ids.device
    N = model.c.n_patches
    feats = model.vision.features(vlm.normalize(u8).to(dev))
    img = model.vision.project(feats)  # [B, N, E]
    emb = model.tok(ids)
    bi = torch.arange(ids.shape[0], device=dev).repeat_interleave(N)
    pi = (offs[:, None] + torch.arange(N, device=dev)[None]).reshape(-1)
    emb = emb.index_put((bi, pi), img.reshape(-1, img.shape[-1]).to(emb.dtype))
    aux_loss = None
    if aux_head is not None:
        f = F.layer_norm(feats[:, :N].float(), (feats.shape[-1],))
        logits = aux_head(f).float()  # [B, N, sum(classes)]
        parts = torch.split(logits, AUX_CLASSES, dim=-1)
        aux_loss = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), aux[..., k].reshape(-1))
                       for k, p in enumerate(parts)) / len(parts)
    return emb, aux_loss


@dataclasses.dataclass
class Sup:
    """One batch's attention supervision: the head of text block `layer`,
    the query positions qpos [B, Q] (-1: none) and the target key mask of
    each query keys [B, Q, T]; with read_head, also the color / cell readout
    of that head's output, labelled from the patch labels aux [B, N, 4] of the
    first query's first target key (offs: image offsets), on the rows marked
    readable [B] (short questions about one shape, whose queries share their
    targets); alone: the readout learns without moving the model."""
    layer: int
    head: int
    qpos: torch.Tensor
    keys: torch.Tensor
    read_head: torch.nn.Module = None
    aux: torch.Tensor = None
    offs: torch.Tensor = None
    readable: torch.Tensor = None
    alone: bool = False


def loss_fn(model, emb, tgt, sup=None):
    """Answer loss; with sup (a Sup) also the attention-supervision loss:
    minus the log of the attention mass that head puts on the target keys
    from each query position, averaged, plus the readout loss (None when the
    batch has no targets)."""
    T = emb.shape[1]
    cos, sin = vlm.rope_tables(T, model.c.embd // model.c.heads, model.c.rope_base, emb.device)
    x, sup_loss = emb, None
    for i, b in enumerate(model.blocks):
        if sup is not None and i == sup.layer and (sup.qpos >= 0).any():
            h = b.attn_norm(x)
            sc = query_scores(b, h, cos, sin, sup.head, sup.qpos)
            lm = log_target_mass(sc, sup.keys)
            sup_loss = -lm[sup.qpos >= 0].mean()
            if sup.read_head is not None:
                sup_loss = sup_loss + read_loss(b, h, sc, sup)
        x = b(x, cos, sin)
    h = model.norm(x)
    m = tgt != -100
    logits = model.out(h[m])
    return F.cross_entropy(logits.float(), tgt[m]), sup_loss


def query_scores(block, h, cos, sin, head, qpos):
    """Causal attention scores [B, Q, T] (float32, -inf on future keys) of one
    head of a text block, given its normed input h, from the query positions
    qpos [B, Q] (-1 entries are computed at position 0 and left to the caller
    to ignore)."""
    B, T, _ = h.shape
    q = vlm.apply_rope(block.q(h).view(B, T, block.h, block.hd).transpose(1, 2)[:, head:head + 1], cos, sin)[:, 0]
    kvh = head // (block.h // block.kvh)
    k = vlm.apply_rope(block.k(h).view(B, T, block.kvh, block.hd).transpose(1, 2)[:, kvh:kvh + 1], cos, sin)[:, 0]
    qp = qpos.clamp_min(0)
    qs = torch.gather(q, 1, qp[..., None].expand(-1, -1, q.shape[-1]))  # [B, Q, hd]
    s = (qs @ k.transpose(-1, -2)).float() / math.sqrt(block.hd)
    future = torch.arange(T, device=h.device)[None, None, :] > qp[..., None]
    return s.masked_fill(future, float("-inf"))


def read_loss(block, h, sc, sup):
    """Training-only: the supervised head's output at the query positions
    must name the target shape's color and grid cell through sup.read_head
    (see Sup for the labels and the rows that take part)."""
    head, qpos, keys, aux = sup.head, sup.qpos, sup.keys, sup.aux
    B, T, _ = h.shape
    kvh = head // (block.h // block.kvh)
    v = block.v(h).view(B, T, block.kvh, block.hd)[:, :, kvh]  # [B, T, hd]
    out = torch.softmax(sc, -1) @ v.float()  # [B, Q, hd]
    first = keys[:, 0].float().argmax(-1)  # first target position (a readable row's queries share them)
    patch = (first - sup.offs + 1).clamp(0, aux.shape[1] - 1)
    lab = aux[torch.arange(B, device=h.device), patch]  # [B, 4]
    valid = (qpos >= 0) & (keys[:, 0].any(-1) & sup.readable)[:, None]
    if not valid.any():  # e.g. a batch of descriptions: nothing to read out
        return sc.new_zeros(())
    logits = sup.read_head(out[valid].detach() if sup.alone else out[valid])
    rows = valid.nonzero()[:, 0]
    nc = len(data.COLORS)
    return (F.cross_entropy(logits[:, :nc], lab[rows, 1]) + F.cross_entropy(logits[:, nc:], lab[rows, 3])) / 2


def log_target_mass(s, keys):
    """log of the softmax mass of scores s [B, Q, T] on each query's keys
    [B, Q, T] (bool), computed in log space so that tiny masses keep their
    gradient."""
    return torch.logsumexp(s.masked_fill(~keys, float("-inf")), -1) - torch.logsumexp(s, -1)


@torch.no_grad()
def quick_eval(model, heldout, n_images=40, describe=8):
    """Greedy accuracy on the first n_images held-out samples (short questions,
    half with the question before the image) and exact-match rate of a few
    descriptions."""
    model.eval()
    cpu_model = model
    hits, total = {}, {}
    desc_ok = 0
    for k, s in enumerate(heldout[:n_images]):
        emb = vlm.encode_images(cpu_model, data.render(s)[None])[0]
        for qa in s["qas"]:
            if qa["kind"] == "describe":
                if k < describe:
                    ans, _ = vlm.greedy(cpu_model, emb, qa["q"], True, max_new=240)
                    desc_ok += ans.strip() == qa["a"]
                continue
            ans, _ = vlm.greedy(cpu_model, emb, qa["q"], k % 2 == 0, max_new=16)
            total[qa["kind"]] = total.get(qa["kind"], 0) + 1
            hits[qa["kind"]] = hits.get(qa["kind"], 0) + score.correct(ans, qa["a"])
    model.train()
    acc = {k: hits[k] / total[k] for k in total}
    acc["short"] = sum(hits.values()) / max(1, sum(total.values()))
    acc["describe_exact"] = desc_ok / max(1, min(describe, n_images))
    return acc


@torch.no_grad()
def pick_head(model, emb, layer, sq, sk):
    """The head of text block `layer` that already puts the most attention
    on the supervision targets of this batch."""
    T = emb.shape[1]
    cos, sin = vlm.rope_tables(T, model.c.embd // model.c.heads, model.c.rope_base, emb.device)
    x = emb
    for b in model.blocks[:layer]:
        x = b(x, cos, sin)
    blk = model.blocks[layer]
    masses = []
    for h in range(blk.h):
        lm = log_target_mass(query_scores(blk, blk.attn_norm(x), cos, sin, h, sq), sk)
        masses.append(lm.exp()[sq >= 0].mean().item())
    best = max(range(blk.h), key=lambda h: masses[h])
    print(f"attention supervision: block {layer}, head {best} (target mass per head {[round(m, 3) for m in masses]})", flush=True)
    return best


def lr_at(step, a, frac_time=None):
    """Linear warm-up, then cosine decay to min_lr_frac over the steps (or,
    with --max-minutes and --time-schedule, over the time budget)."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    if frac_time is not None:
        p = min(1.0, frac_time)
    else:
        p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="{}", help="JSON overrides of vlm.Config")
    ap.add_argument("--vocab", default="", choices=["", "bytes", "words"],
                    help="vocabulary (overrides the config's \"vocab\"; default bytes); an --init model with the "
                         "byte vocabulary is widened to the word one by vlm.widen_vocab")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--describe-frac", type=float, default=0.35, help="share of batches with the describe question")
    ap.add_argument("--kind-weights", default="",
                    help="weights of the short question kinds in short batches, e.g. count=3,exists=2 (others 1; default: as drawn)")
    ap.add_argument("--system-frac", type=float, default=0.0,
                    help="share of prompts with a system message (one of vlm.SYSTEMS, LLaVA-1.5's among them)")
    ap.add_argument("--text-first-frac", type=float, default=0.5, help="share of prompts with the question before the image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--max-minutes", type=float, default=0)
    ap.add_argument("--ckpt-minutes", type=float, default=0, help="also checkpoint every this many minutes")
    ap.add_argument("--time-schedule", action="store_true", help="decay the learning rate over --max-minutes instead of --steps")
    ap.add_argument("--eval-minutes", type=float, default=0, help="also evaluate every this many minutes")
    ap.add_argument("--eval-images", type=int, default=40, help="held-out pictures in the periodic evaluation")
    ap.add_argument("--aux-weight", type=float, default=0.0, help="weight of the auxiliary patch-label loss (0: off)")
    ap.add_argument("--attn-sup-weight", type=float, default=0.0,
                    help="weight of the attention-supervision loss (0: off): one text head learns to look at the shape a short question names")
    ap.add_argument("--attn-sup-layer", type=int, default=2, help="text block of the supervised head")
    ap.add_argument("--attn-sup-head", type=int, default=-1, help="supervised head (-1: the head of that block already closest, on the first batch)")
    ap.add_argument("--read-sup", action="store_true",
                    help="with --attn-sup-weight: the supervised head's output must also name the shape's color and cell (linear, training-only)")
    ap.add_argument("--read-warm", type=int, default=0,
                    help="with --read-sup: for this many steps only the readout learns from its loss (a fresh readout on trained weights)")
    ap.add_argument("--count-sup", action="store_true",
                    help="with --attn-sup-weight: the same head also learns to look at every shape for \"how many\"")
    ap.add_argument("--describe-sup", action="store_true",
                    help="with --attn-sup-weight: the same head also looks at the shape each sentence of a description names")
    ap.add_argument("--freeze-vision", action="store_true", help="train the text model only")
    ap.add_argument("--init", default="", help="start from these weights (ckpt.pt or an --npz folder)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes building batches")
    ap.add_argument("--npz", default="", help="also save the weights as numpy files text.npz + vision.npz in this folder")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    # Trained weights drive some backward values into float32's subnormal
    # range, where the CPU takes a slow path: on this machine a stage-W4 step
    # (batch 32, from W3's weights) took about 20 s, and 8 s with subnormals
    # flushed to zero.
    torch.set_flush_denormal(True)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    cfg = vlm.Config(**json.loads(a.config))
    if a.vocab:
        cfg.vocab = a.vocab
    model = vlm.VLM(cfg)
    if a.init:
        import export
        init, meta = export.load(a.init)
        if init.c.vocab != cfg.vocab:
            vlm.widen_vocab(init, model)
            print(f"vocabulary widened from {init.c.n_vocab} ({init.c.vocab}) to {cfg.n_vocab} ({cfg.vocab}) tokens")
        else:
            model.load_state_dict(init.state_dict())
        print(f"initialised from {a.init} ({meta.get('step')} steps, {meta.get('tokens')} tokens)")
    vlm.set_vocab(cfg.vocab)  # loading --init may have selected its own
    model = model.to(a.device)
    if a.freeze_vision:
        for p in model.vision.parameters():
            p.requires_grad_(False)
    aux_head = torch.nn.Linear(cfg.vision_embd, sum(AUX_CLASSES)).to(a.device) if a.aux_weight > 0 else None
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    read_head = None
    if a.read_sup:
        read_head = torch.nn.Linear(cfg.embd // cfg.heads, len(data.COLORS) + 9)
        if a.init.endswith(".pt"):
            ck = torch.load(a.init, map_location="cpu")
            if "read_head" in ck:
                read_head.load_state_dict(ck["read_head"])
                print("readout loaded from", a.init)
        read_head = read_head.to(a.device)
        params += list(read_head.named_parameters())
    params += list(aux_head.named_parameters()) if aux_head is not None else []
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0}],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    step, tokens, elapsed0 = 0, 0, 0.0
    ckpt_path = os.path.join(a.out, "ckpt.pt")
    if a.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=a.device, weights_only=False) if "weights_only" in torch.load.__code__.co_varnames else torch.load(ckpt_path, map_location=a.device)
        model.load_state_dict(ck["model"])
        if read_head is not None and "read_head" in ck:
            read_head.load_state_dict(ck["read_head"])
        opt.load_state_dict(ck["opt"])
        step, tokens, elapsed0 = ck["step"], ck["tokens"], ck["elapsed"]
        print(f"resumed at step {step}")
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump({"model": cfg.to_dict(), "train": vars(a)}, f, indent=1)

    t0 = time.time()
    train = data.read_samples(a.train)
    heldout = data.read_samples(a.heldout)
    print(f"{len(train)} training samples, {len(heldout)} held-out; "
          f"{sum(p.numel() for p in model.parameters())} parameters; loaded in {time.time() - t0:.1f}s", flush=True)
    src = Batches(train, a.batch, a.describe_frac, a.text_first_frac, a.seed + step, cfg.n_patches, a.count_sup,
                  {k: float(v) for k, v in (kv.split("=") for kv in a.kind_weights.split(",") if kv)},
                  a.system_frac, a.describe_sup)
    kw = {"num_workers": a.workers, "prefetch_factor": 4, "persistent_workers": True} if a.workers > 0 else {}
    loader = iter(torch.utils.data.DataLoader(src, batch_size=None, **kw))

    def save():
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        extra = {"read_head": read_head.state_dict()} if read_head is not None else {}
        torch.save({**extra, "config": cfg.to_dict(), "model": state, "opt": opt.state_dict(), "step": step,
                    "tokens": tokens, "elapsed": elapsed0 + time.time() - start}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
        if a.npz:
            os.makedirs(a.npz, exist_ok=True)
            for part in ("text", "vision"):
                arrs = {k: v.float().numpy() for k, v in state.items() if k.startswith("vision.") == (part == "vision")}
                np.savez(os.path.join(a.npz, part + ".tmp.npz"), **arrs)
                os.replace(os.path.join(a.npz, part + ".tmp.npz"), os.path.join(a.npz, part + ".npz"))
            with open(os.path.join(a.npz, "model_config.json"), "w") as f:
                json.dump({"config": cfg.to_dict(), "step": step, "tokens": tokens,
                           "elapsed_s": elapsed0 + time.time() - start}, f)

    def evaluate():
        acc = quick_eval(model, heldout, n_images=a.eval_images, describe=min(8, a.eval_images))
        rec = {"step": step, "eval": acc, "elapsed_s": elapsed0 + time.time() - start}
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    log = open(os.path.join(a.out, "log.jsonl"), "a")
    model.train()
    start = time.time()
    budget = a.max_minutes * 60
    last_t, last_tok, run_loss, run_aux, run_sup, run_n = start, tokens, 0.0, 0.0, 0.0, 0
    last_eval = last_save = start
    dev = torch.device(a.device)
    while step < a.steps:
        now = time.time()
        frac = (now - start) / budget if (a.time_schedule and budget > 0) else None
        lr = lr_at(step, a, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        u8, ids, tgt, offs, aux, sq, sk, readable = (t.to(dev, non_blocking=True) for t in next(loader))
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            emb, aux_loss = embed_batch(model, u8, ids, offs, aux_head, aux)
            if a.attn_sup_weight > 0 and a.attn_sup_head < 0 and (sq >= 0).any():
                a.attn_sup_head = pick_head(model, emb, a.attn_sup_layer, sq, sk)
            sup = None
            if a.attn_sup_weight > 0 and a.attn_sup_head >= 0:
                sup = Sup(a.attn_sup_layer, a.attn_sup_head, sq, sk, read_head, aux, offs, readable, step < a.read_warm)
            loss, sup_loss = loss_fn(model, emb, tgt, sup)
        total = loss if aux_loss is None else loss + a.aux_weight * aux_loss
        if sup_loss is not None:
            total = total + a.attn_sup_weight * sup_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        step += 1
        tokens += ids.numel()
        run_loss += loss.item()
        run_aux += aux_loss.item() if aux_loss is not None else 0.0
        run_sup += sup_loss.item() if sup_loss is not None else 0.0
        run_n += 1
        now = time.time()
        if step % a.log_every == 0:
            rec = {"step": step, "loss": run_loss / run_n, "aux": run_aux / run_n, "attn_sup": run_sup / run_n, "lr": lr, "tokens": tokens,
                   "tok_per_s": (tokens - last_tok) / (now - last_t), "elapsed_s": elapsed0 + now - start}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            last_t, last_tok, run_loss, run_aux, run_sup, run_n = now, tokens, 0.0, 0.0, 0.0, 0
        out_of_time = budget > 0 and now - start >= budget
        if (step % a.ckpt_every == 0 or step == a.steps or out_of_time
                or (a.ckpt_minutes > 0 and now - last_save >= a.ckpt_minutes * 60)):
            save()
            last_save = time.time()
        if step % a.eval_every == 0 or (a.eval_minutes > 0 and now - last_eval >= a.eval_minutes * 60):
            evaluate()
            last_eval = time.time()
        if out_of_time:
            print("time budget reached", flush=True)
            break
    save()
    evaluate()
    print(f"done: {step} steps, {tokens} tokens, {elapsed0 + time.time() - start:.0f}s", flush=True)
    os._exit(0)  # do not wait for the DataLoader workers

if __name__ == "__main__":
    main()
