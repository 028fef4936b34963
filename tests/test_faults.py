"""Reliability, the CI-sized subset of bench/faults.py (same code: tests/fault_trials.py): kill -9 and resume, broken
saves, NaNs, full or unwritable disks, a dying rank, a fuzz corpus, adversarial completions, unsafe checkpoints and
folders.

    pytest -q tests/test_faults.py          (python bench/faults.py runs >= 10 kill trials per stage)"""

import os
import pickle
import random

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


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    """--keep_checkpoints: only complete step_N folders count and go, oldest first; an interrupted save (step_N.tmp,
    no COMPLETE) is neither kept in their place nor deleted, and -1 or 0 keeps everything (as verl)."""
    from common.checkpoint import prune

    for name in ("step_1000000", "step_000002", "step_000010", "step_000020", "step_000030.tmp", "step_000040"):
        os.makedirs(tmp_path / name)
        if name not in ("step_000030.tmp", "step_000040"):
            open(tmp_path / name / "COMPLETE", "w").close()
    said = []
    assert prune(str(tmp_path), -1, report=said.append) == prune(str(tmp_path), 0) == []
    assert len(os.listdir(tmp_path)) == 6
    gone = prune(str(tmp_path), 2, report=said.append)  # by step number, not by name: step 1000000 is the newest
    assert [os.path.basename(p) for p in gone] == ["step_000002", "step_000010"] and len(said) == 2
    assert sorted(os.listdir(tmp_path)) == ["step_000020", "step_000030.tmp", "step_000040", "step_1000000"]


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
