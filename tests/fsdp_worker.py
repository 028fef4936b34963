"""Worker for 2-rank FSDP2 checks (run by tests through torchrun; not a test module itself)."""

import os
import sys

import torch
from PIL import Image

from common import dist, forward as fw, fsdp, generate as G, prompts
from common.model import build_meta, load_processor


def generate(path, out):
    d = dist.init(seed=0, timeout_s=120)
    proc, tok = load_processor(path)
    model = build_meta(path, dtype="fp32")
    fsdp.shard(model, param_dtype="fp32")
    fsdp.load_from_rank0(model, path, d.device)
    ps = []
    for k in range(2 + d.rank):
        img = [Image.new("RGB", (90, 70), (k * 80, 0, 0))] if d.rank == 0 else []
        msgs = prompts.messages(f"Q {k} {d.rank}" * (k + 1), {"A": "a", "B": "b"}, len(img), True)
        ps.append(G.Prompt(prompts.render(proc, msgs), img))
    eng = G.HFEngine(model, proc, tok, batch_size=1, synced=True)
    with torch.no_grad(), fsdp.gathered(model):
        out = eng.generate(ps, n=2, temperature=1.0, max_new_tokens=6 + 4 * d.rank, seeds=list(range(len(ps))))
    assert [len(o) for o in out] == [2] * len(ps)
    assert all(len(s.token_ids) <= 6 + 4 * d.rank for o in out for s in o)
    segs = [fw.Segment(p.segment.ids, p.segment.pixel_values, p.segment.image_grid_thw,
                       branches=[torch.tensor(s.token_ids) for s in o]) for p, o in zip(ps, out)]
    lp, _ = model.mvl_logprobs(fw.pack(segs, model))
    (-lp.sum()).backward()
    norm = fsdp.clip_grad_norm_(list(model.parameters()), 1.0)
    assert torch.isfinite(norm)
    sd = fsdp.full_state_dict(model)
    assert (len(sd) > 0) == (d.rank == 0)
    print(f"OK rank {d.rank}", flush=True)
    dist.cleanup()


def _sharded(path, d):
    model = build_meta(path, dtype="fp32")
    fsdp.shard(model, param_dtype="fp32")
    fsdp.load_from_rank0(model, path, d.device)
    return model


def _sft_samples(path, data, n):
    from common.data import load_rows, parse_row
    from sft import encode_sft

    proc, tok = load_processor(path)
    rows = load_rows(data)
    return [encode_sft(proc, tok, parse_row(rows[i])) for i in range(n)], proc, tok


def sft_grad(path, data, micro, rows, out, loss_agg):
    """Gradient of the SFT loss (sft.sft_loss with `loss_agg`) on the first 4 samples, split over ranks and
    micro-batches as asked; saved by rank 0."""
    from sft import loss_units, sft_loss

    d = dist.init(seed=0, timeout_s=120)
    model = _sharded(path, d)
    samples, _, _ = _sft_samples(path, data, 4)
    per = 4 // d.world_size
    mine = samples[d.rank * per : (d.rank + 1) * per]
    normaliser = int(dist.all_reduce_sum(loss_units(mine, loss_agg)))
    micro = int(micro)
    for m in range(0, per, micro):
        packed = fw.pack(mine[m : m + micro], model, rows=rows)
        lp, _ = model.mvl_logprobs(packed)
        sft_loss(lp, packed.spans, loss_agg, normaliser).backward()
    _save_grads(model, d, out)


def _save_grads(model, d, out):
    """Full (unsharded) gradients to `out` from rank 0, then leave the process group."""
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    if d.rank == 0:
        torch.save(grads, out)
    print(f"OK rank {d.rank}", flush=True)
    dist.cleanup()


def export(path, data, out):
    """Two SFT steps, then: logits of the sharded model == logits of the exported HF folder reloaded by transformers."""
    from common import checkpoint
    from common.model import load_model

    d = dist.init(seed=0, timeout_s=120)
    model = _sharded(path, d)
    samples, proc, tok = _sft_samples(path, data, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        lp, _ = model.mvl_logprobs(fw.pack(samples[d.rank :: 2], model))
        (-lp.mean()).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        mine, _ = model.mvl_logprobs(fw.pack(samples[:2], model))
    checkpoint.export_hf(model, out, proc, tok, {"stage": "test"})
    if d.rank == 0:
        again = load_model(out, dtype="fp32").eval()
        with torch.no_grad():
            theirs, _ = again.mvl_logprobs(fw.pack(samples[:2], again))
        print(f"max abs diff {float((mine - theirs).abs().max()):.3e}", flush=True)
    print(f"OK rank {d.rank}", flush=True)
    dist.cleanup()


def grpo_grad(path, micro_groups, loss_agg, out):
    """Gradient of the GRPO loss for 4 fixed groups (3 responses each), split over ranks and micro-batches."""
    import grpo

    d = dist.init(seed=0, timeout_s=120)
    model = _sharded(path, d)
    proc, tok = load_processor(path)
    g = torch.Generator().manual_seed(0)
    eps = []
    for k in range(4):
        img = [Image.new("RGB", (60 + 10 * k, 56), (40 * k, 200, 0))] if k != 2 else []  # one text-only group
        p = G.Prompt(prompts.render(proc, prompts.messages(f"q{k}", {"A": "x", "B": "y"}, len(img), True)), img)
        G.encode(proc, tok, p)
        ep = grpo.Episode(None, p)
        ep.samples = [G.Sample(torch.randint(0, 300, (int(n),), generator=g).tolist(), "", "stop")
                      for n in torch.randint(1, 7, (3,), generator=g)]
        ep.rewards = torch.randint(0, 2, (3,), generator=g).float().tolist()
        ep.advantages = grpo.group_advantages(torch.tensor(ep.rewards), 3).tolist()
        ep.loss_mask = [True, True, k != 1]  # one response left out of the loss
        eps.append(ep)
    with torch.no_grad():
        ref = [x[0] + 0.05 * torch.randn(len(x[0]), generator=g) for x in
               grpo.episode_logprobs(model, eps, d.device, 4, True)]
    old = [r - 0.1 for r in ref]
    per = 4 // d.world_size
    mine = list(range(d.rank * per, (d.rank + 1) * per))
    algo = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.01, kl_type="k3", loss_agg=loss_agg,
                entropy_coef=0.001, max_len=8)
    if algo["loss_agg"] == "token-mean":
        local = sum(len(s.token_ids) for i in mine for s, keep in zip(eps[i].samples, eps[i].loss_mask) if keep)
    else:
        local = sum(sum(eps[i].loss_mask) for i in mine)
    normaliser = dist.all_reduce_sum(local)
    mg = int(micro_groups)
    for c in range(0, per, mg):
        chunk = mine[c : c + mg]
        loss, _, _ = grpo.micro_loss(model, [eps[i] for i in chunk], [old[i * 3 + j] for i in chunk for j in range(3)],
                                     [ref[i * 3 + j] for i in chunk for j in range(3)], normaliser, d.device, True, 1.0,
                                     algo)
        loss.backward()
    _save_grads(model, d, out)


def tp_feed(out):
    """What each rank receives when a vLLM tensor-parallel group (tp 2 of 4 ranks) gathers its prompts: counts of
    prompts and images per sending rank, written to out/tp_feed.rank{r}.json (no vLLM: the gather is ours)."""
    import json

    from common.vllm_engine import gather_group, tp_groups, tp_subgroup

    d = dist.init(seed=0, timeout_s=120)
    tp = 2
    dp_size, dp_rank = tp_groups(tp, d.world_size, d.rank)
    group = tp_subgroup(tp, d.world_size, d.rank)
    mine = [G.Prompt(f"rank {d.rank} prompt {k}", [Image.new("RGB", (8, 8), (d.rank * 60, k, 0))])
            for k in range(d.rank + 1)]  # uneven: rank r has r + 1 prompts, one image each
    got, seeds, start = gather_group(mine, [100 * d.rank + k for k in range(len(mine))], group)
    senders = [int(p.text.split()[1]) for p in got]
    rec = {"dp_size": dp_size, "dp_rank": dp_rank, "senders": senders, "images": sum(len(p.images) for p in got),
           "seeds": seeds, "start": start, "own": [p.text for p in got[start : start + len(mine)]],
           "own_expected": [p.text for p in mine]}
    with open(os.path.join(out, f"tp_feed.rank{d.rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.cleanup()


if __name__ == "__main__":
    {"generate": generate, "sft_grad": sft_grad, "export": export, "grpo_grad": grpo_grad,
     "tp_feed": tp_feed}[sys.argv[1]](*sys.argv[2:])
    # The work is done and flushed. Leave without C++ static destructors: in CI one rank once aborted there, after both
    # had printed OK (`terminate called without an active exception`, torch 2.14 + gloo). The scripts' own exit is
    # tested by the script tests; this worker only measures gradients.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
