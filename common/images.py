"""Images of the unified schema: decode any form (PIL, bytes, path inside the data folder) to RGB, refuse the
broken and the dangerous with a reason, and bound sides as the recipe's training data does.

This is the one image-loading path: data_prep (sources, raw folders), evaluate, grpo and sft all reach it through
common.data.parse_row. An image is shown as viewers, datasets' Image feature and transformers' load_image show it
(EXIF orientation applied) and transparency is pasted on white (as qwen-vl-utils, upstream's eval loader, does for
RGBA). When nothing but a lossless mode change (grey -> RGB) was needed, the file's own bytes travel with the image
(source_bytes) so that data_prep writes them unchanged instead of re-encoding a JPEG with loss.
"""

import io
import os

from PIL import ExifTags, Image, ImageOps

MAX_SIDE, MIN_SIDE = 1024, 28  # training image bounds (RECIPE §1.6)
MAX_PIXELS_DECODE = 64_000_000  # refuse to decode anything larger (decompression bombs, 20000x20000 scans)
MAX_IMAGE_BYTES = 50 * 2**20
MIN_DECODED_SIDE = 4  # 1x1 / 2x2 "images" are placeholders or damage, not pictures


class RowError(ValueError):
    """A row that cannot be used; the message is the reason written to reports."""


def load_image(value, root: str | None = None) -> Image.Image:
    """RGB PIL image from a PIL image, a datasets {'bytes','path'} dict, raw bytes, or a path inside `root`, with EXIF
    orientation applied and transparency on white (normalise). When it was given as bytes or a path and needed no
    change but grey -> RGB, source_bytes(returned image) is the file's bytes. Raises RowError saying why an image is
    unusable (missing, empty, undecodable, truncated, too large or small, aspect ratio over 200)."""
    data = None
    if isinstance(value, Image.Image):
        img = value
    else:
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
        out = normalise(img)
    except RowError:
        raise
    except Exception as e:
        raise RowError(f"image is truncated or corrupt ({type(e).__name__}: {e})") from None
    if data is not None and img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and out.size == img.size \
            and not _turned(img) and not _transparent(img):
        out.mvl_source_bytes = data  # an attribute, not .info: PIL copies .info into resized/converted images
    return out


def source_bytes(img: Image.Image) -> bytes | None:
    """The JPEG/PNG file bytes `img` was decoded from by load_image, when they show exactly `img` (else None)."""
    return getattr(img, "mvl_source_bytes", None)


def _turned(img: Image.Image) -> bool:
    """True when the EXIF Orientation tag asks for a flip or rotation (values 2-8; 1 or absent = as stored)."""
    return img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)


def _transparent(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def normalise(img: Image.Image) -> Image.Image:
    """The image as people and upstream's loaders see it, in RGB: EXIF orientation applied (ImageOps.exif_transpose,
    as datasets' Image feature and transformers' load_image do), then alpha (RGBA, LA, P or RGB/L with a
    transparency key) pasted on white with qwen-vl-utils' own to_rgb (upstream's eval and SFT image loader, RECIPE
    §0 and §5.2; it handles RGBA only, so the other transparent modes become RGBA first), else to_rgb below."""
    if _turned(img):
        img = ImageOps.exif_transpose(img)
    if _transparent(img):
        from qwen_vl_utils.vision_process import to_rgb as on_white  # imports torchvision: only when needed

        return on_white(img.convert("RGBA"))
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode without transparency. High-bit-depth grey (I;16*, 32-bit int I, 32-bit float F) is scaled by
    the image's own range, min..max -> 0..255 (rounded, order kept), since PIL's convert clips it to 0..255 (float
    0..1 came out black, 12-bit CT white); a constant one becomes black (0). The rest (L, CMYK, P, ...) via PIL's
    convert. Raises RowError for NaN/inf pixels. Transparent images go through normalise."""
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise RowError(f"{img.mode} image has pixels that are not finite (NaN or inf)")
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi == lo else np.rint((a - lo) * (255.0 / (hi - lo)))
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
