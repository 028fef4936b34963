"""Honest speed: which dtypes this CPU computes natively and its measured matmul peak (the dtype matmuls really ran in
is bench/matmuls.py's, for the side-by-side benchmarks).

    speed.check_dtype("bf16", device)      # warns when bf16 would run without hardware support on this CPU
    speed.cpu_peak("fp32")                 # {"flops_per_s": 1.8e11, "shape": [2048, 2048, 2048], ...}, cached

Why: a CPU without avx512_bf16/amx_bf16 runs bf16 matmuls through a slow fallback (measured on an AVX2 machine,
2 threads: fp32 2048^3 121 GFLOP/s, bf16 256^3 1.4 GFLOP/s, about 80x slower), and TRL's configs default to bf16
even on a CPU. A speed comparison is only meaningful between runs whose matmuls used the same dtype.
"""

import hashlib
import json
import os
import platform
import time
from typing import Callable

import torch

from common import dist
from common.model import DTYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {v: k for k, v in DTYPES.items()}  # torch dtype -> our name (the one table is common.model.DTYPES)
# /proc/cpuinfo flags that mean "this dtype's matmuls run on hardware instructions": x86 (flags line) and Arm
# (Features line). fp32 needs none.
NATIVE_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16", "bf16"}, "fp16": {"avx512_fp16", "amx_fp16", "asimdhp"}}


# -----------------------------------------------------------------------------------------------------------------
# Native dtypes on the CPU


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags: the `flags` (x86) or `Features` (Arm) line of /proc/cpuinfo. Without it (macOS,
    Windows), torch's own cpuinfo probes stand in for the x86 flags that matter here."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
              "amx_fp16": "_is_amx_fp16_supported"}
    return {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), or platform.processor() without /proc/cpuinfo."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def native_dtype(dtype: str, flags: set[str] | None = None) -> bool:
    """True when this CPU computes `dtype` ('fp32' | 'bf16' | 'fp16') matmuls in hardware. `flags` defaults to
    cpu_flags(). Flags, not a timing, decide: the answer is the same on a busy machine and costs nothing.
    torch.backends.cpu.get_cpu_capability() cannot decide it: it says 'AVX512' with and without avx512_bf16."""
    if dtype not in NATIVE_FLAGS:
        return True
    return bool(NATIVE_FLAGS[dtype] & (cpu_flags() if flags is None else flags))


def check_dtype(dtype: str, device: torch.device, flags: set[str] | None = None) -> bool:
    """Warn (rank 0) when the compute dtype has no hardware support on this CPU; True when it warned.

    We warn and keep the dtype the user asked for rather than switch to fp32 silently: the launch command stays the
    record of what ran, and a run that must match a GPU run's numerics can still choose bf16. GPUs are not checked.
    """
    if device.type != "cpu" or native_dtype(dtype, flags):
        return False
    dist.print0(f"WARNING: --dtype {dtype} on a CPU without native {dtype} ({' / '.join(sorted(NATIVE_FLAGS[dtype]))} "
                f"not in /proc/cpuinfo): every matmul takes a slow fallback, ~80x slower than fp32 on AVX2. "
                f"Pass --dtype fp32.")
    return True


def auto_dtype(flags: set[str] | None = None) -> str:
    """The CPU training dtype a benchmark should use here: bf16 where the hardware has it, else fp32."""
    return "bf16" if native_dtype("bf16", flags) else "fp32"


# -----------------------------------------------------------------------------------------------------------------
# Measured CPU peak


def probe_matmul(dtype: str, seconds: float = 3.0, sizes: tuple = (256, 512, 1024, 2048)) -> dict:
    """Best observed FLOP/s of one square (n, n) @ (n, n) matmul at `dtype` on this process's torch threads.

    Each size gets an equal share of `seconds` (at least 2 timed calls after one warm-up); the rate of a call is
    2 n^3 / its time, and the best call over all sizes is the peak (the fastest call is the least disturbed by other
    processes on a shared machine). The sweep stops before a size whose single call would exceed its share, so an
    80x-slow bf16 fallback ends at small n instead of taking minutes.
    Returns flops_per_s (FLOP/s), shape [n, n, n] of the best call, calls (timed), seconds (the whole probe)."""
    dt, best, calls, t_start = DTYPES[dtype], (0.0, None), 0, time.perf_counter()
    share = seconds / len(sizes)
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
        c = torch.empty(n, n, dtype=dt)
        torch.matmul(a, b, out=c)  # warm-up: first call picks kernels and touches memory
        t0, times = time.perf_counter(), []
        while len(times) < 2 or time.perf_counter() - t0 < share:
            t = time.perf_counter()
            torch.matmul(a, b, out=c)
            times.append(time.perf_counter() - t)
        calls += len(times)
        rate = 2 * n**3 / min(times)
        if rate > best[0]:
            best = (rate, [n, n, n])
        if i + 1 < len(sizes) and min(times) * (sizes[i + 1] / n) ** 3 > share:  # the next size's call would overrun
            break
    return {"flops_per_s": best[0], "shape": best[1], "calls": calls, "seconds": time.perf_counter() - t_start}


def busy(rec: dict) -> bool:
    """True when a probe record was measured with fewer idle cores than torch threads: its 1-minute load average
    `load1` over `cpus - threads` (other processes held the cores the matmul needed, so its peak is a lower bound)."""
    return rec["load1"] > rec["cpus"] - rec["threads"] + 0.5


def cpu_peak(dtype: str, cache_dir: str | None = None, seconds: float = 3.0,
             report: Callable[[str], None] = dist.print0) -> dict:
    """This machine's matmul peak at `dtype`, probed and cached as JSON under `cache_dir` (default
    <repo>/.cache/peak_flops), keyed by CPU model, torch thread count, dtype and torch version (kernels change between
    versions). The 1-minute load average (os.getloadavg, `load1`) and os.cpu_count() (`cpus`) at probe time are kept
    with it; a probe made on a busy machine (busy()) is measured again on every call, the higher of the two kept,
    until a probe on a quiet machine settles it. The file is written to a temporary name and renamed, so a reader
    never sees half of it. `report` gets one line with the shape, result, load and cache path. Returns the probe
    record (flops_per_s, shape, load1, cpus, ...) plus cached: bool and path."""
    key = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "dtype": dtype, "torch": torch.__version__}
    cache_dir = cache_dir or os.path.join(ROOT, ".cache", "peak_flops")
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{dtype}-{name}.json")
    rec, cached = None, os.path.exists(path)
    if cached:
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError):
            pass
    if not (isinstance(rec, dict) and {"flops_per_s", "shape", "calls", "measured_at", "load1", "cpus"} <= set(rec)):
        rec, cached = None, False  # unreadable or from another version of this code: measure again
    if rec is None or busy(rec):
        load = {"load1": os.getloadavg()[0], "cpus": os.cpu_count()}  # before the probe adds its own load
        new = {**key, **probe_matmul(dtype, seconds), **load, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if rec is None or new["flops_per_s"] >= rec["flops_per_s"] or not busy(new):
            rec = new
        else:
            rec = {**rec, **load}  # the older, busy probe was faster: keep its rate, with this busy load
        cached = False
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, path)
    n = "x".join(map(str, rec["shape"]))
    report(f"peak {rec['flops_per_s'] / 1e9:.1f} GFLOP/s {dtype} ({'cached, ' if cached else ''}measured "
           f"{rec['measured_at']}: matmul {n}, best of {rec['calls']} calls, {rec['threads']} threads, {rec['cpu']}, "
           f"torch {rec['torch']}, load {rec['load1']:.1f} on {rec['cpus']} cores"
           f"{' (busy: probed again next time)' if busy(rec) else ''}; {path})")
    return {**rec, "cached": cached, "path": path}
