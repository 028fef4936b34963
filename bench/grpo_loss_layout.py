"""How far grpo.py's GRPO gradient is from verl's (issue 11 §7): cosine between the two on one real batch.

    .venv/bin/python bench/grpo_loss_layout.py [--groups 8] [--group_size 8] [--max_new_tokens 64]

grpo.py aggregates the loss as one exact token-mean over the whole mini-batch: sum of per-token losses / the
mini-batch's loss-token count, whatever the micro-batches and ranks. verl @ 54b2677 (the recipe's trainer,
dp_actor.update_policy with loss_agg_mode=token-mean) takes a token-mean inside each micro-batch and divides it by
the number of micro-batches (then FSDP averages over ranks), i.e. a mean of per-micro-batch token-means, so its
gradient depends on how the responses are laid out. Here both are computed on the same batch:

    ours   = sum_g S_g / N                 S_g = summed per-token loss of group g, N = all loss tokens
    verl_m = (1 / C) sum_c (sum_{g in c} S_g) / N_c    micro-batches c of m groups, N_c their loss tokens

Real model (SmolLM2-135M-Instruct, fp32, CPU), real prompts (MedQA-USMLE test questions from ../shared/data/real,
else the bundled ones) with the recipe's prompt, real rollouts (temperature 1, one sample seed per response). The
reward is the lenient grader (the strict format reward is ~always 0 for this model, which leaves no gradient). The
first update of a step: ratio 1 (on-policy), so clipping is inactive, and the KL term has zero gradient (the policy
is its own reference), so kl_coef 0 here changes nothing. One backward pass per group gives every S_g gradient once;
each aggregation is a weighted sum of them.
Prints the cosine and the norm ratio |verl| / |ours| for micro-batches of 1, 2 and 4 groups (verl's micro-batch
counts responses: the recipe's 32 per GPU is 4 groups of 8).
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_prep  # noqa: E402  (its MedQA converter; bench only)
import grpo  # noqa: E402  (the loss as grpo.py computes it; bench only)
from common import grading  # noqa: E402
from common.generate import HFEngine  # noqa: E402
from common.model import load_model, load_processor  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache", "tests", "smollm2"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if not os.path.exists(os.path.join(args.model, "config.json")):
        from common.testmodels import convert_smollm2

        convert_smollm2(args.model)

    medqa = os.path.join(ROOT, "..", "shared", "data", "real", "medqa_usmle_4opt", "test.jsonl")
    if os.path.exists(medqa):
        rows = [r for _, r in data_prep.medqa_rows(medqa)[1] if isinstance(r, dict)][: args.groups]
    else:
        import random

        rows = data_prep.sample_text_items(random.Random(0))[: args.groups]
    model = load_model(args.model, dtype="fp32").train()
    processor, tok = load_processor(args.model)
    eps = grpo.make_episodes(rows, list(range(len(rows))), None, processor, tok, 4096, "bench")
    G = args.group_size
    with torch.no_grad():
        outs = HFEngine(model.eval(), processor, tok, batch_size=len(eps)).generate(
            [ep.prompt for ep in eps], n=G, temperature=1.0, max_new_tokens=args.max_new_tokens,
            seeds=[args.seed * 1000 + i for i in range(len(eps))])
    model.train()
    for ep, samples in zip(eps, outs):
        ep.samples = samples
    reward = lambda text, item, ids: float(grading.lenient_correct(text, item.answer, item.answer_label))  # noqa: E731
    grpo.score(eps, reward, G, args.max_new_tokens, 0, 1.0, True, 1e-6, False, False)
    varied = sum(len(set(ep.rewards)) > 1 for ep in eps)
    tokens = [sum(len(s.token_ids) for s in ep.samples) for ep in eps]
    algo = dict(clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=0.0, kl_type="k3", loss_agg="token-mean",
                entropy_coef=0.0, max_len=args.max_new_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    layouts = [m for m in (1, 2, 4) if len(eps) % m == 0]
    acc = {k: torch.zeros(sum(p.numel() for p in params)) for k in ["ours"] + layouts}
    N = sum(tokens)
    for g, ep in enumerate(eps):  # S_g: the summed per-token loss of one group (normaliser 1)
        loss, _, _ = grpo.micro_loss(model, [ep], None, None, 1.0, torch.device("cpu"), True, 1.0, algo)
        grad = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(grad, params)])
        acc["ours"] += flat / N
        for m in layouts:
            chunk = g // m
            n_c = sum(tokens[chunk * m : (chunk + 1) * m])
            acc[m] += flat / (n_c * (len(eps) // m))
    print(f"{len(eps)} groups x {G} responses (<= {args.max_new_tokens} tokens), {N} loss tokens, "
          f"{varied} groups with differing rewards; tokens per group {tokens}")
    ours = acc["ours"].double()  # float64: the squared norms of ~1e8 tiny entries underflow in fp32 (cosine > 1)
    for m in layouts:
        theirs = acc[m].double()
        cos = float(ours @ theirs / (ours.norm() * theirs.norm()))
        ratio = float(theirs.norm() / ours.norm())
        print(f"verl micro-batch {m} group(s) = {m * G} responses: cosine {cos:.4f}, |verl| / |ours| {ratio:.3f}")


if __name__ == "__main__":
    main()
