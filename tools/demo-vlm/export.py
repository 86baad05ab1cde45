"""Loads trained weights (a train.py checkpoint, or the text.npz + vision.npz
pair train.py --npz writes) and exports them for cmd/mkdemo convert.

  python3 export.py --weights W --out EXPORT_DIR [--f16]
  go run ./cmd/mkdemo convert --in EXPORT_DIR --out models/demo

W is a ckpt.pt file, a folder with text.npz, vision.npz and
model_config.json, or a folder with an exported model.gguf + mmproj.gguf.
"""
import argparse
import json
import os

import numpy as np
import torch

import vlm


def read_gguf(path):
    """Metadata and tensors (float32 numpy, PyTorch layout) of a GGUF file
    with f32/f16 tensors, as internal/testmodel writes them."""
    import struct
    b = open(path, "rb").read()
    if b[:4] != b"GGUF":
        raise ValueError(path + ": not a GGUF file")
    pos = 4
    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]
    def string():
        nonlocal pos
        n = take("Q")
        v = b[pos:pos + n].decode("utf-8")
        pos += n
        return v
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalars[t])
    take("I")  # version
    nt, nkv = take("Q"), take("Q")
    meta = {}
    for _ in range(nkv):
        k = string()
        meta[k] = value(take("I"))
    infos = []
    for _ in range(nt):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        typ, off = take("I"), take("Q")
        infos.append((name, dims, typ, off))
    align = meta.get("general.alignment", 32)
    data_start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, typ, off in infos:
        n = int(np.prod(dims))
        dt = {0: "<f4", 1: "<f2"}[typ]
        a = np.frombuffer(b, dtype=dt, count=n, offset=data_start + off).astype(np.float32)
        tensors[name] = a.reshape(list(reversed(dims)))
    return meta, tensors


def load_gguf_dir(path):
    """Rebuilds the PyTorch model from an exported GGUF pair (the inverse of
    vlm.gguf_tensors); exact for float32 files."""
    mt, tt = read_gguf(os.path.join(path, "model.gguf"))
    mp, tp = read_gguf(os.path.join(path, "mmproj.gguf"))
    words = "\u2581USER" in mt.get("tokenizer.ggml.tokens", [])
    cfg = vlm.Config(vocab="words" if words else "bytes",
        layers=mt["llama.block_count"], embd=mt["llama.embedding_length"], heads=mt["llama.attention.head_count"],
        kv_heads=mt["llama.attention.head_count_kv"], ff=mt["llama.feed_forward_length"],
        ctx=mt["llama.context_length"], image_size=mp["clip.vision.image_size"],
        patch_size=mp["clip.vision.patch_size"], vision_embd=mp["clip.vision.embedding_length"],
        vision_layers=mp["clip.vision.block_count"], vision_heads=mp["clip.vision.attention.head_count"],
        vision_ff=mp["clip.vision.feed_forward_length"])
    model = vlm.VLM(cfg)
    names = vlm.gguf_tensors(model)  # name -> array, in the same order as the parameters below
    tensors = {**tt, **tp}
    with torch.no_grad():
        params = {}
        params["tok.weight"] = "token_embd.weight"
        params["norm.weight"] = "output_norm.weight"
        params["out.weight"] = "output.weight"
        for i in range(cfg.layers):
            for ours, theirs in [("attn_norm", "attn_norm"), ("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                                 ("o", "attn_output"), ("ffn_norm", "ffn_norm"), ("gate", "ffn_gate"),
                                 ("up", "ffn_up"), ("down", "ffn_down")]:
                params[f"blocks.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
        params["vision.patch.weight"] = "v.patch_embd.weight"
        params["vision.cls"] = "v.class_embd"
        params["vision.pos"] = "v.position_embd.weight"
        for w in ("weight", "bias"):
            params["vision.pre_ln." + w] = "v.pre_ln." + w
            params["vision.mm0." + w] = "mm.0." + w
            params["vision.mm2." + w] = "mm.2." + w
            for i in range(cfg.vision_layers - 1):
                for ours, theirs in [("ln1", "ln1"), ("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                                     ("o", "attn_out"), ("ln2", "ln2"), ("up", "ffn_up"), ("down", "ffn_down")]:
                    params[f"vision.blocks.{i}.{ours}.{w}"] = f"v.blk.{i}.{theirs}.{w}"
        state = model.state_dict()
        assert set(params) == set(state), set(state) ^ set(params)
        for ours, theirs in params.items():
            assert theirs in names
            state[ours] = torch.from_numpy(tensors[theirs].copy()).view_as(state[ours])
        model.load_state_dict(state)
    model.eval()
    return model, {"config": cfg.to_dict(), "step": mt.get("general.description", "")}


def load(path):
    """The trained model (eval mode, CPU, float32) and its metadata, from a
    train.py checkpoint, an --npz folder, or an exported GGUF folder
    (model.gguf + mmproj.gguf)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.gguf")):
        return load_gguf_dir(path)
    if os.path.isdir(path):
        meta = json.load(open(os.path.join(path, "model_config.json")))
        state = {}
        for part in ("text", "vision"):
            with np.load(os.path.join(path, part + ".npz")) as z:
                state.update({k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files})
    else:
        kw = {"map_location": "cpu"}
        if "weights_only" in torch.load.__code__.co_varnames:
            kw["weights_only"] = False
        ck = torch.load(path, **kw)
        meta = {k: ck[k] for k in ("config", "step", "tokens", "elapsed") if k in ck}
        state = {k: v.float() for k, v in ck["model"].items()}
    model = vlm.VLM(vlm.Config(**meta["config"]))
    model.load_state_dict(state)
    model.eval()
    return model, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--f16", action="store_true", help="store matrices as float16 in the GGUF files")
    ap.add_argument("--name", default="elasticserve-demo-vlm")
    a = ap.parse_args()
    model, meta = load(a.weights)
    desc = ("tiny LLaVA-style VLM trained from scratch on internal/eval/shapes pictures by tools/demo-vlm "
            f"({meta.get('step', '?')} steps, {meta.get('tokens', '?')} tokens)")
    m = vlm.export_weights(model, a.out, f16=a.f16, name=a.name, description=desc)
    n = sum(t["count"] for t in m["tensors"])
    print(f"exported {len(m['tensors'])} tensors, {n} values, to {a.out}")


if __name__ == "__main__":
    main()
