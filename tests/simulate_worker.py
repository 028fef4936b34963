"""One SFT step pair of sft.py's own helpers on real tensors (memory measured by torch's profiler) or fake ones
(common/simulate.py's tracker); prints one JSON line {phase: peak bytes} (+ the tracker's split when fake).

    python tests/simulate_worker.py real|fake MODEL_FOLDER WORLD MAX_LENGTH
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sft  # noqa: E402
from common import dist, fsdp  # noqa: E402
from common import simulate as sim  # noqa: E402
from common.testmodels import random_init  # noqa: E402

PER_RANK, MICRO = 2, 1  # samples per rank per step (global batch = PER_RANK x world), per micro-step


def steps(d, phase, net_folder, max_length, watch=None):
    """Two optimizer steps: the shared body of both modes."""
    net = sft.sharded_meta(net_folder, "fp32", "sdpa", False, False, False, False)
    net.to_empty(device=d.device)
    random_init(net).train()
    params, opt = sft.optimizer(net, 1e-5, 0.9, 0.95, 1e-4)
    if watch:
        watch(net, opt)
    mine = [sim.segment(net, max_length, True, target_from=max_length // 4) for _ in range(PER_RANK)]
    accum = sft.batch_plan(PER_RANK * d.world_size, MICRO, d.world_size)
    normaliser = sft.loss_units(mine, "seq-mean-token-mean") * d.world_size
    for step in range(2):
        with phase("forward_backward"):
            sft.accumulate(net, mine, accum, MICRO, True, "seq-mean-token-mean", normaliser, d.device, step)
        with phase("optimizer", "other"):
            fsdp.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return sum(p.numel() for p in net.parameters())  # N, the full model's count: a DTensor's numel is the global one


def real(folder, max_length):
    from torch.profiler import ProfilerActivity, profile, record_function

    d = dist.init(seed=0)
    import contextlib

    @contextlib.contextmanager
    def phase(name, _ctx=None):
        with record_function(f"phase:{name}"):
            yield

    trace = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"simtrace_{os.getpid()}.json")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        n = steps(d, phase, folder, max_length)
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    os.remove(trace)
    mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                 if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    peaks = {}
    for e in events:
        if str(e.get("name", "")).startswith("phase:") and e.get("ph") == "X":
            a, b = e["ts"], e["ts"] + e["dur"]
            before = [v for t, v in mem if t < a]
            inside = [v for t, v in mem if a <= t <= b] + before[-1:]
            name = e["name"][6:]
            peaks[name] = max(peaks.get(name, 0), max(inside))
    dist.cleanup()
    return {"peaks": peaks, "n_params": n}


def fake(folder, world, max_length):
    with sim.fake_world(world) as (d, tracker):
        n = steps(d, tracker.phase, folder, max_length, watch=tracker.watch)
    return {"peaks": {k: v["peak_bytes"] for k, v in tracker.phases.items()}, "n_params": n,
            "by_category": {k: v["by_category"] for k, v in tracker.phases.items()}}


if __name__ == "__main__":
    mode, folder, world, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    out = real(folder, length) if mode == "real" else fake(folder, world, length)
    print("RESULT " + json.dumps(out), flush=True)
