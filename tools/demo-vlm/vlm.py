"""A tiny LLaVA-style vision-language model in PyTorch that computes the same
function as llama.cpp runs on the GGUF pair written by internal/testmodel
(WriteTrained): a CLIP ViT with the LLaVA "mlp" projector (mmproj.gguf) and a
"llama" text model (model.gguf).

What llama.cpp does, and what this file mirrors (llama.cpp as vendored by
github.com/ollama/ollama v0.17.4: tools/mtmd/clip.cpp, tools/mtmd/models/llava.cpp,
src/llama-model.cpp, src/llama-vocab.cpp):

Vision (clip_graph_llava):
  * image: RGB u8 at image_size x image_size (other sizes are resized with
    clip.cpp's bilinear + padding, see preprocess_u8), scaled to [0,1] and
    normalised per channel with the CLIP mean/std stored in the file;
  * patch embedding: conv P x P, stride P, no bias; patches in row-major
    order (y, then x);
  * the class embedding is appended AFTER the patches, then the learned
    position embeddings (n_patches + 1 rows) are added, then pre-LN;
  * pre-LN blocks (LN, MHA with q/k/v/o biases, residual, LN, MLP with quick
    GELU x*sigmoid(1.702x) since clip.use_gelu=false, residual); llama.cpp runs
    only the first block_count-1 blocks (LLaVA's "penultimate layer"), so the
    file carries one block more than the model uses (written as zeros);
  * no post-LN;
  * output rows 1..n_patches are kept: patches 1..n-1 and the class token
    (patch 0 is dropped);
  * projector: mm.0 (linear), GELU (tanh approximation, ggml_gelu), mm.2.
  * clip.cpp swaps ffn_up/ffn_down when ffn_down's input size equals the
    vision width, so vision_ff must differ from vision_embd.
Text (llama):
  * RMSNorm (eps 1e-5, weight only); attention with RoPE in llama.cpp's
    NORM mode (rotating adjacent pairs (2i, 2i+1), theta = pos *
    base^(-2i/head_dim)), grouped-query heads (q head h uses kv head
    h // (heads/kv_heads)), scale 1/sqrt(head_dim), causal also over image
    embeddings; SwiGLU feed-forward down(silu(gate(x)) * up(x)); final
    RMSNorm and a separate output matrix.
  * the image embeddings occupy one position each in the sequence.

Prompt tokens (mtmd_tokenize with the vicuna chat template): the rendered text
is split at the media marker; BOS first; every text piece is tokenised on its
own by the SentencePiece vocabulary with its space prefix ("▁" before each
piece), one token per printable ASCII character, byte tokens otherwise;
with Config.vocab = "words" (issue [O]) by the word-level vocabulary of
wordvocab.json through wordvocab.py, which merges as llama.cpp's SPM
tokenizer does.
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --- vocabulary (internal/testmodel/vocab.go) ---
UNK, BOS, EOS = 0, 1, 2
FIRST_BYTE = 3
SPACE = FIRST_BYTE + 256  # "▁"
FIRST_ASCII = SPACE + 1  # '!'
BASE_VOCAB = FIRST_ASCII + (ord('~') - ord('!') + 1)  # 354

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = (122, 116, 104)  # clip.cpp's LLaVA-1.5 pad colour
MEDIA = "<__media__>"


# --- word-level vocabulary (internal/testmodel/wordvocab.go; issue [O]) ---
# The first BASE_VOCAB ids are the byte-level vocabulary above; whole words of
# the synthetic language and their prefixes follow. Selected per model by
# Config.vocab ("bytes", the default, or "words"); building a VLM selects its
# vocabulary for the tokenisation functions below (set_vocab).
WORD_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wordvocab.json")
_words = None  # wordvocab.WordVocab while the word vocabulary is selected
_word_cache = {}


def word_vocab():
    """The word vocabulary (wordvocab.WordVocab), loaded once from WORD_VOCAB_FILE."""
    if "v" not in _word_cache:
        import wordvocab
        _word_cache["v"] = wordvocab.WordVocab.load(WORD_VOCAB_FILE)
    return _word_cache["v"]


def vocab_size(name):
    if name in ("bytes", "", None):
        return BASE_VOCAB
    if name == "words":
        return len(word_vocab())
    raise ValueError("unknown vocabulary " + repr(name))


def set_vocab(name):
    """Selects the vocabulary the tokenisation functions use: "bytes" or "words"."""
    global _words
    vocab_size(name)
    _words = word_vocab() if name == "words" else None


def current_vocab():
    return "words" if _words is not None else "bytes"


def byte_ids(text):
    """Byte-level ids of text, character by character, without the space prefix."""
    out = []
    for b in text.encode("utf-8"):
        if b == 0x20:
            out.append(SPACE)
        elif 0x21 <= b <= 0x7e:
            out.append(FIRST_ASCII + b - 0x21)
        else:
            out.append(FIRST_BYTE + b)
    return out


def tokenize_piece(text):
    """SentencePiece tokenisation of one text piece with the space prefix."""
    if _words is not None:
        return _words.tokenize_piece(text)
    return byte_ids(" " + text)


def detokenize(tokens):
    """Text of generated tokens (no BOS); keeps the leading space as llama.cpp does per piece."""
    if _words is not None:
        return _words.detokenize_bytes([BOS] + list(tokens)).decode("utf-8", errors="replace")
    bs = bytearray()
    for t in tokens:
        if FIRST_BYTE <= t < SPACE:
            bs.append(t - FIRST_BYTE)
        elif t == SPACE:
            bs.append(0x20)
        elif FIRST_ASCII <= t < BASE_VOCAB:
            bs.append(0x21 + t - FIRST_ASCII)
    return bs.decode("utf-8", errors="replace")


def render_user(question, image_first=True):
    """The user turn as the API flattens [image, text] (or [text, image]) parts."""
    return (MEDIA + "\n" + question) if image_first else (question + "\n" + MEDIA)


# System prompts seen in training (train.py --system-frac): LLaVA-1.5's
# (the published evaluation scripts' and elastic-eval --protocol paper's)
# and a few short ones, so that the answer does not depend on one text.
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEMS = (LLAVA_SYSTEM, "You are a helpful assistant.", "Answer the question about the picture.",
           "You are a helpful assistant that describes pictures.", "Be brief.")


def prompt_pieces(question, image_first=True, system=""):
    """The vicuna template output for an optional system message, one user
    turn and the generation prompt, split at the media marker:
    [text_before, text_after]. llama.cpp's vicuna template writes a system
    message as its content and a blank line."""
    text = (system + "\n\n" if system else "") + "USER: " + render_user(question, image_first) + "\n" + "ASSISTANT:"
    before, after = text.split(MEDIA)
    return before, after


def prompt_tokens(question, image_first=True, system=""):
    """(tokens before the image, tokens after the image), BOS included."""
    before, after = prompt_pieces(question, image_first, system)
    return [BOS] + tokenize_piece(before), tokenize_piece(after)


def answer_tokens(answer):
    """Training target after "ASSISTANT:": " " + answer + EOS (the template's
    'ASSISTANT: ' + content + eos)."""
    return tokenize_piece(answer) + [EOS]


# --- image preprocessing (clip.cpp, PROJECTOR_TYPE_MLP without anyres) ---
def _resize_bilinear(src, tw, th):
    """clip.cpp img_tool::resize_bilinear (float32 maths, truncation to u8)."""
    sh, sw, _ = src.shape
    s = src.astype(np.float32)
    xr = np.float32(sw - 1) / np.float32(tw)
    yr = np.float32(sh - 1) / np.float32(th)
    dst = np.zeros((th, tw, 3), dtype=np.uint8)
    for y in range(th):
        py = np.float32(yr * np.float32(y))
        yf = int(py)
        yl = np.float32(py - np.float32(yf))
        for x in range(tw):
            px = np.float32(xr * np.float32(x))
            xf = int(px)
            xl = np.float32(px - np.float32(xf))
            a, b = s[yf, xf], s[yf, min(xf + 1, sw - 1)]
            c, d = s[min(yf + 1, sh - 1), xf], s[min(yf + 1, sh - 1), min(xf + 1, sw - 1)]
            top = a + (b - a) * xl
            bot = c + (d - c) * xl
            dst[y, x] = (top + (bot - top) * yl).astype(np.uint8)
    return dst


def preprocess_u8(img, size):
    """RGB u8 array [H, W, 3] -> the u8 square clip.cpp encodes."""
    h, w, _ = img.shape
    if h == size and w == size:
        return img
    scale = min(size / w, size / h)
    nw = min(int(math.ceil(w * np.float32(scale))), size)
    nh = min(int(math.ceil(h * np.float32(scale))), size)
    r = _resize_bilinear(img, nw, nh)
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = PAD_COLOR
    ox, oy = (size - nw) // 2, (size - nh) // 2
    out[oy:oy + nh, ox:ox + nw] = r
    return out


def normalize(u8):
    """u8 [..., H, W, 3] -> float [..., 3, H, W] as clip.cpp's normalize_image_u8_to_f32."""
    x = torch.as_tensor(u8).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device)
    std = torch.tensor(CLIP_STD, device=x.device)
    x = (x - mean) / std
    return x.movedim(-1, -3).contiguous()


# --- model ---
class Config:
    def __init__(self, **kw):
        # text
        self.layers = 4
        self.embd = 192
        self.heads = 4
        self.kv_heads = 2
        self.ff = 512
        self.ctx = 2048
        self.rope_base = 10000.0
        self.rms_eps = 1e-5
        # vision
        self.image_size = 96
        self.patch_size = 8
        self.vision_embd = 128
        self.vision_layers = 4  # written; llama.cpp runs vision_layers - 1
        self.vision_heads = 4
        self.vision_ff = 384
        self.ln_eps = 1e-5
        # vocabulary: "bytes" (354 tokens, one per character) or "words"
        self.vocab = "bytes"
        for k, v in kw.items():
            if not hasattr(self, k):
                raise KeyError(k)
            setattr(self, k, v)
        assert self.vision_ff != self.vision_embd
        assert self.vision_layers >= 2

    @property
    def n_vocab(self):
        return vocab_size(self.vocab)

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self):
        return dict(self.__dict__)

    def go_options(self):
        """The internal/testmodel Options (JSON field names of cmd/mkdemo)."""
        return {
            "Layers": self.layers, "Embd": self.embd, "Heads": self.heads, "KVHeads": self.kv_heads,
            "FF": self.ff, "CtxTrain": self.ctx, "VocabSize": 0,
            "ImageSize": self.image_size, "PatchSize": self.patch_size, "VisionEmbd": self.vision_embd,
            "VisionLayers": self.vision_layers, "VisionHeads": self.vision_heads, "VisionFF": self.vision_ff,
            **({"Vocab": "words"} if self.vocab == "words" else {}),
        }


_SDPA = hasattr(F, "scaled_dot_product_attention")


def attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v, causal or full; q, k, v: [B, H, T, d]."""
    if _SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[-2]
        s = s + torch.full((T, T), float("-inf"), device=q.device, dtype=s.dtype).triu(1)
    return torch.softmax(s, dim=-1) @ v


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class VisionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        E = c.vision_embd
        self.h = c.vision_heads
        self.ln1 = nn.LayerNorm(E, eps=c.ln_eps)
        self.q = nn.Linear(E, E)
        self.k = nn.Linear(E, E)
        self.v = nn.Linear(E, E)
        self.o = nn.Linear(E, E)
        self.ln2 = nn.LayerNorm(E, eps=c.ln_eps)
        self.up = nn.Linear(E, c.vision_ff)
        self.down = nn.Linear(c.vision_ff, E)

    def forward(self, x):
        B, T, E = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, T, self.h, -1).transpose(1, 2)
        k = self.k(h).view(B, T, self.h, -1).transpose(1, 2)
        v = self.v(h).view(B, T, self.h, -1).transpose(1, 2)
        a = attention(q, k, v, causal=False)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, E))
        return x + self.down(quick_gelu(self.up(self.ln2(x))))


class Vision(nn.Module):
    def __init__(self, c):
        super().__init__()
        E, P = c.vision_embd, c.patch_size
        self.patch = nn.Conv2d(3, E, P, stride=P, bias=False)
        self.cls = nn.Parameter(torch.randn(E) * 0.02)
        self.pos = nn.Parameter(torch.randn(c.n_patches + 1, E) * 0.02)
        self.pre_ln = nn.LayerNorm(E, eps=c.ln_eps)
        # only the blocks llama.cpp runs; the file gets one more (zeros)
        self.blocks = nn.ModuleList([VisionBlock(c) for _ in range(c.vision_layers - 1)])
        self.mm0 = nn.Linear(E, c.embd)
        self.mm2 = nn.Linear(c.embd, c.embd)

    def features(self, img):
        """img: [B, 3, S, S] normalised -> ViT output [B, n_patches + 1, vision_embd]
        (patches in row-major order, then the class token)."""
        x = self.patch(img).flatten(2).transpose(1, 2)  # [B, N, E], row-major patches
        B = x.shape[0]
        x = torch.cat([x, self.cls.expand(B, 1, -1)], dim=1) + self.pos
        x = self.pre_ln(x)
        for b in self.blocks:
            x = b(x)
        return x

    def project(self, feats):
        """ViT output -> image embeddings [B, n_patches, embd]: rows 1..N
        (patches 1..N-1 and the class token) through the projector."""
        x = feats[:, 1:]
        return self.mm2(F.gelu(self.mm0(x), approximate="tanh"))

    def forward(self, img):
        """img: [B, 3, S, S] normalised -> [B, n_patches, embd]."""
        return self.project(self.features(img))


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_tables(T, hd, base, device=None):
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, hd/2]
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)


def apply_rope(x, cos, sin):
    """x: [B, H, T, hd]; NORM mode: pairs (2i, 2i+1)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    r0 = x0 * cos - x1 * sin
    r1 = x0 * sin + x1 * cos
    return torch.stack([r0, r1], dim=-1).flatten(-2)


class TextBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        E, hd = c.embd, c.embd // c.heads
        self.h, self.kvh, self.hd = c.heads, c.kv_heads, hd
        self.attn_norm = RMSNorm(E, c.rms_eps)
        self.q = nn.Linear(E, c.heads * hd, bias=False)
        self.k = nn.Linear(E, c.kv_heads * hd, bias=False)
        self.v = nn.Linear(E, c.kv_heads * hd, bias=False)
        self.o = nn.Linear(c.heads * hd, E, bias=False)
        self.ffn_norm = RMSNorm(E, c.rms_eps)
        self.gate = nn.Linear(E, c.ff, bias=False)
        self.up = nn.Linear(E, c.ff, bias=False)
        self.down = nn.Linear(c.ff, E, bias=False)

    def forward(self, x, cos, sin):
        B, T, E = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.kvh, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.h // self.kvh
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = attention(q, k, v, causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class VLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        set_vocab(c.vocab)
        self.vision = Vision(c)
        self.tok = nn.Embedding(c.n_vocab, c.embd)
        self.blocks = nn.ModuleList([TextBlock(c) for _ in range(c.layers)])
        self.norm = RMSNorm(c.embd, c.rms_eps)
        self.out = nn.Linear(c.embd, c.n_vocab, bias=False)
        self._init()

    def _init(self):
        for n, p in self.named_parameters():
            if p.dim() >= 2 and "pos" not in n:
                nn.init.normal_(p, std=0.02)
            elif n.endswith(".bias"):
                nn.init.zeros_(p)
        # scaled residual projections (GPT-2 style)
        L = self.c.layers
        for b in self.blocks:
            nn.init.normal_(b.o.weight, std=0.02 / math.sqrt(2 * L))
            nn.init.normal_(b.down.weight, std=0.02 / math.sqrt(2 * L))

    def text_forward(self, emb):
        """emb: [B, T, E] input embeddings -> logits [B, T, V] (causal)."""
        return self.out(self.hidden(emb))

    def hidden(self, emb):
        """Final-norm hidden states [B, T, E] (causal)."""
        T = emb.shape[1]
        cos, sin = rope_tables(T, self.c.embd // self.c.heads, self.c.rope_base, emb.device)
        x = emb
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.norm(x)


@torch.no_grad()
def widen_vocab(src, dst):
    """Warm start of a word-vocabulary model dst from a byte-vocabulary model
    src: every weight copied, the BASE_VOCAB old embedding and output rows
    kept, and each word piece's rows the mean of its characters' rows (the
    embedding of "\u2581red" from "\u2581", "r", "e", "d"); embedding rows are
    rescaled to their characters' mean norm, output rows are not (a plain mean
    is shorter, so a new piece starts with a moderate logit)."""
    assert src.c.vocab in ("bytes", "") and dst.c.vocab == "words"
    state = {k: v for k, v in src.state_dict().items() if k not in ("tok.weight", "out.weight")}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert set(missing) == {"tok.weight", "out.weight"} and not unexpected, (missing, unexpected)
    wv = word_vocab()
    for name in ("tok", "out"):
        old, new = getattr(src, name).weight, getattr(dst, name).weight
        new[:BASE_VOCAB] = old
        for i in range(BASE_VOCAB, new.shape[0]):
            ids = byte_ids(wv.piece(i).replace("\u2581", " "))
            rows = old[ids]
            m = rows.mean(0)
            new[i] = m * (rows.norm(dim=1).mean() / m.norm().clamp_min(1e-8)) if name == "tok" else m
    return dst


# --- export: GGUF tensor names (internal/testmodel) ---
def gguf_tensors(model):
    """name -> float32 numpy array in PyTorch layout (C order = ggml order)."""
    c = model.c
    t = {}

    def put(name, p):
        t[name] = p.detach().float().cpu().numpy().astype(np.float32)

    put("token_embd.weight", model.tok.weight)
    put("output_norm.weight", model.norm.weight)
    put("output.weight", model.out.weight)
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", b.attn_norm.weight)
        put(p + "attn_q.weight", b.q.weight)
        put(p + "attn_k.weight", b.k.weight)
        put(p + "attn_v.weight", b.v.weight)
        put(p + "attn_output.weight", b.o.weight)
        put(p + "ffn_norm.weight", b.ffn_norm.weight)
        put(p + "ffn_gate.weight", b.gate.weight)
        put(p + "ffn_up.weight", b.up.weight)
        put(p + "ffn_down.weight", b.down.weight)
    v = model.vision
    put("v.patch_embd.weight", v.patch.weight)
    put("v.class_embd", v.cls)
    put("v.position_embd.weight", v.pos)
    put("v.pre_ln.weight", v.pre_ln.weight)
    put("v.pre_ln.bias", v.pre_ln.bias)
    blocks = list(v.blocks)
    for i in range(c.vision_layers):
        p = f"v.blk.{i}."
        if i < len(blocks):
            b = blocks[i]
            pairs = [("ln1", b.ln1), ("attn_q", b.q), ("attn_k", b.k), ("attn_v", b.v), ("attn_out", b.o),
                     ("ln2", b.ln2), ("ffn_up", b.up), ("ffn_down", b.down)]
            for n, m in pairs:
                put(p + n + ".weight", m.weight)
                put(p + n + ".bias", m.bias)
        else:  # the block llama.cpp skips (penultimate-layer rule): zeros
            E, FF = c.vision_embd, c.vision_ff
            shapes = {"ln1": (E, E), "attn_q": ((E, E), E), "attn_k": ((E, E), E), "attn_v": ((E, E), E),
                      "attn_out": ((E, E), E), "ln2": (E, E), "ffn_up": ((FF, E), FF), "ffn_down": ((E, FF), E)}
            for n, (ws, bs) in shapes.items():
                t[p + n + ".weight"] = np.zeros(ws, dtype=np.float32)
                t[p + n + ".bias"] = np.zeros(bs, dtype=np.float32)
    put("mm.0.weight", v.mm0.weight)
    put("mm.0.bias", v.mm0.bias)
    put("mm.2.weight", v.mm2.weight)
    put("mm.2.bias", v.mm2.bias)
    return t


def export_weights(model, out_dir, f16=False, name="elasticserve-demo-vlm", description=""):
    """Writes out_dir/manifest.json and out_dir/weights.bin (little-endian
    float32, tensors back to back) for cmd/mkdemo."""
    import os
    os.makedirs(out_dir, exist_ok=True)
    tensors = gguf_tensors(model)
    opts = model.c.go_options()
    opts["F16"] = bool(f16)
    manifest = {"options": opts, "name": name, "description": description, "tensors": []}
    off = 0
    with open(os.path.join(out_dir, "weights.bin"), "wb") as f:
        for n, a in tensors.items():
            a = np.ascontiguousarray(a, dtype="<f4")
            f.write(a.tobytes())
            manifest["tensors"].append({"name": n, "shape": list(a.shape), "offset": off, "count": int(a.size)})
            off += a.size * 4
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def round_f16_(model):
    """Rounds the matrices an F16 file stores as float16 (everything with >= 2
    dims except the position table) in place, so PyTorch computes with the
    exported values."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2 and n != "vision.pos":
                p.copy_(p.half().float())


# --- inference ---
@torch.no_grad()
def encode_images(model, u8):
    """u8: [B, S, S, 3] -> image embeddings [B, N, E]."""
    return model.vision(normalize(u8).to(_dev(model)))


def _dev(model):
    return next(model.parameters()).device


@torch.no_grad()
def _step(model, x, pos0, cache):
    """Runs input embeddings x [1, T, E] at positions pos0.. with a KV cache
    (list of (k, v) per layer, updated); returns the last row's logits."""
    c = model.c
    T = x.shape[1]
    hd = c.embd // c.heads
    cos, sin = rope_tables(pos0 + T, hd, c.rope_base, x.device)
    cos, sin = cos[pos0:], sin[pos0:]
    for i, b in enumerate(model.blocks):
        h = b.attn_norm(x)
        q = b.q(h).view(1, T, b.h, hd).transpose(1, 2)
        k = b.k(h).view(1, T, b.kvh, hd).transpose(1, 2)
        v = b.v(h).view(1, T, b.kvh, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache[i] is not None:
            k = torch.cat([cache[i][0], k], 2)
            v = torch.cat([cache[i][1], v], 2)
        cache[i] = (k, v)
        rep = b.h // b.kvh
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        S = kk.shape[2]
        mask = torch.full((T, S), float("-inf"), device=x.device).triu(S - T + 1)
        a = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ vv
        x = x + b.o(a.transpose(1, 2).reshape(1, T, -1))
        h = b.ffn_norm(x)
        x = x + b.down(F.silu(b.gate(h)) * b.up(h))
    return model.out(model.norm(x[:, -1]))[0]


@torch.no_grad()
def prompt_embeddings(model, img_emb, question, image_first=True, system=""):
    pre, post = prompt_tokens(question, image_first, system)
    d = _dev(model)
    return torch.cat([model.tok(torch.tensor(pre, device=d)), img_emb, model.tok(torch.tensor(post, device=d))], 0)[None]


@torch.no_grad()
def greedy(model, img_emb, question, image_first=True, max_new=256, system=""):
    """Greedy answer for one image (img_emb [N, E]); returns (text, tokens)."""
    emb = prompt_embeddings(model, img_emb, question, image_first, system)
    cache = [None] * len(model.blocks)
    logits = _step(model, emb, 0, cache)
    pos = emb.shape[1]
    out = []
    for _ in range(max_new):
        t = int(torch.argmax(logits))
        if t == EOS:
            break
        out.append(t)
        logits = _step(model, model.tok(torch.tensor([[t]], device=_dev(model))), pos, cache)
        pos += 1
    return detokenize(out), out
