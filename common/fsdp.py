"""FSDP2 the torchtitan way: shard each decoder block and each vision block, then the root; fill from rank 0.

    model = model_lib.build_meta(name)          # no memory anywhere
    fsdp.shard(model, param_dtype="bf16")       # blocks, then root; our forward methods registered
    fsdp.load_from_rank0(model, name, device)   # rank 0 reads the weights, everyone receives their shard

Gradients are *summed* across ranks (divide factor 1): losses are normalised by global token counts instead, which
makes the gradient independent of the world size and of the micro-batch split.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict)
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

from common import forward
from common.model import DTYPES, load_model


def blocks(model) -> list:
    """Decoder layers and vision blocks: the units that are sharded (and checkpointed) one by one."""
    text, visual, _ = forward.parts(model)
    return list(text.layers) + (list(visual.blocks) if visual is not None else [])


_MESH: list = []  # [(default process group, its 1-D mesh)]


def default_mesh():
    """The 1-D device mesh over the default process group, made once per group (fully_shard would make a new one
    per call; a simulation must make it before entering FakeTensorMode, where init_device_mesh fails)."""
    from torch.distributed.device_mesh import init_device_mesh

    pg = dist.distributed_c10d._get_default_group()
    if not _MESH or _MESH[0][0] is not pg:
        device = "cuda" if torch.cuda.is_available() and dist.get_backend(pg) == "nccl" else "cpu"
        _MESH[:] = [(pg, init_device_mesh(device, (dist.get_world_size(pg),)))]
    return _MESH[0][1]


def shard(model, param_dtype: str = "bf16", reduce_dtype: str = "fp32", cpu_offload: bool = False,
          activation_checkpointing: bool = False, freeze_vision: bool = False):
    """Activation checkpointing, then fully_shard per block, then the root (embeddings, norm, head, patch embed)."""
    if freeze_vision and forward.is_vl(model):
        model.model.visual.requires_grad_(False)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    cpu_offload = cpu_offload and torch.cuda.is_available()  # offloading to the CPU from the CPU means nothing
    kw = dict(mesh=default_mesh(), mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    for name in forward.FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def load_from_rank0(model, name: str, device: torch.device, trust_remote_code: bool = False) -> None:
    """Materialise a meta-built, sharded model on `device`; rank 0 alone reads the checkpoint and broadcasts.

    Non-persistent buffers (rotary inverse frequencies) are not in the state dict, so they are broadcast too."""
    rank0 = dist.get_rank() == 0
    full = load_model(name, dtype="bf16" if device.type == "cuda" else "fp32", device="cpu",
                      trust_remote_code=trust_remote_code) if rank0 else None
    model.to_empty(device=device)
    buffers = {k: v for k, v in full.named_buffers()} if rank0 else None
    box = [buffers]
    dist.broadcast_object_list(box, src=0)
    own = dict(model.named_buffers())
    for k, v in box[0].items():
        own[k].copy_(v.to(device))
    sd = full.state_dict() if rank0 else {}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full, sd


def full_state_dict(model) -> dict:
    """Full (unsharded) CPU state dict on rank 0 ({} elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of the gradients of `params` (plain tensors or FSDP2 DTensor shards) to `max_norm`
    (<= 0: measure only); return the total norm as a 0-dim fp32 tensor, inf/nan when non-finite (then nothing is
    scaled: the caller skips the step). torch's get_total_norm + clip_grads_with_norm_, as torchtitan does."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):  # a partial norm on each rank: one all-reduce of a scalar gives the full one
        total = total.full_tensor()
    total = total.float()
    if max_norm > 0 and torch.isfinite(total):  # under a simulation (common/simulate.py) a fake norm reads finite
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@contextlib.contextmanager
def gathered(model):
    """Keep parameters unsharded across many forward calls (rollouts): one all-gather instead of one per step."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield
        return
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def full_params(model):
    """(name, full tensor) per parameter, gathered one at a time from the FSDP2 shards (every rank must iterate it
    in step: each DTensor gather is a collective). Names are the HF model's own, as vLLM's loaders accept them."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if isinstance(p, DTensor) else p.data)
