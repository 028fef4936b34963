"""Reliability, the CI-sized subset of bench/faults.py (same code: tests/fault_trials.py): kill -9 and resume, broken
saves, NaNs, full or unwritable disks, a dying rank, a fuzz corpus, adversarial completions, unsafe checkpoints and
folders.

    pytest -q tests/test_faults.py          (python bench/faults.py runs >= 10 kill trials per stage)"""

import json
import os
import pickle
import random
import shutil

import pytest

import fault_trials as faults
from conftest import ROOT


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("faults"))
    return faults.fixtures(work), work


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo", "evaluate"])
def test_kill_at_random_moments_then_resume_is_exact(fx, stage):
    f, work = fx
    ref_time, ref = faults.reference_run(stage, f, work)
    seed = random.Random().randrange(10**6)
    for k in range(2):
        r = faults.kill_trial(stage, f, work, ref_time, seed + k, ref)
        assert r["exact"] and r["page_after_kill"], (stage, r, seed + k)


def test_broken_checkpoints_are_skipped_and_reported(fx):
    f, work = fx
    for r in faults.broken_save_trials(f, work):
        assert r["recovered"], r


def test_nan_steps_are_skipped_then_stop(fx):
    f, work = fx
    for r in faults.nan_trials(f, work):
        assert r["ok"], r


def test_unwritable_or_full_output_fails_before_work(fx):
    f, work = fx
    for r in faults.disk_trials(f, work):
        assert r["ok"], r


def test_a_dying_rank_does_not_hang_the_other(fx):
    f, work = fx
    r = faults.rank_death_trial(f, work)
    assert r["ok"] and r["seconds"] < 120, r


def test_fuzz_corpus_rows_rejected_with_reasons_valid_rows_kept(fx):
    f, work = fx
    r = faults.fuzz_trials(f, work)
    assert r["bad_rows"] >= 50
    assert r["prep_rejected_with_reason"] == r["bad_rows"] and r["prep_kept"] == r["good_rows"]
    assert r["prep_ok"] and r["eval_ok"] and r["files_ok"] and r["no_tmp_left"], r


def test_adversarial_rewards_are_zero_and_fast():
    r = faults.reward_trials()
    assert r["zero"] == r["adversarial"] and r["max_ms_1mb"] < 2000, r


def test_prune_keeps_the_new_checkpoint_and_the_newest_good_ones_before_it(tmp_path):
    """--keep_checkpoints N keeps the checkpoint just saved and the N - 1 newest complete ones before it, ordered by
    step (step 1000000 after 999999, not by name). Broken ones (an interrupted save, no COMPLETE, no state.json, a
    truncated shard) neither count nor go, and one from a later step (an earlier run's) is never touched; < 1 keeps
    all. Found by a fresh-clone trial: counting by name let a broken or stale newer folder delete the new one."""
    from common.checkpoint import latest, prune

    def ckpt(step, broken=None):
        path = tmp_path / f"step_{step:06d}"
        os.makedirs(path)
        (path / "shard").write_bytes(b"abc")
        if broken != "no state":
            (path / "state.json").write_text(json.dumps({"step": step, "files": {"shard": 3}}))
        if broken != "no COMPLETE":
            (path / "COMPLETE").write_text("")
        if broken == "truncated":
            (path / "shard").write_bytes(b"a")
        return str(path)

    for n in (2, 4, 999999):
        ckpt(n)
    ckpt(6, "no state"), ckpt(7, "truncated"), ckpt(8, "no COMPLETE"), os.makedirs(tmp_path / "step_000009.tmp")
    new = ckpt(1000000)
    assert prune(str(tmp_path), -1, new) == prune(str(tmp_path), 0, new) == []
    said = []
    gone = prune(str(tmp_path), 2, new, report=said.append)
    assert [os.path.basename(p) for p in gone] == ["step_000002", "step_000004"] and len(said) == 2
    assert latest(str(tmp_path)) == new and os.path.exists(tmp_path / "step_999999")
    # a run restarted in the same folder saves step 5: the later steps are not its to judge
    shutil.rmtree(tmp_path / "step_999999")
    five = ckpt(5)
    assert prune(str(tmp_path), 1, five) == [] and sorted(os.listdir(tmp_path)) == [
        "step_000005", "step_000006", "step_000007", "step_000008", "step_000009.tmp", "step_1000000"]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        prune(str(tmp_path), 1, str(tmp_path / "step_000007"))


def test_unsafe_checkpoint_index_is_refused(tmp_path):
    from common import checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / ".metadata", "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(ValueError, match="refusing"):
        checkpoint.check_dcp_metadata(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_foreign_model_folders_are_validated(tmp_path, tiny_vl, tiny_text):
    import shutil

    from common.model import load_model

    # pickled weights only: refused
    bad = tmp_path / "bin_only"
    shutil.copytree(tiny_text, bad)
    os.remove(bad / "model.safetensors")
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no .safetensors"):
        load_model(str(bad), dtype="fp32")
    # weights of another architecture under this config: refused instead of silently random-initialised
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_vl, mixed)
    shutil.copy(os.path.join(tiny_text, "model.safetensors"), mixed / "model.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        load_model(str(mixed), dtype="fp32")


def test_no_remote_code_and_no_eval_of_model_output():
    # every from_pretrained goes through common/model.py with trust_remote_code defaulting to False,
    # and no script evaluates text (model output, data) as code
    import re

    for name in ["data_prep.py", "sft.py", "grpo.py", "evaluate.py"] + \
            [os.path.join("common", f) for f in os.listdir(os.path.join(ROOT, "common"))]:
        if not name.endswith(".py"):
            continue
        src = open(os.path.join(ROOT, name)).read()
        assert not re.search(r"(?<![.\w])(eval|exec)\(", src), name  # .eval() on a module is fine
        assert "trust_remote_code=True" not in src, name
        assert not re.search(r"torch\.load\((?![^)]*weights_only=True)", src), name
