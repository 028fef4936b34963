"""sft.py: schedule, batch plan, loss mask, exact gradients across splits/ranks, resume, export, learning.

    pytest -q tests/test_sft.py"""

import inspect
import json
import math
import os
import random

import pytest
import torch

import sft
from common.data import load_rows, parse_row
from common.model import load_processor
from conftest import run_py, torchrun


def test_lr_schedule_matches_hf_cosine_with_warmup():
    total, warm = 100, 0.05
    assert sft.lr_at(0, total, warm) == 0.0  # the first update of a warmed-up run uses lr 0 (HF semantics)
    assert sft.lr_at(2, total, warm) == pytest.approx(2 / 5)
    assert sft.lr_at(5, total, warm) == pytest.approx(1.0)
    assert sft.lr_at(52, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert sft.lr_at(99, total, 0.0, "constant") == 1.0


def test_batch_plan():
    assert sft.batch_plan(16, 1, 8) == 2 and sft.batch_plan(16, 2, 1) == 8
    for args in [(16, 3, 1), (16, 4, 8), (4, 1, 8)]:
        with pytest.raises(ValueError, match="micro-steps"):
            sft.batch_plan(*args)


def test_step_indices_cover_each_epoch_once():
    seen = []
    for step in range(5):
        for r in range(2):
            seen += sft.step_indices(23, step, 5, 4, seed=1, rank=r, world=2)
    assert len(seen) == 20 and len(set(seen)) == 20  # remainder of 3 dropped, no repeats within an epoch


@pytest.mark.parametrize("fixture,data", [("tiny_vl", "image"), ("smollm2", "text")])
def test_loss_mask_is_exactly_the_assistant_turn(request, sample_data, fixture, data):
    path = request.getfixturevalue(fixture)
    proc, tok = load_processor(path)
    for row in list(load_rows(os.path.join(sample_data, data)))[:3]:
        item = parse_row(row)
        seg = sft.encode_sft(proc, tok, item)
        target = f"<think> {item.reasoning.strip()} </think>\n<answer> {item.answer_label} </answer>"
        assert tok.decode(seg.ids[seg.target_mask]) == target + "<|im_end|>\n"
        assert tok.decode(seg.ids[~seg.target_mask]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fixture", ["tiny_vl", "smollm2"])
def test_upfront_length_is_the_encoded_length(request, sample_data, fixture):
    """sft.py skips over-long rows before training from a count that decodes no image and runs no processor; it must
    equal the length of the conversation the loop encodes (else a row just over max_length stops the run mid-way)."""
    proc, tok = load_processor(request.getfixturevalue(fixture))
    text = list(load_rows(os.path.join(sample_data, "text")))
    assert text[0]["prompt_tokens"] == -1  # not counted by data_prep: the count comes from the text and template
    for row in text[:8]:
        item = parse_row(row)
        want = len(sft.encode_sft(proc, tok, item).ids)
        assert sft.conversation_tokens(proc, tok, item, row["prompt_tokens"]) == want
    if proc is not None:  # image rows: data_prep's prompt count (image tokens included, tested there) + the rest
        for row in list(load_rows(os.path.join(sample_data, "image")))[:3]:
            item = parse_row(row)
            seg = sft.encode_sft(proc, tok, item)
            assert sft.conversation_tokens(proc, tok, item, int((~seg.target_mask).sum())) == len(seg.ids)


def _grads(tmp_path, tiny_vl, sample_data, nproc, micro, rows, loss_agg):
    out = tmp_path / f"g{nproc}{micro}{rows}{loss_agg}.pt"
    torchrun("tests/fsdp_worker.py", "sft_grad", tiny_vl, os.path.join(sample_data, "image"), str(micro), rows,
             str(out), loss_agg, nproc=nproc, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_gradient_is_identical_across_splits_ranks_and_packing(tmp_path, tiny_vl, sample_data, loss_agg):
    ref = _grads(tmp_path, tiny_vl, sample_data, 1, 4, "padded", loss_agg)
    for nproc, micro, rows in [(1, 1, "packed"), (1, 2, "packed"), (2, 1, "packed"), (2, 2, "padded")]:
        got = _grads(tmp_path, tiny_vl, sample_data, nproc, micro, rows, loss_agg)
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=f"{k} ({nproc}, {micro}, {rows})")
    assert any(float(g.abs().sum()) > 0 for k, g in ref.items() if "visual" in k)


def test_default_loss_is_upstreams_mean_of_per_sample_token_means(tmp_path, tiny_vl, sample_data):
    """sft.py's default gradient (2 ranks, 1 sample per micro-batch, packed) equals the gradient of the reference
    formula computed plainly with transformers' own forward, one sample at a time: mean over the 4 samples of the
    mean over that sample's target tokens of -log p (TRL 0.15, per-device batch 1 + grad accumulation, RECIPE §5.1)."""
    from common.model import load_model

    assert inspect.signature(sft.main).parameters["loss_agg"].default == "seq-mean-token-mean"
    ours = _grads(tmp_path, tiny_vl, sample_data, 2, 1, "packed", "seq-mean-token-mean")
    model = load_model(tiny_vl, dtype="fp32")
    proc, tok = load_processor(tiny_vl)
    rows = load_rows(os.path.join(sample_data, "image"))
    samples = [sft.encode_sft(proc, tok, parse_row(rows[i])) for i in range(4)]
    per_sample = []
    for s in samples:
        # the modality map the processor returns in transformers 5 (without it mRoPE positions come out as text)
        mm = (s.ids == model.config.image_token_id).int()[None]
        logits = model(input_ids=s.ids[None], pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                       mm_token_type_ids=mm).logits[0]
        nll = -torch.log_softmax(logits[:-1].float(), -1).gather(1, s.ids[1:, None])[:, 0]
        per_sample.append(nll[s.target_mask[1:]].mean())
    assert len({int(s.target_mask.sum()) for s in samples}) > 1  # lengths differ, so the two losses differ
    torch.stack(per_sample).mean().backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
    # ... and the old global token-mean is a different gradient on this batch
    other = _grads(tmp_path, tiny_vl, sample_data, 1, 4, "padded", "token-mean")
    assert max(float((other[k] - ref[k]).abs().max()) for k in ref) > 1e-3


def test_export_reloads_with_identical_logits(tmp_path, tiny_vl, sample_data):
    p = torchrun("tests/fsdp_worker.py", "export", tiny_vl, os.path.join(sample_data, "image"), str(tmp_path / "hf"),
                 timeout=300)
    diff = float(p.stdout.split("max abs diff ")[1].split()[0])
    assert diff < 1e-5, p.stdout[-2000:]
    meta = json.load(open(tmp_path / "hf" / "meta.json"))
    assert meta["stage"] == "test" and (tmp_path / "hf" / "model.safetensors").exists()


ARGS = ["--data", "", "--dtype", "fp32", "--global_batch", "4", "--micro_batch", "2", "--epochs", "2", "--lr", "1e-3",
        "--warmup_ratio", "0", "--save_every", "3"]


def _args(model, data, out):
    a = list(ARGS)
    a[1] = data
    return ["sft.py", "--model", model, *a, "--out", str(out)]


def _losses(out):
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        rows[r["step"]] = r
    return [rows[k]["loss"] for k in sorted(rows)]


def test_kill_and_resume_reproduces_the_run_exactly(tmp_path, tiny_vl, sample_data):
    data = os.path.join(sample_data, "image")
    run_py(*_args(tiny_vl, data, tmp_path / "a"))
    kill_at = random.Random().randint(2, 15)  # any step of the 16
    p = run_py(*_args(tiny_vl, data, tmp_path / "b"), env={"MEDVL_CRASH": f"sft_step:{kill_at}"}, check=False)
    assert p.returncode == 137
    p = run_py(*_args(tiny_vl, data, tmp_path / "b"))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b"), kill_at
    a = (tmp_path / "a" / "final" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "final" / "model.safetensors").read_bytes()


def test_resume_refuses_changed_result_flags(tmp_path, tiny_text, sample_data):
    """Issue 20 §6: a run continued with another --global_batch used to resume silently (epoch 0 then trained on 32
    of 48 rows). --resume auto now stops naming the flag; --micro_batch may change (the loss is exact under any split)."""
    data = os.path.join(sample_data, "text")
    args = ["sft.py", "--model", tiny_text, "--data", data, "--dtype", "fp32", "--global_batch", "4", "--micro_batch",
            "2", "--save_every", "1", "--export_every_epoch", "false", "--out", str(tmp_path / "r")]
    run_py(*args, "--max_steps", "1")
    p = run_py(*args, "--max_steps", "2", "--global_batch", "8", check=False)
    assert p.returncode != 0 and "--global_batch 4 -> 8" in p.stdout, p.stdout[-1500:]
    p = run_py(*args, "--max_steps", "2", "--micro_batch", "1")
    assert "resumed from" in p.stdout


def test_two_ranks_match_one(tmp_path, tiny_vl, sample_data):
    data = os.path.join(sample_data, "image")
    run_py(*_args(tiny_vl, data, tmp_path / "one"), "--max_steps", "3")
    torchrun(*_args(tiny_vl, data, tmp_path / "two"), "--max_steps", "3", "--micro_batch", "1", timeout=300)
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_tiny_model_overfits(tmp_path, tiny_vl, sample_data):
    run_py("sft.py", "--model", tiny_vl, "--data", os.path.join(sample_data, "image"), "--dtype", "fp32",
           "--global_batch", "4", "--epochs", "40", "--max_steps", "60", "--lr", "3e-3", "--schedule", "constant",
           "--warmup_ratio", "0", "--out", str(tmp_path / "o"), "--export_every_epoch", "false", "--log_every", "20")
    losses = _losses(tmp_path / "o")
    assert losses[0] > 5.0 and min(losses[-5:]) < 0.5 * losses[0]


def test_non_finite_steps_are_skipped_then_stop(tmp_path, tiny_vl, sample_data):
    base = _args(tiny_vl, os.path.join(sample_data, "image"), tmp_path / "n")
    p = run_py(*base, "--max_steps", "4", env={"MEDVL_NAN": "sft_loss:1"})
    assert "step 1: non-finite loss" in p.stdout and "update skipped" in p.stdout
    rows = [json.loads(x) for x in open(tmp_path / "n" / "metrics.jsonl")]
    assert [r.get("skipped", 0) for r in rows] == [0, 1, 0, 0]
    p = run_py(*_args(tiny_vl, os.path.join(sample_data, "image"), tmp_path / "m"), "--max_steps", "6",
               "--max_bad_steps", "2", env={"MEDVL_NAN": "sft_grad:2,3"}, check=False)
    assert p.returncode != 0 and "2 non-finite steps in a row" in p.stdout


# SmolLM2-135M SFT lowering its loss on the bundled traces is asserted in tests/test_grpo.py, where the same run
# is the warm start of the SFT+RL learning test (one run instead of two on a 2-core CI).
