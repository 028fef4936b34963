"""Per-rank memory of a training step at full shape, without a GPU and without allocating: `--simulate_world N`.

    python grpo.py --model 7b --simulate_world 8          # the script's own step on 8 simulated ranks
    python sft.py --model 32b --simulate_world 16 --gpu_memory_gb 80

How it works. A fake process group (torch's "fake" backend, FakeStore) of N ranks stands in for torchrun; the model
is built from the preset's published architecture (common/arch.py) on the meta device and sharded by the script's
own code (fully_shard per block, mixed precision, activation checkpointing), then materialised as fake tensors
(`FakeTensorMode`: shapes, dtypes and storages, no data). The script then runs its own step (forward, backward,
AdamW; GRPO's old/reference log-probs and updates) on worst-case inputs. `MemoryTracker` (a TorchDispatchMode above
the fake mode) records the storage of every tensor an op returns, follows FSDP2's `UntypedStorage.resize_` (its
unsharded parameters), frees a storage when Python drops it, and keeps the per-rank peak of each phase with a
split by category and the largest live tensors at that moment. Rank 0's view is the view of every rank: all ranks
get the same worst-case shapes.

What is and is not counted (per rank, bytes):
- params: the fp32 shards (4 N / W), FSDP's gathered bf16 blocks while they are unsharded; grads: fp32 gradient
  shards (4 N / W) and unsharded gradients before their reduce-scatter; optimizer: AdamW's two moments (8 N / W)
  and step counters; activations: what the forward allocates and keeps (saved for backward, the logits chunks);
  other: temporaries of backward and of the optimizer step, communication buffers.
- CPU offload (`--ref_offload`, `--cpu_offload`): the offloaded shards, gradients and moments live in host memory
  and are left out (they are marked when the tracker first sees them; the gathered blocks are counted).
- Not counted: the CUDA context, NCCL buffers and the caching allocator's fragmentation (`CONTEXT_BYTES` is
  reserved for them in the verdict), CUDA kernels' workspaces, and rollouts: vLLM's memory is its budget,
  gpu_memory_utilization x the GPU's memory, while it generates; its sleep (level 2) frees it all before the update.
- Index arithmetic runs for real: an op whose inputs are all small real tensors (token ids, positions, image grids),
  and a factory whose output is a small integer or bool tensor, is executed on real data, so the data-dependent code of packing and
  of the vision tower (`.tolist()`, boolean indexing) works as on a GPU. A scalar read of a fake value (a loss, a
  grad norm) returns 1 (True for bool): values are unknown in a simulation, only memory is measured.

Measured against real runs (tests/test_simulate.py): the simulated per-phase peak is within 10 % of the peak that
torch's profiler records for the same code on real tensors (its CPU allocator's running total, an independent
measure), and each category matches the arithmetic above. Anchor for the approach: torchtitan's memory estimator
(scripts/estimate/estimation.py: FakeTensorMode, fake process group, FSDP memory tracking).
"""

import contextlib
import functools
import json
import os
import weakref

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("params", "grads", "optimizer", "activations", "other")
CONTEXT_BYTES = 2 * 2**30  # CUDA context + NCCL + allocator slack reserved in the verdict (an estimate, not measured)
REAL_INDEX_NUMEL = 1 << 22  # integer/bool outputs up to this many elements are computed for real (index arithmetic)
_SNAPSHOT_STEP = 1.005  # a new category split is taken each time the running peak grows by 0.5 %
GiB = 2**30


def _local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def _key(t) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


class MemoryTracker(TorchDispatchMode):
    """Live tensor storage per rank, peak per phase, split by category (see the module docstring).

    `phase(name)` opens a phase: its peak starts at the memory live on entry; a name used twice keeps the larger
    peak. `watch(model, opt, offload)` names a model's parameters, gradients and optimizer state (and with offload
    leaves them out of the device total). Units: bytes."""

    def __init__(self, top: int = 8):
        super().__init__()
        self.live = {}  # storage key -> [nbytes, label, (shape, dtype), weakref]
        self.total = 0
        self.host = set()  # keys of storages that live in host memory (CPU offload)
        self.watched = []  # (model, optimizer or None, offload)
        self.context = "activations"
        self.phases = {}  # name -> {"peak_bytes", "by_category", "largest"}
        self.current = None
        self.top = top
        self._orig_resize = None

    # -- bookkeeping
    def _add(self, t, label):
        t = _local(t)
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" and not isinstance(t, FakeTensor):
            return
        key = _key(t)
        if key is None or key in self.live:
            return
        st = t.untyped_storage()
        n = st.nbytes()
        self.live[key] = [n, label, (tuple(t.shape), str(t.dtype).replace("torch.", "")),
                          weakref.ref(st, functools.partial(self._freed, key))]
        self.total += n
        self._peak()

    def _freed(self, key, _ref=None):
        rec = self.live.pop(key, None)
        if rec is not None and key not in self.host:
            self.total -= rec[0]
        self.host.discard(key)

    def _resize(self, storage, nbytes):
        key = storage._cdata
        out = self._orig_resize(storage, nbytes)
        rec = self.live.get(key)
        if rec is None:
            self.live[key] = [nbytes, "params", ((nbytes,), "bytes"),
                              weakref.ref(storage, functools.partial(self._freed, key))]
            self.total += nbytes
        else:
            if key not in self.host:
                self.total += nbytes - rec[0]
            rec[0] = nbytes
        self._peak()
        return out

    def _peak(self):
        ph = self.current
        if ph is not None and self.total > ph["peak_bytes"]:
            ph["peak_bytes"] = self.total
            if self.total > ph["_snap_at"] * _SNAPSHOT_STEP:
                self._snapshot(ph)

    def _mark(self, tensors, label, host=False):
        for t in tensors:
            t = _local(t)
            key = _key(t) if isinstance(t, torch.Tensor) else None
            rec = self.live.get(key)
            if rec is None:
                continue
            rec[1] = label
            if host and key not in self.host:
                self.host.add(key)
                self.total -= rec[0]

    def _classify(self):
        """Name the storages of watched models' parameters, gradients and optimizer state."""
        from torch.distributed.fsdp import FSDPModule

        for model, opt, offload in self.watched:
            params = list(model.parameters())
            self._mark(params, "params", host=offload)
            self._mark([p.grad for p in params if p.grad is not None], "grads", host=offload)
            for m in model.modules():  # unsharded gradients waiting for their reduce-scatter
                group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None) if isinstance(m, FSDPModule) \
                    else None
                for fp in getattr(group, "fsdp_params", []) if group is not None else []:
                    up = getattr(fp, "_unsharded_param", None)
                    if up is not None and up.grad is not None:
                        self._mark([up.grad], "grads")
            if opt is not None:
                self._mark([v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)],
                           "optimizer", host=offload)

    def _snapshot(self, ph):
        self._classify()
        by = dict.fromkeys(CATEGORIES, 0)
        for key, (n, label, _, _) in self.live.items():
            if key not in self.host:
                by[label] += n
        ph["_snap_at"] = sum(by.values())
        ph["by_category"] = by
        largest = sorted(((n, label, desc) for key, (n, label, desc, _) in self.live.items()
                          if key not in self.host), key=lambda x: -x[0])[: self.top]
        ph["largest"] = [{"bytes": n, "category": label, "shape": list(desc[0]), "dtype": desc[1]}
                         for n, label, desc in largest]

    # -- public
    def watch(self, model, opt=None, offload: bool = False):
        self.watched = [w for w in self.watched if w[0] is not model] + [(model, opt, offload)]
        self._classify()

    @contextlib.contextmanager
    def phase(self, name: str, context: str = "activations"):
        prev_ctx, self.context = self.context, context
        self._classify()
        ph = {"peak_bytes": self.total, "_snap_at": 0, "by_category": {}, "largest": []}
        self.current = ph
        self._snapshot(ph)
        try:
            yield ph
        finally:
            self._classify()
            self.current, self.context = None, prev_ctx
            by = ph["by_category"]
            by["other"] += ph["peak_bytes"] - sum(by.values())  # the split is within 0.5 % of the peak
            old = self.phases.get(name)
            if old is None or ph["peak_bytes"] > old["peak_bytes"]:
                self.phases[name] = {k: v for k, v in ph.items() if not k.startswith("_")}

    def __enter__(self):
        self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, nbytes):
            return tracker._resize(storage, nbytes)

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(flat[0], FakeTensor) \
                and flat[0].constant is None:
            return True if flat[0].dtype == torch.bool else 1 if not flat[0].is_floating_point() else 1.0
        if flat and not any(isinstance(a, FakeTensor) for a in flat) \
                and all(a.numel() <= REAL_INDEX_NUMEL for a in flat):  # real index arithmetic on real inputs
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            if not flat:  # a factory: small integer/bool results (aranges, index lists) are made for real
                outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
                if outs and all(isinstance(o, FakeTensor) and not o.is_floating_point() and not o.is_complex()
                                and o.numel() <= REAL_INDEX_NUMEL for o in outs):
                    with unset_fake_temporarily():
                        out = func(*args, **kwargs)
        label = "other" if torch._C._current_graph_task_id() != -1 else self.context
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self._add(o, label)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The simulated world


class _Dist:
    def __init__(self, world):
        self.rank, self.local_rank, self.world_size, self.device, self.is_main = 0, 0, world, torch.device("cpu"), True


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks (this process is rank 0), the default device mesh made before fake mode
    (init_device_mesh fails inside it), then FakeTensorMode under a MemoryTracker. Yields (dist-like, tracker)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from common import fsdp

    if dist.is_initialized():
        raise RuntimeError("--simulate_world needs a fresh process (no torchrun, no process group)")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        fsdp.default_mesh()
        tracker = MemoryTracker()
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            yield _Dist(world), tracker
    finally:
        dist.destroy_process_group()


def real_inputs():
    """Context for building inputs (token ids, pixel values) as real tensors inside a simulation."""
    return unset_fake_temporarily()


# ---------------------------------------------------------------------------------------------------------------
# The plan: table, verdict, memory_plan.json


def plan(tracker: MemoryTracker, world: int, gpu_memory_gb: float, settings: dict, vllm_utilization: float = 0.0,
         resident_phase: str | None = None) -> dict:
    """memory_plan.json's dict: {"world_size", "gpu_memory_bytes", "fits", "phases": {name: {"peak_bytes",
    "by_category": {params, grads, optimizer, activations, other}, "largest"}}, "verdict", "settings"}.

    With vLLM (vllm_utilization > 0) a "rollout" phase is added: the trainer's memory live between steps (the
    peak of `resident_phase`'s entry is not known, so its params + optimizer split is used) plus vLLM's budget
    (utilization x GPU memory). fits = every phase's peak + CONTEXT_BYTES <= the GPU's memory."""
    gpu = int(gpu_memory_gb * GiB)
    phases = dict(tracker.phases)
    if vllm_utilization > 0:
        base = phases[resident_phase]["by_category"] if resident_phase in phases else {}
        resident = {k: (base.get(k, 0) if k in ("params", "optimizer") else 0) for k in CATEGORIES}
        vllm = int(vllm_utilization * gpu)
        resident["other"] = vllm
        phases = {"rollout (vLLM)": {"peak_bytes": sum(resident.values()), "by_category": resident,
                                     "largest": [{"bytes": vllm, "category": "other", "shape": [],
                                                  "dtype": f"vLLM budget {vllm_utilization} x GPU"}]}, **phases}
    worst = max(phases, key=lambda k: phases[k]["peak_bytes"])
    need = phases[worst]["peak_bytes"] + CONTEXT_BYTES
    fits = need <= gpu
    verdict = (f"{'fits' if fits else 'does NOT fit'}: the largest phase, {worst}, needs "
               f"{phases[worst]['peak_bytes'] / GiB:.1f} GiB + {CONTEXT_BYTES / GiB:.0f} GiB context per rank of "
               f"{gpu_memory_gb:g} GiB")
    if vllm_utilization > 0:
        verdict += (f"; vLLM holds {vllm_utilization:g} x {gpu_memory_gb:g} GiB during rollouts and its sleep "
                    f"(level 2) frees it before the update")
    return {"world_size": world, "gpu_memory_bytes": gpu, "fits": fits, "verdict": verdict, "phases": phases,
            "settings": settings}


def table(p: dict) -> str:
    """The plan as a text table (GiB per rank) with the largest live tensors of each phase's peak."""
    head = f"{'phase':<22}" + "".join(f"{c:>12}" for c in CATEGORIES) + f"{'peak':>12}"
    lines = [f"per-rank memory, world {p['world_size']}, GiB", head, "-" * len(head)]
    for name, ph in p["phases"].items():
        lines.append(f"{name:<22}" + "".join(f"{ph['by_category'].get(c, 0) / GiB:>12.2f}" for c in CATEGORIES)
                     + f"{ph['peak_bytes'] / GiB:>12.2f}")
    for name, ph in p["phases"].items():
        top = ", ".join(f"{t['dtype']}{t['shape']} {t['category']} {t['bytes'] / GiB:.2f}" for t in ph["largest"][:4])
        lines.append(f"  largest at {name} peak: {top}")
    lines.append(p["verdict"])
    return "\n".join(lines)


def write(p: dict, out: str) -> str:
    """Print the table and write `out`/memory_plan.json; returns the file's path."""
    print(table(p), flush=True)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "memory_plan.json")
    with open(path, "w") as f:
        json.dump(p, f, indent=1)
    print(f"memory plan: {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Worst-case inputs

IMAGE_GRID = (1, 72, 72)  # one training image at the recipe's bound, <= 1024 px a side (RECIPE note 10) -> 1008 px


def model_folder(name: str, folder: str) -> str:
    """A folder build_meta can read without a hub: the preset's published config (common/arch.py) written to
    `folder`, or `name` itself when it is a local folder."""
    from common import arch

    if name.lower() in arch.SIZES:
        return arch.write_folder(name, folder)
    if os.path.isdir(name):
        return name
    raise SystemExit(f"--simulate_world: {name!r} is neither a preset ({', '.join(arch.SIZES)}) nor a local folder")


def segment(model, length: int, image: bool, target_from: int | None = None, branches: tuple = ()):
    """A real-tensor forward.Segment of `length` prompt tokens (random ids), one image of IMAGE_GRID when `image`
    (its tokens inside the length), targets from `target_from` on (None: no targets), and `branches` of the given
    lengths."""
    from common import forward

    g = torch.Generator().manual_seed(length)
    cfg = getattr(model.config, "text_config", model.config)
    top = min(100000, cfg.vocab_size)  # below the image/special ids of Qwen2.5-VL, inside a small model's vocabulary
    with real_inputs():
        ids = torch.randint(min(1000, top // 2), top, (length,), generator=g)
        pix = grid = None
        if image and forward.is_vl(model):
            vc = model.config.vision_config
            t, h, w = IMAGE_GRID
            n_tok = t * h * w // vc.spatial_merge_size**2
            if n_tok + 16 > length:
                raise ValueError(f"an image of {n_tok} tokens does not fit a prompt of {length} tokens")
            ids[8 : 8 + n_tok] = model.config.image_token_id
            ids[7], ids[8 + n_tok] = model.config.vision_start_token_id, model.config.vision_end_token_id
            grid = torch.tensor([list(IMAGE_GRID)])
            pix = torch.randn(t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, generator=g)
        mask = None
        if target_from is not None:
            mask = torch.zeros(length, dtype=torch.bool)
            mask[target_from:] = True
        br = [torch.randint(min(1000, top // 2), top, (n,), generator=g) for n in branches]
    return forward.Segment(ids, pix, grid, target_mask=mask, branches=br)
