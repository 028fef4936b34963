"""Process-group set-up for torchrun or a plain single process, rank-0 printing and scalar all-reduces.

Without torchrun a world of one is created on a free local port, with the variables torchrun would set, so scripts
take one code path (FSDP2 and vLLM's external_launcher included).
CPU uses gloo, GPU nccl. The timeout bounds every collective: if one rank dies, the others fail with an error
instead of waiting forever.
"""

import datetime
import os
import random
import socket
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist


_OWN_ENV: dict = {}  # torchrun variables that init() set for a single process (cleanup() removes them)


class Dist(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(seed: int = 0, timeout_s: float = 1800.0, device: str = "auto") -> Dist:
    """Join (or create) the process group; pick the device; seed python/numpy/torch identically on every rank."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            kw = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(backend, timeout=timeout, **kw)
        else:  # plain `python script.py`: a world of one, set up as torchrun would (vLLM's external_launcher reads
            # these variables, so a single process runs the same in-process engine as torchrun does)
            _OWN_ENV.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port()))
            os.environ.update(_OWN_ENV)
            dist.init_process_group(backend, init_method="env://", rank=0, world_size=1, timeout=timeout)
    seed_all(seed)
    return Dist(rank, local_rank, world, dev, rank == 0)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup() -> None:
    """Destroy the process group (shut a vLLM engine down first: VLLMEngine.shutdown) and unset what init set.

    The ranks meet in a barrier first, so none tears its gloo/NCCL connections down while a peer is still in a
    collective or writing a checkpoint (one rank aborting at exit, `terminate called without an active exception`,
    was seen in CI when rank 1 left while rank 0 was still saving)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    for k, v in list(_OWN_ENV.items()):
        if os.environ.get(k) == v:
            del os.environ[k]
    _OWN_ENV.clear()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def _reduce(x: float, op) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sum(x: float) -> float:
    return _reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: float) -> float:
    return _reduce(x, dist.ReduceOp.MAX)


def all_reduce_min(x: float) -> float:
    return _reduce(x, dist.ReduceOp.MIN)


def all_reduce_many(values: list, max_: bool = False) -> list[float]:
    """Sum (max_=False) or max of each of several numbers over all ranks, in one float64 collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if max_ else dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj, group=None) -> list:
    """Every rank's python object, in rank order (small things only: metadata, counters, records); with `group`
    (a torch.distributed subgroup) only that group's ranks take part and receive its members' objects."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
