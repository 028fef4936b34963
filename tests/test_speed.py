"""Honest speed: the bf16-on-CPU guard, the cached peak probe, the FLOP count and MFU, the same-dtype ratio rule.

    .venv/bin/python -m pytest -q tests/test_speed.py
"""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from bench import matmuls
from common import speed
from common.log import compute_mfu
from common.model import flops_per_token
from conftest import ROOT, run_py

X86_OLD = "processor\t: 0\nmodel name\t: Some AVX2 Xeon\nflags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: spectre_v1\n"
X86_BF16 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 i8mm\nCPU part\t: 0xd40\n"


def cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


# -----------------------------------------------------------------------------------------------------------------
# bf16 on a CPU


def test_native_dtype_is_read_from_the_cpuinfo_flags(tmp_path):
    old, new, arm = (speed.cpu_flags(cpuinfo(tmp_path, t)) for t in (X86_OLD, X86_BF16, ARM_BF16))
    assert "avx2" in old and "spectre_v1" not in old  # the flags line, not the bugs line
    assert not speed.native_dtype("bf16", old) and speed.native_dtype("fp32", old)
    assert speed.native_dtype("bf16", new) and speed.native_dtype("bf16", {"amx_bf16"})
    assert speed.native_dtype("bf16", arm) and speed.native_dtype("fp16", arm) and not speed.native_dtype("fp16", new)
    assert speed.cpu_model(cpuinfo(tmp_path, X86_BF16)) == "AMD EPYC"
    assert speed.auto_dtype(old) == "fp32" and speed.auto_dtype(new) == "bf16"


def test_guard_warns_on_a_cpu_without_native_bf16_and_only_there(capsys, monkeypatch):
    cpu = torch.device("cpu")
    assert speed.check_dtype("bf16", cpu, {"avx2", "fma"}) is True
    assert "--dtype fp32" in capsys.readouterr().out
    for dtype, flags, device in [("bf16", {"avx2", "avx512_bf16"}, cpu), ("fp32", {"avx2"}, cpu),
                                 ("bf16", {"avx2"}, torch.device("cuda"))]:
        assert speed.check_dtype(dtype, device, flags) is False
        assert capsys.readouterr().out == ""
    # the default flag source is the one the scripts use: swap it and the decision follows, both ways
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"sse2", "avx2"})
    assert speed.check_dtype("bf16", cpu) is True and "WARNING" in capsys.readouterr().out
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert speed.check_dtype("bf16", cpu) is False and capsys.readouterr().out == ""


# -----------------------------------------------------------------------------------------------------------------
# The measured peak


def test_peak_probe_is_cached_with_its_shape_and_result(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine: its probe is kept
    lines = []
    first = speed.cpu_peak("fp32", cache_dir=str(tmp_path), seconds=0.2, report=lines.append)
    assert not first["cached"] and first["flops_per_s"] > 1e8
    n = first["shape"]
    assert len(n) == 3 and n[0] == n[1] == n[2] and n[0] in (256, 512, 1024, 2048)
    rec = json.load(open(first["path"]))
    assert rec["flops_per_s"] == first["flops_per_s"] and rec["shape"] == n
    assert rec["threads"] == torch.get_num_threads() and rec["dtype"] == "fp32" and rec["cpu"] == speed.cpu_model()
    assert f"matmul {n[0]}x{n[1]}x{n[2]}" in lines[0] and f"{first['flops_per_s'] / 1e9:.1f} GFLOP/s" in lines[0]
    assert os.listdir(tmp_path) == [os.path.basename(first["path"])]  # no temporary file left behind

    def no_probe(*a, **k):
        raise AssertionError("probed again although the cache holds this machine's peak")

    monkeypatch.setattr(speed, "probe_matmul", no_probe)
    second = speed.cpu_peak("fp32", cache_dir=str(tmp_path), report=lines.append)
    assert second["cached"] and second["flops_per_s"] == first["flops_per_s"] and "cached" in lines[1]
    monkeypatch.undo()
    # another dtype is another key; a torn or foreign cache file is measured again, not trusted
    other = speed.cpu_peak("bf16", cache_dir=str(tmp_path), seconds=0.2, report=lines.append)
    assert other["path"] != first["path"] and not other["cached"]
    with open(first["path"], "w") as f:
        f.write('{"flops_per_s": 1e30')
    again = speed.cpu_peak("fp32", cache_dir=str(tmp_path), seconds=0.2, report=lines.append)
    assert not again["cached"] and again["flops_per_s"] < 1e20


def test_peak_probed_on_a_busy_machine_is_probed_again(tmp_path, monkeypatch):
    """The load average (1 min) is recorded with the probe; a probe that had fewer idle cores than torch threads is
    a lower bound, so it is measured again on the next call (the higher of the two is kept) until a quiet probe."""
    threads, cpus = torch.get_num_threads(), os.cpu_count()
    rates = iter([1e9, 3e9, 2e9])
    monkeypatch.setattr(speed, "probe_matmul", lambda dtype, seconds: {"flops_per_s": next(rates), "shape": [8] * 3,
                                                                          "calls": 2, "seconds": 0.0})
    busy, quiet = cpus - threads + 1.0, 0.0
    lines = []
    monkeypatch.setattr(os, "getloadavg", lambda: (busy, busy, busy))
    first = speed.cpu_peak("fp32", cache_dir=str(tmp_path), report=lines.append)
    assert not first["cached"] and first["flops_per_s"] == 1e9 and first["load1"] == busy and first["cpus"] == cpus
    assert "busy" in lines[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (quiet, quiet, quiet))
    second = speed.cpu_peak("fp32", cache_dir=str(tmp_path), report=lines.append)
    assert not second["cached"] and second["flops_per_s"] == 3e9 and second["load1"] == quiet
    third = speed.cpu_peak("fp32", cache_dir=str(tmp_path), report=lines.append)  # quiet probe: cached from now on
    assert third["cached"] and third["flops_per_s"] == 3e9
    assert json.load(open(third["path"]))["load1"] == quiet


def test_probe_sweep_stops_before_a_size_that_would_overrun():
    r = speed.probe_matmul("fp32", seconds=1e-4, sizes=(64, 128, 4096))
    assert r["shape"] != [4096] * 3 and r["seconds"] < 5  # a 4096^3 fp32 call alone takes ~1 s on 2 cores


# -----------------------------------------------------------------------------------------------------------------
# FLOPs per token and MFU


def tiny_lm(tie: bool):
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_is_the_written_out_formula(tie):
    model = tiny_lm(tie)
    h, kv, ff, layers, vocab = 64, 32, 128, 2, 256  # kv = 2 kv-heads x head_dim 16
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ff + 2 * h  # q, k, v (biased), o, mlp, 2 norms
    n = layers * per_layer + vocab * h  # + lm_head, tied or not; the embedding lookup is not a matmul
    assert flops_per_token(model, 10) == 3 * (2 * n + 4 * layers * h * 10)  # 6 N + 12 L d S
    assert flops_per_token(model, 10, passes=1) == 2 * n + 4 * layers * h * 10


@pytest.mark.parametrize("tie", [True, False])
def test_model_flops_count_the_head_only_where_logits_are_computed(tie):
    """Logits are computed only at the positions that predict a target (common.forward.token_logprobs: SFT's
    assistant tokens, GRPO's response tokens), so the lm_head's 2 V d per token is counted for those rows only."""
    from common.model import model_flops

    model = tiny_lm(tie)
    head = 2 * 256 * 64  # 2 V d
    assert model_flops(model, 100, 10, logit_rows=100) == 100 * flops_per_token(model, 10)  # every row: as before
    assert model_flops(model, 100, 10, logit_rows=30) == 100 * flops_per_token(model, 10) - 3 * head * 70
    assert model_flops(model, 100, 10, logit_rows=0, passes=1) == 100 * (flops_per_token(model, 10, passes=1) - head)
    with pytest.raises(ValueError, match="logit_rows"):
        model_flops(model, 100, 10, logit_rows=101)


def test_mfu_arithmetic():
    # 2 ranks did 6e12 FLOPs together in 2 s on devices of 1e12 FLOP/s each: 3e12 FLOP/s of 2e12 possible
    assert compute_mfu(6e12, 2.0, 1e12, world_size=2) == pytest.approx(1.5)
    assert compute_mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert compute_mfu(1e12, 2.0, None) is None and compute_mfu(1e12, 0.0, 1e12) is None


# -----------------------------------------------------------------------------------------------------------------
# Effective dtype and the same-dtype rule


def test_effective_dtype_is_read_from_the_running_layers():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    seen, stop = matmuls.watch_matmuls()
    try:
        lin(x)
        assert matmuls.matmul_dtype(seen)[0] == "fp32"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what TRL's bf16=True does on a CPU
            lin(x)
        eff, detail = matmuls.matmul_dtype(seen)
        assert eff == "mixed" and "bf16 out <- fp32 weights, autocast bf16: 1 calls" in detail
        seen.clear()
        lin.to(torch.bfloat16)(x.bfloat16())  # what FSDP2's bf16 param_dtype does
        torch.nn.functional.linear(x.bfloat16(), lin.weight)  # a functional call, as our chunked lm_head makes
        assert matmuls.matmul_dtype(json.loads(json.dumps([[*k, v] for k, v in seen.items()]))) == (
            "bf16", "bf16 out <- bf16 weights, no autocast: 2 calls")
    finally:
        stop()
    lin(x.bfloat16())
    assert sum(seen.values()) == 2  # stopped: no longer counting
    assert matmuls.matmul_dtype({})[0] == "none"


def test_ratio_only_between_equal_dtypes():
    assert matmuls.same_dtype_ratio(200.0, 100.0, "fp32", "fp32") == (2.0, "same dtype (fp32)")
    for a, b in [("fp32", "bf16"), ("bf16", "fp32"), ("mixed", "mixed"), ("fp32", "none")]:
        ratio, why = matmuls.same_dtype_ratio(200.0, 100.0, a, b)
        assert ratio is None and why.startswith("no ratio")
    assert matmuls.same_dtype_ratio(200.0, 0.0, "fp32", "fp32")[0] is None


def test_bench_bootstrap_counts_the_matmuls_of_a_real_sft_run(tmp_path, tiny_text, sample_data):
    """sft.py run the way the bench runs it: its matmuls counted from outside, MFU printed on the CPU."""
    spec = importlib.util.spec_from_file_location("sft_vs_trl", os.path.join(ROOT, "bench", "sft_vs_trl.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = str(tmp_path / "matmuls.json")
    p = run_py("-c", bench.WATCHED, seen, "sft.py", "--model", tiny_text, "--data", f"{sample_data}/text",
               "--dtype", "fp32", "--global_batch", "2", "--micro_batch", "2", "--max_steps", "2", "--resume", "",
               "--export_every_epoch", "false", "--out", str(tmp_path / "out"))
    eff, detail = matmuls.matmul_dtype(json.load(open(seen)))
    assert eff == "fp32" and "fp32 out <- fp32 weights, no autocast" in detail, detail
    assert "peak " in p.stdout and "GFLOP/s fp32" in p.stdout and "matmul " in p.stdout
    steps = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("mfu n/a" not in s and "%" in s.split("mfu")[1] for s in steps), steps
