"""One image-loading path (issue 11 §2): EXIF orientation, transparency on white, original bytes kept.

    pytest -q tests/test_images.py"""

import hashlib
import io
import json
import os

import datasets
import pytest
from PIL import Image

import data_prep as dp
from common.data import load_rows, parse_row
from common.images import load_image, source_bytes


def _exif_jpeg(path, orientation=6):
    """A JPEG stored 96 wide x 64 high: left half black, right half white, with an EXIF Orientation tag."""
    img = Image.new("L", (96, 64), 0)
    img.paste(255, (48, 0, 96, 64))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif)
    return path


def _diagram(mode):
    """64x64: a transparent background with an opaque black bar (rows 24..39), in RGBA, LA or P + transparency."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent *black*, as many diagram tools write it
    img.paste((0, 0, 0, 255), (8, 24, 56, 40))
    if mode == "LA":
        return img.convert("LA")
    if mode == "P":
        p = Image.new("P", (64, 64), 0)
        p.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # index 0 and 1 are both black; 0 is transparent
        p.paste(1, (8, 24, 56, 40))
        p.info["transparency"] = 0
        return p
    return img


def _one_row_file(tmp_path, images):
    row = {"question": "Is there a bar?", "options": {"A": "Yes", "B": "No"}, "answer_label": "A", "answer": "Yes",
           "dataset_name": "t", "dataset_index": 0, "images": images}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    return str(tmp_path / "rows.jsonl")


def _stored_bytes(folder):
    ds = load_rows(str(folder), decode_images=False)
    return [im["bytes"] for r in ds for im in r["images"]]


def test_exif_orientation_is_applied(tmp_path):
    path = _exif_jpeg(tmp_path / "turned.jpg")
    assert Image.open(path).size == (96, 64)  # as stored
    img = load_image("turned.jpg", str(tmp_path))
    assert img.size == (64, 96) and img.mode == "RGB"
    # Orientation 6 = shown turned 90 degrees clockwise: the stored left (black) half is now on top
    assert img.getpixel((32, 10))[0] < 30 and img.getpixel((32, 85))[0] > 225
    # ... exactly as datasets' Image feature and transformers' load_image show it
    from transformers.image_utils import load_image as hf_load_image

    assert hf_load_image(str(path)).size == (64, 96)
    theirs = datasets.Image().decode_example({"path": str(path), "bytes": None}).convert("RGB")
    assert theirs.tobytes() == img.tobytes()
    assert source_bytes(img) is None  # turned: the stored file is not what is shown


def test_turned_jpeg_is_written_upright(tmp_path):
    _exif_jpeg(tmp_path / "turned.jpg")
    dp.eval_set(out=str(tmp_path / "out"), source=_one_row_file(tmp_path, ["turned.jpg"]))
    stored = Image.open(io.BytesIO(_stored_bytes(tmp_path / "out")[0]))
    assert stored.size == (64, 96) and stored.format == "PNG"  # lossless after the turn
    assert stored.getexif().get(0x0112) in (None, 1)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_pasted_on_white(mode):
    src = _diagram(mode)
    buf = io.BytesIO()
    src.save(buf, "PNG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)  # was transparent: white, not one black square
    assert img.getpixel((32, 32)) == (0, 0, 0)  # the bar is kept
    if mode == "RGBA":  # the same as upstream's eval loader, qwen-vl-utils
        from qwen_vl_utils.vision_process import to_rgb

        assert img.tobytes() == to_rgb(Image.open(io.BytesIO(buf.getvalue()))).tobytes()


def test_transparent_png_written_on_white(tmp_path):
    _diagram("RGBA").save(tmp_path / "d.png")
    dp.eval_set(out=str(tmp_path / "out"), source=_one_row_file(tmp_path, ["d.png"]))
    img = parse_row(load_rows(str(tmp_path / "out"))[0]).images[0]
    assert img.getpixel((2, 2)) == (255, 255, 255) and img.getpixel((32, 32)) == (0, 0, 0)


@pytest.mark.parametrize("name,save", [("grey.jpg", dict(format="JPEG", quality=75)),
                                       ("rgb.jpg", dict(format="JPEG", quality=60)),
                                       ("rgb.png", dict(format="PNG"))])
def test_unchanged_image_keeps_its_bytes(tmp_path, name, save):
    img = Image.effect_noise((120, 90), 60)  # noise: any re-encode of a JPEG changes its bytes
    (img if name.startswith("grey") else img.convert("RGB")).save(tmp_path / name, **save)
    dp.eval_set(out=str(tmp_path / "out"), source=_one_row_file(tmp_path, [name]))
    assert _stored_bytes(tmp_path / "out") == [(tmp_path / name).read_bytes()]
    # and re-writing a written set (unified source, hub-style parquet) keeps them too
    dp.eval_set(out=str(tmp_path / "again"), source=str(tmp_path / "out"))
    assert _stored_bytes(tmp_path / "again") == [(tmp_path / name).read_bytes()]


def test_resized_training_image_is_not_the_source(tmp_path):
    Image.effect_noise((1500, 300), 60).save(tmp_path / "big.jpg", quality=80)
    dp.text(out=str(tmp_path / "out"), source=_one_row_file(tmp_path, ["big.jpg"]))  # training sets are bounded
    stored = _stored_bytes(tmp_path / "out")[0]
    assert stored != (tmp_path / "big.jpg").read_bytes() and Image.open(io.BytesIO(stored)).size == (1024, 204)


def test_real_vqa_rad_images_are_the_source_files(real, tmp_path):
    """On the real VQA-RAD slice every stored image is byte-identical to its source file (they were all re-encoded,
    differing by up to 27 grey levels)."""
    folder = os.path.join(real, "vqa_rad")
    dp.eval_set(out=str(tmp_path / "out"), vqa_rad=folder)
    src_dir = os.path.join(folder, "VQA_RAD Image Folder")
    sources = {hashlib.sha256(open(os.path.join(src_dir, f), "rb").read()).hexdigest() for f in os.listdir(src_dir)}
    stored = [hashlib.sha256(b).hexdigest() for b in _stored_bytes(tmp_path / "out")]
    assert len(stored) == 220 and len(set(stored)) == 119  # the 221 CLOSED rows use 119 of the 177 images
    assert set(stored) <= sources


@pytest.mark.parametrize("dtype,lo,hi", [("uint16", 0, 4095), ("uint16", 30000, 30400), ("int32", -1024, 3071),
                                         ("float32", 0.0, 1.0), ("float32", -1000.0, 3000.0)])
@pytest.mark.parametrize("as_tiff", [False, True])
def test_high_bit_depth_is_scaled_by_its_own_range(dtype, lo, hi, as_tiff):
    """I;16, I and F (12-bit CT in 16 bits, a narrow window, Hounsfield units, float 0..1): the 8-bit grey of the result
    spans the image's own min..max -> 0..255 and keeps the order of the pixel values (PIL's convert clips instead:
    float 0..1 came out black, values over 255 white)."""
    import numpy as np

    a = np.linspace(lo, hi, 64 * 64).reshape(64, 64).astype(dtype)
    img = Image.fromarray(a)
    assert img.mode == {"uint16": "I;16", "int32": "I", "float32": "F"}[dtype]
    if as_tiff:
        buf = io.BytesIO()
        img.save(buf, "TIFF")
        img = buf.getvalue()
    g = np.asarray(load_image(img))
    assert g.shape == (64, 64, 3) and (g[..., 0] == g[..., 2]).all()
    g = g[..., 0].ravel().astype(int)
    assert g.min() == 0 and g.max() == 255
    assert (g == 0).mean() < 0.02 and (g == 255).mean() < 0.02  # scaled, not clipped (clipping piles up the ends)
    assert (np.diff(g) >= 0).all()  # order kept along the gradient
    assert len(np.unique(g)) >= min(200, len(np.unique(a)))


def test_constant_and_non_finite_high_bit_depth():
    """A constant high-bit-depth image carries no contrast and becomes black (0); NaN/inf pixels are refused."""
    import numpy as np

    from common.images import RowError

    assert np.asarray(load_image(Image.fromarray(np.full((8, 8), 7.5, np.float32)))).max() == 0
    bad = np.zeros((8, 8), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(RowError, match="not finite"):
        load_image(Image.fromarray(bad))
