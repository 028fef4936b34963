"""Images of the unified schema: decode any form (PIL, bytes, path inside the data folder) to RGB, refuse the
broken and the dangerous with a reason, and bound sides as the recipe's training data does."""

import io
import os

from PIL import Image

MAX_SIDE, MIN_SIDE = 1024, 28  # training image bounds (RECIPE §1.6)
MAX_PIXELS_DECODE = 64_000_000  # refuse to decode anything larger (decompression bombs, 20000x20000 scans)
MAX_IMAGE_BYTES = 50 * 2**20
MIN_DECODED_SIDE = 4  # 1x1 / 2x2 "images" are placeholders or damage, not pictures


class RowError(ValueError):
    """A row that cannot be used; the message is the reason written to reports."""


def load_image(value, root: str | None = None) -> Image.Image:
    """PIL image from a PIL image, a datasets {'bytes','path'} dict, raw bytes, or a path inside `root`; RGB."""
    if isinstance(value, Image.Image):
        img = value
    else:
        data = None
        if isinstance(value, dict):
            data, value = value.get("bytes"), value.get("path")
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        if data is None:
            if not isinstance(value, str) or not value:
                raise RowError("image entry is neither bytes nor a path")
            path = safe_path(root, value)
            if not os.path.isfile(path):
                raise RowError(f"image file not found: {value}")
            if os.path.getsize(path) > MAX_IMAGE_BYTES:
                raise RowError(f"image file over {MAX_IMAGE_BYTES >> 20} MiB: {value}")
            with open(path, "rb") as f:
                data = f.read()
        if not data:
            raise RowError("image is zero bytes")
        try:
            img = Image.open(io.BytesIO(data))
        except Exception as e:  # PIL raises several types for unreadable data
            raise RowError(f"image cannot be decoded ({type(e).__name__})") from None
    w, h = img.size
    if w * h > MAX_PIXELS_DECODE:
        raise RowError(f"image too large: {w}x{h}")
    if w < MIN_DECODED_SIDE or h < MIN_DECODED_SIDE:
        raise RowError(f"image too small to hold content: {w}x{h}")
    if max(w, h) / min(w, h) > 200:  # the Qwen2.5-VL processor refuses these mid-training
        raise RowError(f"image aspect ratio over 200: {w}x{h}")
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise RowError(f"image is truncated or corrupt ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit grey is scaled to 8 bits (PIL's own convert clips it), CMYK/P/LA via convert."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi == lo else (a - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(a.astype("uint8"))
    return img if img.mode == "RGB" else img.convert("RGB")


def safe_path(root: str | None, rel: str) -> str:
    """Resolve `rel` under `root`; refuse absolute paths and anything that escapes the root (.., symlinks)."""
    if root is None:
        raise RowError(f"image path {rel!r} given but the source has no folder to resolve it in")
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, rel))
    if os.path.isabs(rel) or os.path.commonpath([base, full]) != base:
        raise RowError(f"image path escapes the data folder: {rel!r}")
    return full


def bound_image(img: Image.Image, max_side: int = MAX_SIDE, min_side: int = MIN_SIDE) -> Image.Image:
    """RECIPE §1.6: a side under 28 -> shortest side to 28; else a side over 1024 -> longest side to 1024 (bilinear)."""
    w, h = img.size
    if h < min_side or w < min_side:
        s = min_side / min(w, h)
        img = img.resize((max(min_side, int(w * s)), max(min_side, int(h * s))), Image.BILINEAR)
    elif h > max_side or w > max_side:
        s = max_side / max(w, h)
        img = img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR)
    return img if img.mode == "RGB" else img.convert("RGB")
