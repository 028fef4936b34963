"""The dtype matmuls really ran in, and speed ratios only between equals (the side-by-side benchmarks against TRL).

    seen, _ = matmuls.watch_matmuls(path)    # every linear matmul counted by dtype, written to `path` at exit
    matmuls.matmul_dtype(seen)               # ("bf16", "bf16 out <- fp32 weights, autocast bf16: 4410 calls")
    matmuls.same_dtype_ratio(a, b, da, db)   # a / b, or None and the reason when the two sides ran different dtypes

Why: TRL's configs default to bf16 even on a CPU, and a CPU without native bf16 runs bf16 matmuls about 80x slower
(common/speed.py): a speed comparison is only meaningful between runs whose matmuls used the same dtype.
"""

import atexit
import collections
import json
import os
from typing import Callable

import torch
import torch.nn.functional as F

from common.model import DTYPES

NAMES = {v: k for k, v in DTYPES.items()}  # torch dtype -> our name




def watch_matmuls(path: str | None = None) -> tuple[collections.Counter, Callable[[], None]]:
    """Count every linear-layer matmul in this process by (weight dtype, autocast dtype or '-', output dtype).

    torch.nn.functional.linear is wrapped, so nn.Linear modules (FSDP2 blocks show their unsharded compute-dtype
    weights), functional calls (our chunked lm_head, TRL's fp32 lm_head) and every model in the process are seen,
    with accelerate's autocast in the second field: the output dtype is the dtype the matmul really ran in, whatever
    the flags said. With `path`, the counts are written there as JSON when the process exits (a list of
    [weight, autocast, out, calls]). Returns the live counts and a function that stops counting."""
    seen, orig = collections.Counter(), F.linear

    def linear(input, weight, bias=None):
        out = orig(input, weight, bias)
        dev = out.device.type
        ac = NAMES.get(torch.get_autocast_dtype(dev), "?") if torch.is_autocast_enabled(dev) else "-"
        seen[(NAMES.get(weight.dtype, str(weight.dtype)), ac, NAMES.get(out.dtype, str(out.dtype)))] += 1
        return out

    def stop():
        F.linear = orig

    F.linear = linear
    if path:
        def dump():
            with open(path + ".tmp", "w") as f:
                json.dump([[*k, v] for k, v in seen.items()], f)
            os.replace(path + ".tmp", path)

        atexit.register(dump)
    return seen, stop


def matmul_dtype(calls: dict | list) -> tuple[str, str]:
    """(effective dtype, detail) from watch_matmuls counts (a Counter or its JSON list of [weight, autocast, out, n]).

    The effective dtype is the output dtype when every call had the same one, 'mixed' when they differ, 'none' when
    no linear matmul ran. The detail names each combination: 'bf16 out <- fp32 weights, autocast bf16: 4410 calls'."""
    rows = [(*k, v) for k, v in calls.items()] if isinstance(calls, dict) else [tuple(r) for r in calls]
    outs = {r[2] for r in rows}
    eff = outs.pop() if len(outs) == 1 else ("mixed" if outs else "none")
    detail = "; ".join(f"{o} out <- {w} weights, {'no autocast' if a == '-' else 'autocast ' + a}: {n} calls"
                       for w, a, o, n in sorted(rows, key=lambda r: -r[3]))
    return eff, detail or "no linear matmuls seen"


def same_dtype_ratio(ours: float, peer: float, ours_dtype: str, peer_dtype: str) -> tuple[float | None, str]:
    """ours / peer when both sides ran all their matmuls in one and the same dtype, else (None, the reason).

    A ratio across dtypes measures the dtype, not the trainer (bf16 on a CPU without native bf16 is ~80x slower),
    so it is refused rather than printed with a caveat."""
    if ours_dtype in ("mixed", "none") or peer_dtype in ("mixed", "none"):
        return None, f"no ratio: effective dtypes ours {ours_dtype}, peer {peer_dtype} (one side is not one dtype)"
    if ours_dtype != peer_dtype:
        return None, f"no ratio: ours ran {ours_dtype} matmuls, the peer {peer_dtype}: not the same work"
    if not (ours > 0 and peer > 0):
        return None, f"no ratio: a side measured nothing (ours {ours}, peer {peer})"
    return ours / peer, f"same dtype ({ours_dtype})"
