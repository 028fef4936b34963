"""Worker for 2-rank FSDP2 checks (run by tests through torchrun; not a test module itself)."""

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


if __name__ == "__main__":
    {"generate": generate}[sys.argv[1]](*sys.argv[2:])
