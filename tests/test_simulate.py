"""The memory simulation (common/simulate.py) against real runs and arithmetic, and at full shape.

    pytest -q tests/test_simulate.py            # SmolLM2-135M real vs fake, arithmetic on 4 fake ranks
    pytest -q -m slow tests/test_simulate.py    # + a full-shape Qwen2.5-VL-7B GRPO step on 8 simulated ranks
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_py


def _worker(*args):
    p = run_py("tests/simulate_worker.py", *map(str, args), timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


@pytest.mark.parametrize("fixture,length", [("smollm2", 256), ("tiny_vl", 1400)])
def test_simulated_peak_within_10pct_of_real(request, fixture, length):
    """The same two SFT steps (sft.py's helpers) on real tensors, measured by torch's profiler (its CPU allocator's
    running total: an independent measure), and on fake ones, measured by the tracker: each phase's peak within 10 %."""
    folder = request.getfixturevalue(fixture)
    real = _worker("real", folder, 1, length)["peaks"]
    fake = _worker("fake", folder, 1, length)["peaks"]
    assert set(real) == set(fake) == {"forward_backward", "optimizer"}
    for phase in real:
        err = fake[phase] / real[phase] - 1
        print(f"{fixture} {phase}: real {real[phase] / 2**20:.1f} MiB, simulated {fake[phase] / 2**20:.1f} MiB, "
              f"error {100 * err:+.1f} %")
        assert abs(err) <= 0.10, (phase, real[phase], fake[phase])


def test_categories_match_arithmetic(smollm2):
    """On 4 fake ranks, at the optimizer phase: fp32 param shards 4 N / W, grads 4 N / W, AdamW moments 8 N / W
    (FSDP pads each shard's first dimension to a multiple of W: within 2 %); in backward, no unsharded gradient."""
    W = 4
    r = _worker("fake", smollm2, W, 128)
    n, by = r["n_params"], r["by_category"]["optimizer"]
    for cat, per in (("params", 4), ("grads", 4), ("optimizer", 8)):
        want = per * n / W
        assert abs(by[cat] / want - 1) < 0.02, (cat, by[cat], want)
    fb = r["by_category"]["forward_backward"]
    assert fb["activations"] > 0 and fb["optimizer"] == by["optimizer"]  # the second step holds AdamW's state
    # gradients stay sharded between micro-steps (2 here): skipping the reduce-scatter until the last one held the
    # whole model's unsharded fp32 gradient, 4 N bytes = 4.0x the shard (measured), on every rank
    assert fb["grads"] < 1.5 * 4 * n / W, fb["grads"] / (4 * n / W)


def test_gpu_check_wheels_install_into_clean_target(tmp_path):
    """bench/gpu_check.sh --prepare's wheels (skipped when it has not been run) install with --no-index into an
    empty --target for Python 3.12, and the pure-Python ones import from there (this machine has Python 3.11)."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "gpu", "*.whl")))
    if not wheels:
        pytest.skip("run `bash bench/gpu_check.sh --prepare` first")
    assert sum(os.path.getsize(w) for w in wheels) < 60 * 2**20
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--target", str(target), *wheels], check=True)
    for pkg in ("fire", "datasets", "dill", "multiprocess", "xxhash", "aiohttp", "termcolor"):
        assert glob.glob(str(target / pkg)) or glob.glob(str(target / f"{pkg}*")), pkg
    code = "import sys; sys.path.insert(0, sys.argv[1]); import fire, termcolor, dill; print(fire.__file__)"
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True).stdout
    assert str(target) in out


@pytest.mark.slow
def test_grpo_7b_full_shape_on_8_ranks(tmp_path):
    """`SIMULATE=1 bash run/grpo_7b.sh`: the recipe's 7B GRPO step at full shape (2048-token prompts, 8 x 4096-token
    responses per group, the launcher's flags) on 8 fake ranks writes a plan whose categories add up, whose fp32
    shards are 4 N / 8, and that fits 80 GB (it did not before micro-batch 8 and per-micro-step gradient sync)."""
    subprocess.run(["bash", "run/grpo_7b.sh", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=1200,
                   env={**os.environ, "SIMULATE": "1", "PYTHON": sys.executable})
    p = json.load(open(tmp_path / "memory_plan.json"))
    assert p["world_size"] == 8 and p["gpu_memory_bytes"] == 80 * 2**30 and p["fits"] is True, p["verdict"]
    assert {"rollout (vLLM)", "old_logprob", "ref_logprob", "update"} <= set(p["phases"])
    for ph in p["phases"].values():
        assert sum(ph["by_category"].values()) == ph["peak_bytes"]
    import torch
    from transformers import AutoModelForImageTextToText

    from common import arch

    with torch.device("meta"):
        n = sum(q.numel() for q in AutoModelForImageTextToText.from_config(arch.config("7b")).parameters())
    assert 8.2e9 < n < 8.4e9  # Qwen2.5-VL-7B-Instruct: 8.29 B
    upd = p["phases"]["update"]["by_category"]
    assert abs(upd["optimizer"] / (8 * n / 8) - 1) < 0.02
