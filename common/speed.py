"""Honest speed: which dtypes this CPU computes natively.

    speed.check_dtype("bf16", device)      # warns when bf16 would run without hardware support on this CPU

Why: a CPU without avx512_bf16/amx_bf16 runs bf16 matmuls through a slow fallback (measured on an AVX2 machine,
2 threads: fp32 2048^3 121 GFLOP/s, bf16 256^3 1.4 GFLOP/s, about 80x slower), and --dtype bf16 is the GPU default.
"""

import platform

import torch

from common import dist

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
