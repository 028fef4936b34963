"""Which perceptual hash and Hamming threshold decontamination should use, measured on the real VQA-RAD images.

    python bench/decontam_hash.py                   # ../shared/data/real/vqa_rad (177 distinct scans)
    python bench/decontam_hash.py --folder DIR      # any folder of images, one scan per file

False positives: pairs of distinct image files (different scans) whose hashes are within the threshold, out of all
n (n - 1) / 2 pairs. Recall: each scan's re-encodings (JPEG quality 75, resized to half size, brightened by 10 %)
within the threshold of the original's hash, out of 3 n. Every image goes through common.images.load_image (the one
image path) and then grey, as data_prep.image_hashes does. Candidates: average hash (aHash, pixels vs their mean),
difference hash (dHash, each pixel vs its right neighbour) and DCT hash (pHash, the n x n lowest frequencies of a
4n x 4n DCT vs their median), at n = 8 (64 bits) and n = 16 (256 bits); thresholds are scaled by bits / 64.
data_prep.image_hashes uses phash16 (the same computation) at the distance this table chose (data_prep.NEAR_BITS).
"""

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image, ImageEnhance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.images import load_image  # noqa: E402


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))  # DCT-II basis (unscaled: only signs and order matter)


def ahash(img: Image.Image, n: int) -> np.ndarray:
    a = np.asarray(img.convert("L").resize((n, n), Image.BILINEAR), dtype=np.float64)
    return (a > a.mean()).ravel()


def dhash(img: Image.Image, n: int) -> np.ndarray:
    a = np.asarray(img.convert("L").resize((n + 1, n), Image.BILINEAR), dtype=np.float64)
    return (a[:, 1:] > a[:, :-1]).ravel()


def phash(img: Image.Image, n: int) -> np.ndarray:
    a = np.asarray(img.convert("L").resize((4 * n, 4 * n), Image.BILINEAR), dtype=np.float64)
    d = _dct_matrix(4 * n)
    low = (d @ a @ d.T)[:n, :n]
    return (low > np.median(low)).ravel()


METHODS = {f"{name}{n}": (fn, n) for name, fn in (("ahash", ahash), ("dhash", dhash), ("phash", phash))
           for n in (8, 16)}


def variants(img: Image.Image) -> list[Image.Image]:
    """The same scan as a copy might hold it: JPEG q=75, half size, 10 % brighter."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    w, h = img.size
    return [load_image(buf.getvalue()), img.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR),
            ImageEnhance.Brightness(img).enhance(1.1)]


def measure(images: list[Image.Image], thresholds=(0, 2, 4, 6, 8, 10, 12)) -> list[dict]:
    """One row per (method, threshold): fp (distinct pairs matched), pairs, recall (variants matched / all), plus
    each method's smallest distance between distinct scans and largest distance of a variant."""
    vs = [variants(im) for im in images]
    out = []
    for name, (fn, n) in METHODS.items():
        h = np.stack([fn(im, n) for im in images])
        hv = np.stack([[fn(v, n) for v in vv] for vv in vs])  # (n_images, 3, bits)
        bits = h.shape[1]
        dist = (h[:, None, :] != h[None, :, :]).sum(-1)
        pair = dist[np.triu_indices(len(images), 1)]
        var = (hv != h[:, None, :]).sum(-1).ravel()
        for t in thresholds:
            t = t * bits // 64
            out.append({"method": name, "bits": bits, "threshold": t, "fp": int((pair <= t).sum()),
                        "pairs": len(pair), "recall": float((var <= t).mean()), "min_distinct": int(pair.min()),
                        "max_variant": int(var.max())})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=os.path.join(ROOT, "..", "shared", "data", "real", "vqa_rad",
                                                     "VQA_RAD Image Folder"))
    args = ap.parse_args()
    if not os.path.isdir(args.folder):
        raise SystemExit(f"no folder {args.folder}")
    names = sorted(f for f in os.listdir(args.folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    images = []
    for f in names:
        with open(os.path.join(args.folder, f), "rb") as fh:
            images.append(load_image(fh.read()))
    exact = len(names) - len({im.tobytes() for im in images})
    print(f"{len(names)} image files ({exact} pixel-identical duplicates), "
          f"{len(names) * (len(names) - 1) // 2} distinct pairs, {3 * len(names)} variants")
    print(f"{'method':8} {'bits':>4} {'thr':>4} {'fp pairs':>8} {'fp rate':>9} {'recall':>7} "
          f"{'min dist distinct':>17} {'max dist variant':>16}")
    for r in measure(images):
        print(f"{r['method']:8} {r['bits']:4d} {r['threshold']:4d} {r['fp']:8d} {r['fp'] / r['pairs']:9.2e} "
              f"{r['recall']:7.3f} {r['min_distinct']:17d} {r['max_variant']:16d}")


if __name__ == "__main__":
    main()
