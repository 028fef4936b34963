"""Fault injection for the reliability tests: `MEDVL_CRASH=point:N` hard-kills the process at the N-th visit,
`MEDVL_NAN=point:steps` poisons a value, `MEDVL_FAULT=name` makes a call raise.

os._exit skips every finally block and flush, like kill -9, so what survives is exactly what was on disk."""

import os

_visits: dict = {}


def crash_point(name: str) -> None:
    """Hard-exit at the N-th visit of point `name` when MEDVL_CRASH=name:N (and MEDVL_CRASH_RANK, if set, is ours)."""
    spec = os.environ.get("MEDVL_CRASH", "")
    if not spec:
        return
    if os.environ.get("MEDVL_CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _visits[name] = _visits.get(name, 0) + 1
    if _visits[name] == int(n or 1):
        os._exit(137)


def poison(name: str, step: int) -> float:
    """`MEDVL_NAN=name:3,5` makes this return NaN at steps 3 and 5 (multiplied into a loss or a grad norm)."""
    spec = os.environ.get("MEDVL_NAN", "")
    point, _, steps = spec.partition(":")
    return float("nan") if point == name and str(step) in steps.split(",") else 1.0


def injected(name: str) -> bool:
    """Whether MEDVL_FAULT (comma-separated) lists `name`."""
    return name in os.environ.get("MEDVL_FAULT", "").split(",")


def fault(name: str) -> None:
    """Raise RuntimeError("injected fault: name") when MEDVL_FAULT lists `name`: a systemic failure, as a dead engine
    or a CUDA error would raise on every call."""
    if injected(name):
        raise RuntimeError(f"injected fault: {name}")
