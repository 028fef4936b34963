"""Supervised fine-tuning on reasoning traces (RECIPE §5), a hand-written FSDP2 loop.

The target is the recipe's assistant turn `<think> {reasoning} </think>\\n<answer> {label} </answer>` and the loss
falls on the assistant tokens only (that text plus `<|im_end|>\\n`). Every optimizer step sees exactly
`global_batch` samples (recipe: 16) and each rank packs its micro-batches into padding-free rows. The loss is
upstream's: the mean over the global batch's samples of each sample's own token-mean NLL (`--loss_agg
seq-mean-token-mean`; TRL with per-device batch 1 and gradient accumulation, RECIPE §5.1); `--loss_agg token-mean`
gives one token-mean over the global batch instead. Either divisor is counted over the *global* batch, so the
gradient does not depend on the micro-batch split or the number of ranks. Recipe defaults: lr 1e-5 cosine with 5 %
warmup, AdamW (0.9, 0.95), weight decay 1e-4 (not on biases/norms, as HF Trainer), bf16, 5 epochs, a save per
epoch (released = epoch 3).

    python sft.py --model <folder> --data data/sample/text --epochs 1            # one process, CPU or GPU
    torchrun --nproc_per_node 8 sft.py --model 7b --data text                    # the recipe's SFT(m23k)
    torchrun --nproc_per_node 8 sft.py --model 7b --data image                   # SFT(PMC)
    bash run/sft_7b.sh                                                           # the same, with every flag visible

Checkpoints: out/ckpt/step_N (resumable with --resume auto) and HF folders out/epoch_E (+ out/final -> the last)
that transformers, vLLM, evaluate.py and grpo.py load directly.
"""

import math
import os
import random
import time
from typing import Literal

import torch
from tqdm import tqdm

from common import checkpoint, cli, dist, forward, fsdp, prompts, speed
from common.data import RowError, admit_row, data_root, load_rows, mix_seed, reason_kind
from common.faults import crash_point, poison
from common.files import check_output, write_json
from common.log import Logger, compute_mfu, fmt, git_sha, peak_flops, plot_curves
from common.model import Attn, Dtype, build_meta, control_strings, load_processor, model_flops, resolve

DATASETS = {"text": ["UCSC-VLAA/MedVLThinker-m23k-tokenized"],
            "image": ["UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized"]}
DATASETS["mixed"] = DATASETS["text"] + DATASETS["image"]
# Flags a run continued by --resume auto must keep (they change its data order, schedule or loss); micro_batch may
# change (the loss is exact under any split: the way out of an out-of-memory), and so may max_steps.
RESUME_SAME = ("model", "data", "split", "max_length", "packing", "loss_agg", "lr", "schedule", "warmup_ratio", "beta1",
               "beta2", "weight_decay", "grad_clip", "global_batch", "epochs", "seed", "dtype", "freeze_vision")
# The few knobs that depend on model size (everything else is a flag; run/sft_*.sh spell them out). Activation
# checkpointing is on for every size: upstream had it off for 3B/7B, but a 32768-token sample then needs 207 GiB
# (3B) and 286 GiB (7B) per rank in the simulation (README "Will it fit"); it changes no number, only memory/speed.
SIZES = {"3b": dict(activation_checkpointing=True), "7b": dict(activation_checkpointing=True),
         "32b": dict(activation_checkpointing=True), "72b": dict(activation_checkpointing=True)}

# -----------------------------------------------------------------------------------------------------------------
# Pure helpers


def lr_at(step: int, total: int, warmup_ratio: float, schedule: str = "cosine") -> float:
    """LR multiplier for optimizer update `step` (0-based), as HF's schedulers: linear warmup from 0, then cosine or
    constant. The first update of a warmed-up run uses multiplier 0, exactly like the recipe's TRL run."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_plan(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient-accumulation steps per optimizer step; fails up front when the numbers do not divide."""
    if global_batch % (micro_batch * world) != 0 or global_batch < micro_batch * world:
        raise ValueError(f"global_batch {global_batch} is not a positive multiple of micro_batch {micro_batch} x "
                         f"world size {world}: that leaves no whole number of micro-steps")
    return global_batch // (micro_batch * world)


def step_indices(n: int, step: int, steps_per_epoch: int, global_batch: int, seed: int, rank: int, world: int):
    """Row indices of this rank's share of optimizer step `step`: a seeded permutation per epoch, remainder dropped."""
    epoch, k = divmod(step, steps_per_epoch)
    perm = random.Random(mix_seed(seed, epoch)).sample(range(n), n)
    batch = perm[k * global_batch : (k + 1) * global_batch]
    per = global_batch // world
    return batch[rank * per : (rank + 1) * per]


def encode_sft(processor, tokenizer, item) -> forward.Segment:
    """The conversation `prompt + <think> {reasoning} </think>\\n<answer> {label} </answer><|im_end|>\\n` as one
    Segment whose target_mask covers exactly the assistant tokens (the generation prompt itself is not a target)."""
    vl = processor is not None
    prompt = prompts.prompt_text(processor, tokenizer, item)
    full = prompts.prompt_text(processor, tokenizer, item, prompts.sft_target(item.reasoning or "", item.answer_label))
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    if vl:
        enc = processor(text=[full], images=item.images or None, return_tensors="pt")
        ids, pix, grid = enc["input_ids"][0], enc.get("pixel_values"), enc.get("image_grid_thw")
    else:
        ids, pix, grid = tokenizer(full, return_tensors="pt", add_special_tokens=False)["input_ids"][0], None, None
    # prompt length = its text tokens + the extra <|image_pad|> copies the processor inserted per image
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(head) + prompts.image_tokens(processor, item.images) - len(item.images)
    if vl and grid is not None:  # collapse the expanded pads to compare token by token
        pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        got = [t for k, t in enumerate(ids[:n_prompt].tolist()) if not (t == pad and k > 0 and ids[k - 1] == pad)]
    else:
        got = ids[:n_prompt].tolist()
    if got != head:
        raise ValueError("prompt tokens differ inside the full conversation (a merge across the turn boundary)")
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[n_prompt:] = True
    return forward.Segment(ids, pix, grid, target_mask=mask)


def conversation_tokens(processor, tokenizer, item, prompt_tokens: int | None = None) -> int:
    """Length in tokens of the SFT conversation encode_sft builds for `item`, counted with prompts.prompt_tokens and
    no image decoded (the up-front check reads text columns only). `prompt_tokens` is data_prep's count of the
    prompt, image tokens included; without one (None or -1) the item's images, if any, are not counted here (the
    loop's own check catches such a row)."""
    target = prompts.sft_target(item.reasoning or "", item.answer_label)
    full = prompts.prompt_tokens(processor, tokenizer, item, target)
    if prompt_tokens is None or prompt_tokens < 0:  # data_prep writes -1 when it was not asked to count
        return full
    return full - prompts.prompt_tokens(processor, tokenizer, item) + prompt_tokens


def loss_units(samples: list, loss_agg: str) -> int:
    """What this rank's samples add to the loss's divisor: their loss tokens (token-mean) or their count
    (seq-mean-token-mean). Summed over ranks, it is the divisor of sft_loss."""
    return sum(int(s.target_mask.sum()) for s in samples) if loss_agg == "token-mean" else len(samples)


def sft_loss(logp: torch.Tensor, spans: list, loss_agg: str, normaliser: int) -> torch.Tensor:
    """This micro-batch's share of the global batch's loss; the shares summed over micro-batches and ranks are the loss.

    logp (M,) is the log-probability of every loss token of the micro-batch, spans[i][0] = (start, end) of sample i's
    tokens in it (forward.pack), normaliser = the global sum of loss_units.
    - seq-mean-token-mean (default, upstream's): mean over the global batch's samples of each sample's own mean token
      NLL. Upstream's TRL 0.15 run (RECIPE §5.1) had per-device batch 1 and gradient accumulation, and Qwen2.5-VL's
      forward in transformers 4.51.3 takes a plain mean over the micro-batch's tokens, so each sample's token-mean
      weighs 1/global_batch whatever its length.
    - token-mean: the summed token NLL over the global batch's loss-token count; long traces weigh more.
    Both are exact under any micro-batch split and world size, because the divisor is global."""
    if loss_agg == "token-mean":
        return -logp.sum() / max(1, normaliser)
    if loss_agg == "seq-mean-token-mean":
        means = [logp[a:b].sum() / max(1, b - a) for (a, b), *_ in spans]
        return -torch.stack(means).sum() / max(1, normaliser)
    raise ValueError(f"loss_agg {loss_agg!r}: use seq-mean-token-mean or token-mean")


def sharded_meta(model: str, dtype: str, attn: str, cpu_offload: bool, ckpt: bool, freeze_vision: bool,
                 trust_remote_code: bool):
    """The model on the meta device, FSDP2-sharded per block (common/fsdp.py); fill it with fsdp.load_from_rank0."""
    net = build_meta(model, dtype="fp32", attn=attn, trust_remote_code=trust_remote_code)
    return fsdp.shard(net, param_dtype=dtype, cpu_offload=cpu_offload, activation_checkpointing=ckpt,
                      freeze_vision=freeze_vision)


def optimizer(net, lr: float, beta1: float, beta2: float, weight_decay: float):
    """(trainable params, AdamW): weight decay on matrices only, not on biases/norms, as HF Trainer (RECIPE §5.1)."""
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=1e-8)


def accumulate(net, mine: list, accum: int, micro_batch: int, packing: bool, loss_agg: str, normaliser: int, device,
               step: int) -> float:
    """Forward and backward of this rank's samples `mine`, `accum` micro-steps of `micro_batch` samples each
    (gradients reduce-scattered after each, into the fp32 shards: skipping the sync until the last would hold an
    unsharded gradient of the whole model on every rank, +85 GiB per rank for 32B GRPO in the simulation; torchtitan
    also reduces every micro-step); returns the summed loss shares (a float)."""
    loss_sum = 0.0
    for m in range(accum):
        micro = mine[m * micro_batch : (m + 1) * micro_batch]
        packed = forward.pack(micro, net, rows="packed" if packing else "padded").to(device)
        logp, _ = forward.token_logprobs(net, packed)
        loss = sft_loss(logp, packed.spans, loss_agg, normaliser) * poison("sft_loss", step)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def simulate(world: int, gpu_memory_gb: float, out: str, model: str, dtype: str, attn: str, ckpt: bool,
             cpu_offload: bool, freeze_vision: bool, global_batch: int, micro_batch: int, max_length: int,
             packing: bool, loss_agg: str, grad_clip: float, image: bool, settings: dict, steps: int = 2) -> dict:
    """`--simulate_world`: `steps` optimizer steps of this script's own code on `world` fake ranks (common/simulate.py),
    every sample a conversation of exactly `max_length` tokens (the worst case; its last 3/4 are loss tokens), with
    one image of simulate.IMAGE_GRID (1008 x 1008 px) each when `image`. Phases: forward_backward (all micro-steps
    of a step) and optimizer (clip + AdamW step); the second step sees the optimizer state. Returns the plan."""
    from common import simulate as sim

    accum = batch_plan(global_batch, micro_batch, world)
    folder = sim.model_folder(model, os.path.join(out, "sim_model"))
    with sim.fake_world(world) as (d, tracker):
        net = sharded_meta(folder, dtype, attn, cpu_offload, ckpt, freeze_vision, False)
        net.to_empty(device=d.device)
        net.train()
        params, opt = optimizer(net, 1e-5, 0.9, 0.95, 1e-4)
        tracker.watch(net, opt, offload=cpu_offload)
        mine = [sim.segment(net, max_length, image, target_from=max_length // 4)
                for _ in range(global_batch // world)]
        normaliser = loss_units(mine, loss_agg) * world
        for step in range(steps):
            with tracker.phase("forward_backward"):
                accumulate(net, mine, accum, micro_batch, packing, loss_agg, normaliser, d.device, step)
            with tracker.phase("optimizer", context="other"):
                fsdp.clip_grad_norm_(params, grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
    p = sim.plan(tracker, world, gpu_memory_gb, settings)
    sim.write(p, out)
    return p


# -----------------------------------------------------------------------------------------------------------------


def main(
    # Model
    model: str = "7b",  # preset (3b/7b/32b/72b), hub id or folder
    dtype: Dtype = "bf16",  # compute dtype (FSDP mixed precision; master weights and reductions stay fp32)
    attn: Attn = "auto",  # auto = flash_attention_2 if installed on GPU, else sdpa
    activation_checkpointing: bool | None = None,  # None/auto = from the size table (on for 32b and 72b)
    cpu_offload: bool = False,  # FSDP2 CPU offload of params/grads/optimizer state
    freeze_vision: bool = False,  # recipe trains everything
    trust_remote_code: bool = False,  # run code shipped with a hub model (off: our loaders need none)
    # Data
    data: str = "text",  # text (m23k) | image (PMC-VQA + GPT-4o CoT) | mixed | comma-separated folders/hub ids
    split: str = "train",  # split of a hub dataset
    max_length: int = 32768,  # longer conversations are skipped and counted; recipe block_size 32768
    packing: bool = True,  # padding-free rows (False = padded reference mode)
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean",  # upstream's: see sft_loss
    # Optimization (recipe §5.1)
    lr: float = 1e-5,  # recipe: 1e-5 peak
    schedule: Literal["cosine", "constant"] = "cosine",  # LR after warmup (recipe: cosine)
    warmup_ratio: float = 0.05,  # share of the steps with linear warmup (recipe 0.05)
    beta1: float = 0.9,  # AdamW (recipe 0.9)
    beta2: float = 0.95,  # AdamW (recipe 0.95)
    weight_decay: float = 1e-4,  # recipe: 1e-4
    grad_clip: float = 1.0,  # HF Trainer's max_grad_norm
    global_batch: int = 16,  # samples per optimizer step, all ranks together
    micro_batch: int = 1,  # samples per forward pass per rank (packed into one row)
    epochs: int = 5,  # recipe: 5 with a save each (the released models are epoch 3)
    max_steps: int = -1,  # stop early (-1 = epochs * steps per epoch)
    seed: int = 42,  # data order and init
    max_bad_steps: int = 3,  # consecutive non-finite steps before the run stops
    # Checkpoints and logging
    out: str = "",  # '' = outputs/sft/<model>-<data>
    save_every: int = 0,  # extra resumable checkpoints every N steps (0 = epoch ends only)
    export_every_epoch: bool = True,  # HF folder out/epoch_E at each epoch end
    keep_checkpoints: int = -1,  # newest resumable checkpoints kept in out/ckpt (< 1 = all; HF folders always stay)
    resume: str = "auto",  # auto = newest complete checkpoint in out/ckpt | '' = start fresh | a step_N folder
    min_free_gb: float = -1,  # free space the output folder must have at start (-1 = estimate one checkpoint)
    timeout_s: float = 1800,  # collective timeout: a rank that dies stops the others instead of hanging them
    wandb: bool = False,  # also log to Weights & Biases (needs `pip install wandb` and a login)
    log_every: int = 1,  # print a metric line every N steps (metrics.jsonl gets every step)
    # Memory plan (common/simulate.py): no torchrun, no weights, no data
    simulate_world: int = 0,  # > 0: simulate one full-shape step on N ranks, print per-rank memory, write the plan
    gpu_memory_gb: float = 80,  # the GPU the plan is judged against (H100/A100 80 GB)
    simulate_images: bool | None = None,  # one 1008 px image per sample (None = when --data is image or mixed)
):
    user_config = dict(locals())
    cli.check_choices(main, user_config)  # a misspelt choice fails here, before any work
    t_start = time.time()
    if simulate_world > 0:
        size = SIZES.get(model.lower(), {})
        ckpt = size.get("activation_checkpointing", False) if activation_checkpointing is None \
            else activation_checkpointing
        image = data in ("image", "mixed") if simulate_images is None else simulate_images
        out = out or os.path.join("outputs", "simulate", f"sft-{os.path.basename(model.rstrip('/'))}-w{simulate_world}")
        simulate(simulate_world, gpu_memory_gb, out, model, dtype, attn, ckpt, cpu_offload, freeze_vision,
                 global_batch, micro_batch, max_length, packing, loss_agg, grad_clip, image,
                 {**user_config, "activation_checkpointing": ckpt, "simulate_images": image})
        return
    d = dist.init(seed=seed, timeout_s=timeout_s)
    speed.check_dtype(dtype, d.device)  # bf16 on a CPU without native bf16: ~80x slower matmuls
    size = SIZES.get(model.lower(), {})
    ckpt_on = size.get("activation_checkpointing", False) if activation_checkpointing is None \
        else activation_checkpointing
    out = out or os.path.join("outputs", "sft", f"{os.path.basename(resolve(model).rstrip('/'))}-{data.replace('/', '_')}")
    accum = batch_plan(global_batch, micro_batch, d.world_size)
    check_output(out)
    if d.is_main:
        write_json(os.path.join(out, "config.json"), {**user_config, "git": git_sha(), "world_size": d.world_size})
        print(f"sft: {model} on {data} | world {d.world_size} x micro {micro_batch} x accum {accum} = "
              f"{global_batch} samples/step | out {out}", flush=True)
    log = Logger(out, user_config, d.is_main, wandb)

    # Data: text fields are validated up front; rows without a trace or over max_length are skipped and counted
    sources = DATASETS.get(data, data.split(","))
    tables = [(src, load_rows(src, split)) for src in sources]
    processor, tokenizer = load_processor(model, trust_remote_code)
    control = control_strings(tokenizer)  # the model's own special tokens may not appear in data text (issue 11 §3)
    index, skipped = [], {}
    for t, (src, ds) in enumerate(tables):
        cols = [c for c in ds.column_names if c != "images"]
        for i, row in enumerate(tqdm(ds.select_columns(cols), desc=f"check {src}", unit="row", disable=not d.is_main,
                                     dynamic_ncols=True)):
            try:
                item = admit_row(ds, i, control=control, text_only=processor is None, need_images=False, row=row)
                if not (item.reasoning or "").strip():
                    raise RowError("no reasoning trace")
                n = conversation_tokens(processor, tokenizer, item, row.get("prompt_tokens"))
                if n > max_length:
                    raise RowError(f"longer than max_length ({n} > {max_length} tokens)")
                index.append((t, i))
            except RowError as e:
                key = reason_kind(str(e))
                skipped[key] = skipped.get(key, 0) + 1
    if skipped and d.is_main:
        print(f"skipped rows: {skipped}", flush=True)
    steps_per_epoch = len(index) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(index)} usable rows cannot fill one global batch of {global_batch}")
    if len(index) % global_batch:
        dist.print0(f"{len(index) % global_batch} of {len(index)} rows left out each epoch (not a whole global batch; "
                    f"a different random few each epoch)")
    total = epochs * steps_per_epoch if max_steps < 0 else min(max_steps, epochs * steps_per_epoch)

    def sample(k):
        t, i = index[k]
        src, ds = tables[t]
        try:
            item = admit_row(ds, i, data_root(src))
        except RowError as e:  # text fields were checked up front; an image that broke since then stops the run
            raise SystemExit(f"row {i} of {src}: {e}") from None
        return encode_sft(processor, tokenizer, item)

    # Model: meta -> shard -> rank 0 reads the weights and broadcasts -> optimizer
    net = sharded_meta(model, dtype, attn, cpu_offload, ckpt_on, freeze_vision, trust_remote_code)
    check_output(out, int(min_free_gb * 2**30) if min_free_gb >= 0 else checkpoint.checkpoint_bytes(net, d.world_size))
    fsdp.load_from_rank0(net, model, d.device, trust_remote_code)
    net.train()
    params, opt = optimizer(net, lr, beta1, beta2, weight_decay)
    peak = peak_flops(d.device, dtype)  # CPU: a matmul probe at this dtype, cached per machine

    # Resume
    step = 0
    if resume:
        path = checkpoint.latest(os.path.join(out, "ckpt"), report=dist.print0) if resume == "auto" else resume
        if path:
            if resume == "auto":  # the same run continuing: the flags that shape its numbers must not have changed
                checkpoint.check_same_run(checkpoint.saved_config(path), user_config, RESUME_SAME, path)
            state = checkpoint.load(path, net, opt)
            step = state["step"]
            dist.print0(f"resumed from {path} at step {step}")

    # Training loop
    bad, seen_tokens, t_last, start_step = 0, 0, time.time(), step
    while True:
        last_step = step >= total
        epoch_end = step > 0 and step % steps_per_epoch == 0
        fresh = step != start_step  # the checkpoint we resumed from is not written again
        if step > 0 and (epoch_end or last_step or (save_every and step % save_every == 0)):
            name = f"epoch_{step // steps_per_epoch}" if epoch_end else f"step_{step:06d}"
            checkpoint.save_step(
                out, step, net, opt, fresh=fresh, state={"epoch": step / steps_per_epoch, "user_config": user_config},
                keep=keep_checkpoints, is_main=d.is_main,
                export=name if (epoch_end and export_every_epoch) or last_step else None, processor=processor,
                tokenizer=tokenizer, dtype=dtype, link_final=last_step, report=dist.print0,
                meta={"stage": "sft", "step": step, "epoch": step / steps_per_epoch, "user_config": user_config,
                      "git": git_sha()})
        if last_step:
            break
        crash_point("sft_step")

        # one optimizer step: this rank's samples, global loss-token count, micro-steps
        mine = [sample(k) for k in step_indices(len(index), step, steps_per_epoch, global_batch, seed, d.rank,
                                                d.world_size)]
        too_long = [len(s.ids) for s in mine if len(s.ids) > max_length]
        if too_long:
            raise SystemExit(f"step {step}: a conversation of {too_long[0]} tokens exceeds max_length {max_length}")
        n_tok, normaliser = map(int, dist.all_reduce_many([sum(int(s.target_mask.sum()) for s in mine),
                                                          loss_units(mine, loss_agg)]))  # global: exact under any split
        tokens = sum(len(s.ids) for s in mine)
        loss_sum = accumulate(net, mine, accum, micro_batch, packing, loss_agg, normaliser, d.device, step)
        norm = fsdp.clip_grad_norm_(params, grad_clip) * poison("sft_grad", step)
        loss_all = dist.all_reduce_sum(loss_sum)
        lrm = lr_at(step, total, warmup_ratio, schedule)
        if not (math.isfinite(loss_all) and math.isfinite(float(norm))):
            bad += 1
            opt.zero_grad(set_to_none=True)
            dist.print0(f"step {step}: non-finite loss {loss_all} / grad norm {float(norm)}: update skipped "
                        f"({bad} in a row)")
            log.log(step + 1, {"skipped": 1, "loss": None})
            if bad >= max_bad_steps:
                raise SystemExit(f"stopping: {bad} non-finite steps in a row (lower the lr, check the data)")
            step += 1
            continue
        bad = 0
        for g in opt.param_groups:
            g["lr"] = lr * lrm
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # one line per step
        dt, t_last = time.time() - t_last, time.time()
        tok_all = dist.all_reduce_sum(tokens)
        seen_tokens += tok_all
        tps = tok_all / dt
        attended = sum(len(s.ids) ** 2 for s in mine) / max(1, tokens)  # token-weighted mean conversation length
        mfu = compute_mfu(model_flops(net, tok_all, attended, logit_rows=n_tok), dt, peak, d.world_size)
        mem = torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else None
        eta = (total - step) * (time.time() - t_start) / max(1, step)
        metrics = {"loss": loss_all, "lr": lr * lrm, "grad_norm": float(norm), "epoch": step / steps_per_epoch,
                   "tokens_per_s": tps, "mfu": mfu, "peak_mem_gib": mem, "loss_tokens": n_tok}
        line = None
        if step % log_every == 0 or step == total:
            line = (f"step {step:05d}/{total:05d} | epoch {step / steps_per_epoch:.2f} | loss {loss_all:.4f} | "
                    f"lr {lr * lrm:.3g} | gnorm {float(norm):.3f} | tok/s {tps:.0f} | mfu "
                    f"{fmt(100 * mfu) + '%' if mfu else 'n/a'} | mem {fmt(mem) + 'GiB' if mem else 'n/a'} | "
                    f"eta {eta / 60:.1f}m")
        log.log(step, metrics, line)

    # Final summary
    if d.is_main:
        rows = log.read()
        plot_curves(rows, ["loss", "lr", "grad_norm"], os.path.join(out, "curves.png"), f"sft {model} on {data}")
        print(f"done: {step} steps, {seen_tokens} tokens this session, {(time.time() - t_start) / 60:.1f} min; "
              f"HF folder {os.path.join(out, 'final')}", flush=True)
    log.finish()
    dist.cleanup()


if __name__ == "__main__":
    cli.run(main)
