"""Training and held-out data: samples of internal/eval/shapes, written by
`go run ./cmd/mkdemo data` as JSON lines (shapes + questions). The pictures are
redrawn here with the generator's own pixel rule (shapes.Shape.Contains), so
they are identical to the PNGs the Go package encodes (checked by
`python3 data.py --check FILE.jsonl PNGDIR`)."""

import gzip
import json
import sys

import numpy as np

import vlm

BACKGROUND = (255, 255, 255)


def read_samples(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


_grids = {}


def render(sample):
    """The sample's picture as u8 [size, size, 3]."""
    size = sample["size"]
    if size not in _grids:
        yy, xx = np.mgrid[0:size, 0:size]
        _grids[size] = (xx, yy)
    xx, yy = _grids[size]
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for sh in sample["shapes"]:
        img[_mask(sh, xx, yy)] = sh["rgb"]
    return img


KINDS = ["circle", "square", "triangle", "diamond", "cross"]
COLORS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 205, 20), (245, 135, 20), (140, 55, 180),
          (20, 20, 20), (128, 128, 128)]  # shapes.Colors, in order
COLOR_NAMES = ["red", "green", "blue", "yellow", "orange", "purple", "black", "gray"]


def patch_owner(sample, patch=8, min_pixels=8):
    """For each patch (row-major), the index in sample["shapes"] of the shape
    painting most of its pixels (at least min_pixels), else -1. int64 [n_patches]."""
    size = sample["size"]
    if size not in _grids:
        yy, xx = np.mgrid[0:size, 0:size]
        _grids[size] = (xx, yy)
    xx, yy = _grids[size]
    owner = np.full((size, size), -1, dtype=np.int64)
    for k, sh in enumerate(sample["shapes"]):
        owner[_mask(sh, xx, yy)] = k
    g = size // patch
    blocks = owner[:g * patch, :g * patch].reshape(g, patch, g, patch)
    n = len(sample["shapes"])
    if n == 0:
        return np.full(g * g, -1, dtype=np.int64)
    counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(n)])  # [n, g, g]
    return np.where(counts.max(0) >= min_pixels, counts.argmax(0), -1).reshape(-1)


def patch_labels(sample, patch=8, min_pixels=8):
    """Training-only auxiliary targets for the vision tower: for each patch
    (row-major), the kind, color, size class and grid cell of the shape
    painting most of its pixels (patch_owner), or the background class
    (len(KINDS), len(COLORS), 2, 9). Returns int64 [n_patches, 4]."""
    size = sample["size"]
    owner = patch_owner(sample, patch, min_pixels)
    lab = np.empty((len(owner), 4), dtype=np.int64)
    lab[:, 0], lab[:, 1], lab[:, 2], lab[:, 3] = len(KINDS), len(COLORS), 2, 9
    for k, sh in enumerate(sample["shapes"]):
        cell = min(2, sh["y"] * 3 // size) * 3 + min(2, sh["x"] * 3 // size)
        lab[owner == k] = (KINDS.index(sh["kind"]), COLORS.index(tuple(sh["rgb"])), 1 if sh["r"] * 3 > size * 0.3 else 0, cell)
    return lab


def _mask(sh, xx, yy):
    dx, dy, r = xx - sh["x"], yy - sh["y"], sh["r"]
    box = (dx >= -r) & (dx <= r) & (dy >= -r) & (dy <= r)
    k = sh["kind"]
    if k == "circle":
        m = dx * dx + dy * dy <= r * r
    elif k == "square":
        m = np.ones_like(box)
    elif k == "triangle":
        m = 2 * np.abs(dx) <= dy + r
    elif k == "diamond":
        m = np.abs(dx) + np.abs(dy) <= r
    elif k == "cross":
        arm = max(1, r // 3)
        m = (np.abs(dx) <= arm) | (np.abs(dy) <= arm)
    else:
        raise ValueError("unknown shape kind " + k)
    return box & m


def check(path, pngdir):
    from PIL import Image
    n = 0
    for s in read_samples(path):
        ref = np.asarray(Image.open(f"{pngdir}/{s['image']}").convert("RGB"))
        if not np.array_equal(ref, render(s)):
            print("DIFFERENT:", s["id"])
            return False
        n += 1
    print(f"{n} pictures identical to the Go PNGs")
    return True


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        sys.exit(0 if check(sys.argv[2], sys.argv[3]) else 1)
    print(__doc__)
