"""The one checkpoint format: resumable DCP shards (model, optimizer, RNG, state.json) and an HF export folder.

    out/ckpt/step_000042/        DCP shards of {"model", "optim"}, rng_rank{r}.pt, state.json, COMPLETE
    out/<name>/                  HF folder: safetensors + config + processor/tokenizer + generation config + meta.json

Both are written into a temp folder and renamed when complete (common/files.py), so `latest()` never picks a
half-written one; it reports the ones it skips. The HF folder loads with transformers, vLLM, evaluate.py and grpo.py
as it is.
"""

import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from common import fsdp
from common.faults import crash_point
from common.files import atomic_dir, publish, write_json


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_bytes(model, world_size: int = 1) -> int:
    """Rough bytes one save writes: fp32 weights + two AdamW moments (sharded) + a bf16 HF export (rank 0)."""
    n = sum(p.numel() for p in model.parameters())
    return int(n * (12 / world_size + 2) * 1.05)


def param_signature(model) -> dict:
    """{name: shape} of the full parameters, to check a checkpoint belongs to this model before loading it."""
    out = {}
    for name, p in model.named_parameters():
        shape = p.shape if not hasattr(p, "full_tensor") else p.size()
        out[name] = list(shape)
    return out


def save(folder: str, step: int, model, optimizer, state: dict) -> str:
    """Write out/ckpt/step_N atomically (every rank calls this)."""
    final = os.path.join(folder, f"step_{step:06d}")
    tmp = final + ".tmp"  # one name on every rank (not files.tmp_path: that one carries the process id)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(sd, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    if dist.is_initialized():
        dist.barrier()
    crash_point("ckpt_between_files")  # shards written, state not yet: the save must be ignored on resume
    if _rank() == 0:
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        write_json(os.path.join(tmp, "state.json"), {**state, "step": step, "params": param_signature(model),
                                                      "files": files})
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        publish(tmp, final)
    if dist.is_initialized():
        dist.barrier()
    return final


def complete(folder: str, report=print) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `folder`, oldest first. Incomplete or broken ones (no rename,
    no COMPLETE marker, unreadable state.json, a file missing or of the wrong size) are reported and left out."""
    found = []
    for path in glob.glob(os.path.join(folder, "step_*")):
        name = os.path.basename(path)
        if not re.fullmatch(r"step_\d+", name):  # step_N.tmp, or a step_N.old-PID a kill left during a rename
            report(f"ignoring {path}: an interrupted save (no rename)")
            continue
        if not os.path.exists(os.path.join(path, "COMPLETE")):
            report(f"ignoring {path}: no COMPLETE marker")
            continue
        try:
            with open(os.path.join(path, "state.json")) as f:
                state = json.load(f)
            step = state["step"]
        except (OSError, ValueError, KeyError) as e:
            report(f"ignoring {path}: unreadable state.json ({type(e).__name__})")
            continue
        bad = [f for f, n in state.get("files", {}).items()
               if not os.path.exists(os.path.join(path, f)) or os.path.getsize(os.path.join(path, f)) != n]
        if bad:
            report(f"ignoring {path}: {len(bad)} file(s) missing or of the wrong size, e.g. {bad[0]}")
            continue
        found.append((step, path))
    return sorted(found)


def latest(folder: str, report=print) -> str | None:
    """Newest complete checkpoint under `folder` (see complete()); None when there is none."""
    found = complete(folder, report)
    return found[-1][1] if found else None


def prune(folder: str, keep: int, current: str, report=print) -> list[str]:
    """Keep the checkpoint just saved (`current`, a path save() returned) and the newest `keep` - 1 complete ones
    before it; delete the older complete ones and return their paths. keep < 1 deletes none (as verl).

    Call it on one rank after save() returned. Only checkpoints complete() accepts count, so a broken one never
    takes a good one's place, and none with a later step than `current` is touched (an earlier run's, in this out
    folder). Source: verl's trainer.max_actor_ckpt_to_keep (RECIPE §6.2: the 32B run keeps 2); a 32B checkpoint
    (fp32 weights + two AdamW moments, 12 bytes a parameter) is about 0.4 TB.
    """
    if keep < 1:
        return []
    found = complete(folder, report=lambda _: None)
    steps = {os.path.realpath(p): n for n, p in found}
    now = steps.get(os.path.realpath(current))
    if now is None:
        raise ValueError(f"prune: {current} is not a complete checkpoint under {folder}")
    older = [p for n, p in found if n < now]
    gone = older[: max(len(older) - (keep - 1), 0)]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
        report(f"removed {path} (keeping the newest {keep})")
    return gone


def load(path: str, model, optimizer) -> dict:
    """Load a checkpoint written by save() into a sharded model + optimizer; restore RNG; return state.json."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    want, have = state.get("params", {}), param_signature(model)
    if want and want != have:
        diff = sorted(set(want) ^ set(have))[:5] or [k for k in want if want[k] != have.get(k)][:5]
        raise ValueError(f"checkpoint {path} does not match this model (first differences: {diff})")
    check_dcp_metadata(path)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optim"])
    rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"]), rng["python_pos"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """DCP keeps its index in a pickle. Allow only the classes such an index holds, so a checkpoint folder from
    elsewhere cannot run code when it is opened."""

    SAFE_BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool",
                     "complex", "range", "object"}

    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint") or module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in self.SAFE_BUILTINS:
            return super().find_class(module, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a checkpoint index")


def check_dcp_metadata(path: str) -> None:
    """Raise ValueError if the DCP index of `path` names anything but checkpoint metadata classes."""
    meta = os.path.join(path, ".metadata")
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise ValueError(f"{path} is not a checkpoint this code wrote (its index is unsafe or broken: {e})") from None


def export_hf(model, folder: str, processor=None, tokenizer=None, meta: dict | None = None,
              dtype: torch.dtype | None = None) -> str | None:
    """Gather the full weights to rank 0 and write a plain HF folder there (every rank calls this)."""
    sd = fsdp.full_state_dict(model)
    if _rank() != 0:
        if dist.is_initialized():
            dist.barrier()
        return None
    from common.model import model_class

    with torch.device("meta"):
        cpu_model = model_class(model.config).from_config(model.config)
    cpu_model.load_state_dict({k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()}, assign=True,
                              strict=False)
    cpu_model.tie_weights()
    cpu_model.config.use_cache = True
    with atomic_dir(folder) as tmp:
        cpu_model.save_pretrained(tmp, safe_serialization=True)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        for owner in (processor, tokenizer):
            if owner is not None:
                owner.save_pretrained(tmp)
        write_json(os.path.join(tmp, "meta.json"), meta or {})
    if dist.is_initialized():
        dist.barrier()
    return folder


def save_step(out: str, step: int, model, optimizer, *, fresh: bool, state: dict, keep: int, is_main: bool,
              export: str | None = None, processor=None, tokenizer=None, meta: dict | None = None,
              dtype: str = "fp32", link_final: bool = False, report=print) -> None:
    """One save of a training run at `step`, the way sft.py and grpo.py publish: the resumable DCP checkpoint
    out/ckpt/step_NNNNNN (`state` in its state.json; skipped when not `fresh`, i.e. for the step the run resumed
    from), then only the newest `keep` checkpoints stay (< 1 = all, verl's max_actor_ckpt_to_keep); the HF export
    out/`export` (none when None; when not fresh, written again only if a kill cut it: no meta.json), in bf16 when
    the run computes in bf16, else fp32; and, when `link_final`, out/final -> the export. Collective: every rank
    calls it."""
    if fresh:
        saved = save(os.path.join(out, "ckpt"), step, model, optimizer, state)
        if is_main:
            prune(os.path.join(out, "ckpt"), keep, saved, report=report)
    if export is not None and (fresh or not os.path.exists(os.path.join(out, export, "meta.json"))):
        export_hf(model, os.path.join(out, export), processor, tokenizer, meta,
                  dtype=torch.bfloat16 if dtype == "bf16" else None)
    if export is not None and link_final and is_main:
        link = os.path.join(out, "final")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(export, link)


def model_id(path: str) -> str:
    """A fingerprint of the weights `path` names: for a local folder, sha256 over its config.json and, per weights
    file, its name, size and first and last MiB (two exports of one architecture at the same step differ there; a
    copy does not); for a hub id, the id itself. 16 hex digits."""
    if not os.path.isdir(path):
        return path
    h = hashlib.sha256()
    for name in ["config.json"] + sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt"))):
        f = os.path.join(path, name)
        if not os.path.exists(f):
            continue
        size = os.path.getsize(f)
        h.update(f"{name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def check_same_run(saved: dict, current: dict, keys: tuple, what: str) -> None:
    """Refuse to continue `what` (a checkpoint or a result folder) with flags that change results: SystemExit naming
    each of `keys` whose value in `current` differs from `saved` (the run's recorded config; a key it lacks is not
    compared). Before, a resume after --global_batch 8 -> 16 trained epoch 0 on 32 of 48 rows, and an evaluation of
    another model into the same --out reported the first model's answers."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples read back as lists)
    diff = [f"--{k} {saved[k]!r} -> {current[k]!r}" for k in keys
            if k in saved and k in current and norm(saved[k]) != norm(current[k])]
    if diff:
        raise SystemExit(f"{what} was written with other settings ({'; '.join(diff)}): use the same values, or "
                         "another --out")


def saved_config(path: str) -> dict:
    """The user_config a resumable checkpoint was saved with ({} for checkpoints that predate it)."""
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f).get("user_config", {})
