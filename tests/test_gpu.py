"""GPU checks (skipped without CUDA) on a Qwen2.5-VL-3B-shaped model (common/arch.py), random weights, bf16, our
FSDP2 loop (sft.py's and grpo.py's own step functions), world of 1. Nothing from a hub, no data_prep fixture;
runs on torch 2.11 / transformers 5.17 (bench/gpu_check.sh installs the rest).

    pytest -q -s -m gpu tests/test_gpu.py"""

import json
import math
import re

import pytest
import torch

from conftest import run_py

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LENGTH = 2048


def _model(tmp_path, ckpt=False):
    import sft
    from common import arch, dist

    d = dist.init(seed=0)
    folder = arch.write_folder("3b", str(tmp_path / "cfg"))
    net = sft.sharded_meta(folder, "bf16", "auto", False, ckpt, False, False)
    from common.testmodels import random_init

    net.to_empty(device=d.device)
    return d, folder, random_init(net).train()


def test_sft_loss_falls_and_memory_vs_simulation(tmp_path):
    import sft
    from common import dist, fsdp
    from common import simulate as sim

    d, folder, net = _model(tmp_path)
    params, opt = sft.optimizer(net, 1e-4, 0.9, 0.95, 1e-4)
    mine = [sim.segment(net, LENGTH, True, target_from=LENGTH // 4)]
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for step in range(5):
        losses.append(sft.accumulate(net, mine, 1, 1, True, "seq-mean-token-mean", 1, d.device, step))
        fsdp.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    real = torch.cuda.max_memory_allocated()
    dist.cleanup()
    print("sft losses", losses)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1
    run_py("sft.py", "--model", folder, "--simulate_world", "1", "--max_length", str(LENGTH), "--global_batch", "1",
           "--data", "image", "--activation_checkpointing", "false", "--out", str(tmp_path / "plan"), timeout=900)
    plan = json.load(open(tmp_path / "plan" / "memory_plan.json"))
    predicted = max(ph["peak_bytes"] for ph in plan["phases"].values())
    print(f"max_memory_allocated {real / 2**30:.2f} GiB / simulated peak {predicted / 2**30:.2f} GiB "
          f"= {real / predicted:.3f}")
    assert 0.5 < real / predicted < 1.5


def test_grpo_update_loss_falls(tmp_path):
    import grpo
    from common import dist
    from common import simulate as sim
    from common.generate import Prompt, Sample

    d, folder, net = _model(tmp_path, ckpt=True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    G, eps = 4, []
    for g in range(2):
        ep = grpo.Episode(None, Prompt("", [], sim.segment(net, 512, g == 0)))
        ep.samples = [Sample([1000 + 37 * j + k for k in range(256)], "", "length") for j in range(G)]
        ep.advantages, ep.loss_mask = [1.0, -1.0, 1.0, -1.0], [True] * G
        eps.append(ep)
    old = grpo.episode_logprobs(net, eps, d.device, 1, True, 1.0)
    algo = grpo.loss_config(dict(clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=0.0, kl_type="k3",
                                 loss_agg="token-mean", entropy_coef=0.0, max_new_tokens=256,
                                 importance_sampling_level="token", rollout_correction="none",
                                 rollout_correction_cap=2.0))
    layout = grpo.Layout(G, updates=1, local_prompts=2, local_mb=2, micro_groups=1)
    losses = []
    for step in range(4):
        stats, norms, ok = grpo.update(net, opt, params, eps, old=old, refs=None, layout=layout, share_prefix=True,
                                       temperature=1.0, algo=algo, grad_clip=1.0, step=step, device=d.device)
        losses.append(sum(s[2] for s in stats))
    dist.cleanup()
    print("grpo update losses", losses)
    assert ok and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_mfu_benchmark_in_plausible_range():
    p = run_py("bench/gpu_mfu.py", "--tokens", "8192", "--samples", "8", "--steps", "6", timeout=600)
    print(p.stdout)
    assert "MFU = tokens/s x flops_per_token" in p.stdout
    mfu = float(re.search(r"MFU ([\d.]+) %", p.stdout).group(1))
    assert 5 < mfu < 80, mfu
