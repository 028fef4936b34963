"""Run logging: one metric line per step, a JSONL file, optional wandb, PNG curves, MFU against peak FLOPs.

Step FLOPs: common/model.py model_flops (lm_head only at the logit rows); the CPU peak: common/speed.py cpu_peak."""

import json
import os
import subprocess
import time

import torch

from common import dist, speed
from common.files import atomic_file, read_jsonl, repair_tail

# Dense bf16 peak FLOP/s per GPU (vendor datasheets); MFU is reported only where the peak is known.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "A10G": 125e12, "L4": 121e12, "B200": 2250e12}


def peak_flops(device: torch.device, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of one device at the compute dtype. GPU: the datasheet's dense bf16 figure (fp16 is the same on
    these parts; None for fp32 and unlisted GPUs). CPU: measured by a short matmul probe at `dtype`, once per machine
    (common/speed.py, cached under .cache/peak_flops; the probe's shape and result are printed). Every rank must call
    it: rank 0 probes while the others wait, so the probe does not compete with itself."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None) if dtype in ("bf16", "fp16") else None
    if device.type != "cpu":
        return None
    if not dist.is_main():
        dist.barrier()  # rank 0 writes the cache first; the others then read it
    rec = speed.cpu_peak(dtype)
    if dist.is_main():
        dist.barrier()
    return rec["flops_per_s"]


def compute_mfu(flops: float, seconds: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: `flops` done by all ranks in `seconds` of wall time over `world_size` devices of
    `peak` FLOP/s each (a fraction, 0.42 = 42 %); None when the peak is unknown or no time passed."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * world_size)


def git_sha() -> str:
    """The checkout's commit, short, with '-dirty' when tracked files differ from it (a run's results then came from
    code no commit holds); 'unknown' outside a git checkout."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class DummyWandb:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


class Logger:
    """Rank-0 metrics: stdout line, out/metrics.jsonl (appended, so a resumed run continues it), wandb if asked."""

    def __init__(self, out: str, config: dict, is_main: bool, use_wandb: bool = False, project: str = "medvlthinker"):
        self.is_main, self.path = is_main, os.path.join(out, "metrics.jsonl")
        self.wandb = DummyWandb()
        if is_main:
            os.makedirs(out, exist_ok=True)
            repair_tail(self.path)
            if use_wandb:
                try:
                    import wandb

                    self.wandb = wandb.init(project=project, config=config, dir=out)
                except ImportError:
                    print("wandb is not installed; logging to metrics.jsonl only", flush=True)

    def log(self, step: int, metrics: dict, line: str | None = None) -> None:
        if not self.is_main:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}, default=float) + "\n")
        self.wandb.log(metrics, step=step)

    def read(self) -> list:
        if not os.path.exists(self.path):
            return []
        rows = {}
        for r in read_jsonl(self.path)[0]:  # a torn last line was cut at start (repair_tail); others are skipped
            # one row per step, its lines merged (a step's training metrics and its validation are two lines); a
            # resumed run rewrites the steps after its checkpoint: the later values win
            rows.setdefault(r["step"], {}).update(r)
        return [rows[k] for k in sorted(rows)]

    def finish(self):
        self.wandb.finish()


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def plot_curves(rows: list, keys: list, path: str, title: str = "") -> None:
    """One panel per entry of `keys` against step, written atomically. An entry is a metric key, or (title, [keys])
    for one panel with a line per key (legend: the part after the last '/'); keys no row holds are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, [k]) if isinstance(k, str) else (k[0], list(k[1])) for k in keys]
    panels = [(name, [k for k in ks if any(k in r for r in rows)]) for name, ks in panels]
    panels = [(name, ks) for name, ks in panels if ks]
    if not panels:
        return
    cols = min(5, len(panels))  # rows of at most 5 panels: a page shows them at a readable size
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, ks) in zip(axes.flat, panels):
        for k in ks:
            pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None,
                    label=k.rsplit("/", 1)[-1] if len(ks) > 1 else None)
        if len(ks) > 1:
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
