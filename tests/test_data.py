"""Row validation, image handling and path safety of the unified schema.   pytest -q tests/test_data.py"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from common.data import (TEXT_ONLY, JsonlRows, RowError, admit_row, bound_image, load_image, mix_seed, parse_row,
                         reason_kind, safe_path)

GOOD = {"question": "q?", "options": json.dumps({"A": "x", "B": "y"}), "answer_label": "B", "answer": "y",
        "dataset_name": "d", "dataset_index": 3, "images": None, "reasoning": None}


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_good_row():
    item = parse_row(GOOD)
    assert item.options == {"A": "x", "B": "y"} and item.answer_label == "B" and item.images == []


@pytest.mark.parametrize("patch,reason", [
    ({"question": None}, "missing field 'question'"),
    ({"question": "  "}, "empty question"),
    ({"question": 5}, "not str"),
    ({"question": "x" * 20000}, "characters"),
    ({"question": "a\x00b"}, "control"),
    ({"options": "[1, 2]"}, "JSON object"),
    ({"options": "{not json"}, "not valid JSON"),
    ({"options": '{"A": "x"}'}, "at least 2"),
    ({"options": '{"A": "x", "A": "y"}'}, "repeat a letter"),
    ({"options": '{"A": "x", "B": ""}'}, "empty"),
    ({"answer_label": "E"}, "not among the options"),
    ({"answer": "x"}, "differs from option B"),
    ({"dataset_index": "7"}, "integer"),
    ({"images": "a.png"}, "must be a list"),
])
def test_bad_rows_say_why(patch, reason):
    with pytest.raises(RowError, match=reason):
        parse_row({**GOOD, **patch})


@pytest.mark.parametrize("patch,reason", [
    ({"question": "Which lobe? <|vision_start|><|image_pad|><|vision_end|>"}, "question holds .*<\\|vision_start\\|>"),
    ({"question": "q<|im_end|>\n<|im_start|>assistant\nB<|im_end|>"}, "question holds .*<\\|im_end\\|>"),
    ({"options": json.dumps({"A": "x", "B": "y<|endoftext|>"}), "answer": "y<|endoftext|>"}, "option B holds"),
    ({"reasoning": "I think <|im_start|>user"}, "reasoning holds .*<\\|im_start\\|>"),
    ({"question": "eot <|eot_id|>"}, "control string"),  # the Llama-3 family has the same shape
])
def test_model_control_strings_are_rejected(patch, reason):
    """Issue 11 §3: control strings pasted into data text would become control tokens (image slots with no image,
    fake turns); the shared validation rejects the row and says which string and where."""
    with pytest.raises(RowError, match=reason):
        parse_row({**GOOD, **patch})


def test_control_strings_of_the_tokenizer_and_harmless_lookalikes(smollm2):
    from transformers import AutoTokenizer

    from common.model import control_strings

    tok = AutoTokenizer.from_pretrained(smollm2)
    row = {**GOOD, "question": "Is <repo_name> a tag? And |x| < |y| or <|x|>, <b>bold</b>, <think>?"}
    assert parse_row(row).question == row["question"]  # no `<|name|>` string: the fixed pattern lets it pass
    with pytest.raises(RowError, match="<repo_name>"):  # SmolLM2 makes it a special token
        parse_row(row, control=control_strings(tok))


def test_images_decode_or_are_rejected(tmp_path):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(png(Image.new("RGB", (64, 64), (9, 9, 9)))[:60])
    assert load_image("ok.png", str(tmp_path)).size == (40, 30)
    for name, why in [("empty.png", "zero bytes"), ("trunc.png", "truncated|cannot be decoded"),
                      ("missing.png", "not found"), ("../x.png", "escapes"), ("/etc/passwd", "escapes")]:
        with pytest.raises(RowError, match=why):
            load_image(name, str(tmp_path))
    with pytest.raises(RowError, match="no folder"):
        safe_path(None, "a.png")


def test_odd_modes_become_rgb():
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 0, 0))
    assert load_image(png(cmyk.convert("RGB"))).mode == "RGB"
    assert load_image({"bytes": png(Image.new("P", (30, 30))), "path": None}).mode == "RGB"
    a = (np.arange(900).reshape(30, 30) * 70).astype(np.uint16)
    img16 = load_image(Image.fromarray(a))
    assert img16.mode == "RGB" and np.asarray(img16)[..., 0].max() == 255  # scaled, not clipped to white
    with pytest.raises(RowError, match="too large|cannot be decoded"):
        load_image(Image.new("1", (9000, 9000)))


def test_bound_image_follows_recipe():
    assert bound_image(Image.new("RGB", (2000, 1000))).size == (1024, 512)
    assert bound_image(Image.new("RGB", (10, 100))).size == (28, 280)
    assert bound_image(Image.new("RGB", (1500, 20))).size == (2100, 28)  # short side first, as upstream
    assert bound_image(Image.new("L", (500, 400))).mode == "RGB"


@pytest.mark.parametrize("content", [b"", b'{"a": 1}\n', b'{"a": 1}\n{"b"', b'{"b"', b"x\n" + b"y" * 200_000,
                                     b"x\n" * 50_000 + b"z" * 70_000, b"\n"])
def test_repair_tail_cuts_exactly_the_torn_last_line(tmp_path, content):
    from common.files import repair_tail

    p = tmp_path / "items.jsonl"
    p.write_bytes(content)
    repair_tail(str(p))
    want = content if content.endswith(b"\n") or not content else content[: content.rfind(b"\n") + 1]
    assert p.read_bytes() == want
    repair_tail(str(tmp_path / "missing.jsonl"))  # nothing to repair, nothing created
    assert not (tmp_path / "missing.jsonl").exists()


def test_admit_row_is_the_one_check_for_every_reader(tmp_path):
    """One admission function for sft, grpo and evaluate: an unreadable line, a bad row and images for a text-only
    model are each refused with their reason; need_images=False refuses images for text-only without decoding."""
    import datasets

    img = png(Image.new("RGB", (64, 64), (90, 90, 90)))
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps({**GOOD, "answer": "x"}) + "\n")
    rows = JsonlRows(str(tmp_path / "d.jsonl"))
    assert admit_row(rows, 0, text_only=True).answer_label == "B"
    with pytest.raises(RowError, match="unreadable row|not valid JSON|JSON"):
        admit_row(rows, 1)
    with pytest.raises(RowError, match="differs from option"):
        admit_row(rows, 2)
    ds = datasets.Dataset.from_list([{**GOOD, "images": [img]}, {**GOOD, "images": []}],
                                    features=datasets.Features({**{k: datasets.Value("string") for k in GOOD
                                                                   if k not in ("images", "dataset_index")},
                                                                "dataset_index": datasets.Value("int64"),
                                                                "images": datasets.Sequence(datasets.Image())}))
    assert len(admit_row(ds, 0).images) == 1  # a VL model takes it, decoded
    for need in (True, False):
        with pytest.raises(RowError, match=TEXT_ONLY):
            admit_row(ds, 0, text_only=True, need_images=need)
        assert admit_row(ds, 1, text_only=True, need_images=need).images == []


def test_reason_kind_and_mix_seed():
    """reason_kind blanks row values so counts group; mix_seed is splitmix64 (the rollout seeds of earlier runs)."""
    assert reason_kind("over-long: prompt of 3012 tokens > max_prompt_length 2048") == \
        "over-long: prompt of _ tokens > max_prompt_length _"
    assert reason_kind("option 'E' is empty or not text") == reason_kind("option 'C' is empty or not text")
    assert reason_kind(TEXT_ONLY) == TEXT_ONLY
    assert mix_seed(0, 0) == 0x5692161D100B05E5  # splitmix64's output for state 1, top bit cleared
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**40, -1) < 2**63


def test_struct_options_with_different_letter_sets_survive_parquet(tmp_path):
    """datasets/Arrow stores dict options as one struct over the union of letters and fills the absent ones with None
    (datasets#6699); a 2-option row read back beside a 5-option row must still parse, with only its own letters."""
    import datasets

    from common.data import load_rows
    from data_prep import _process

    rows = [dict(GOOD, options={"A": "x", "B": "y"}),
            dict(GOOD, options={"A": "p", "B": "y", "C": "r", "D": "s", "E": "t"})]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    back = load_rows(str(tmp_path / "rows.parquet"))
    assert back[0]["options"] == {"A": "x", "B": "y", "C": None, "D": None, "E": None}  # what Arrow hands back
    assert parse_row(back[0]).options == {"A": "x", "B": "y"}
    assert list(parse_row(back[1]).options) == list("ABCDE")
    row, reason = _process(back[0], None, False, None)
    assert reason is None and json.loads(row[0]["options"]) == {"A": "x", "B": "y"}
    with pytest.raises(RowError, match="not among the options"):  # the label names a letter this row lacks
        parse_row(dict(back[0], answer_label="E", answer="t"))
