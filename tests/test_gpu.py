"""GPU checks (skipped without CUDA): a bf16 SFT step and HF-engine rollouts of the tiny VL model on the device.

    pytest -q -m gpu tests/test_gpu.py"""

import os

import pytest
import torch

from conftest import run_py

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sft_bf16_on_gpu(tmp_path, tiny_vl, sample_data):
    run_py("sft.py", "--model", tiny_vl, "--data", os.path.join(sample_data, "image"), "--dtype", "bf16",
           "--global_batch", "4", "--micro_batch", "2", "--max_steps", "3", "--out", str(tmp_path / "s"))
    assert (tmp_path / "s" / "final" / "model.safetensors").exists()


def test_grpo_hf_engine_on_gpu(tmp_path, tiny_vl, sample_data):
    run_py("grpo.py", "--model", tiny_vl, "--data", os.path.join(sample_data, "image"), "--engine", "hf",
           "--dtype", "bf16", "--group_size", "4", "--train_batch", "4", "--mini_batch", "2", "--max_new_tokens", "8",
           "--max_steps", "2", "--save_every", "0", "--out", str(tmp_path / "g"))
    assert (tmp_path / "g" / "final" / "config.json").exists()


def test_mfu_benchmark_runs():
    p = run_py("bench/gpu_mfu.py", "--tokens", "2048", "--samples", "4", "--steps", "4", timeout=900)
    assert "MFU" in p.stdout
