"""SFT step throughput and MFU on one GPU: a Qwen2.5-VL-3B-shaped model with random weights, bf16, our FSDP2 loop.

    python bench/gpu_mfu.py                         # sdpa (flash_attention_2 when installed), 8k-token packed rows
    python bench/gpu_mfu.py --attn sdpa --tokens 16384 --images 2

The model is built from the published Qwen2.5-VL-3B-Instruct numbers (common/arch.py, no download), sharded with
common/fsdp.py exactly as sft.py does it (world of 1), and trained on packed rows of random token ids (plus random
images when --images > 0) with the assistant-only loss code path. MFU = step FLOPs (common.model.model_flops:
6 N_blocks + 12 L d S per token, 6 N_head per target token, the vision tower not counted) / step time / the GPU's
dense bf16 peak.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per packed row (one row per micro-step)")
    ap.add_argument("--samples", type=int, default=8, help="samples packed into the row")
    ap.add_argument("--images", type=int, default=0, help="samples that carry a 448x448 image")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()

    import torch

    from common import arch, dist, forward, fsdp
    from common.log import peak_flops
    from common.model import attn_implementation, model_class, model_flops, num_params

    d = dist.init(seed=0)
    assert d.device.type == "cuda", "this benchmark needs a GPU"
    config = arch.config("3b")  # the published numbers, common/arch.py
    # Built on the CPU (random init, rotary tables included; ~16 GB of host memory), then fully_shard moves it.
    model = model_class(config).from_config(config, dtype=torch.float32,
                                            attn_implementation=attn_implementation(args.attn))
    forward.attach(model)
    fsdp.shard(model, param_dtype="bf16", activation_checkpointing=args.checkpointing)
    model.to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4, fused=True)
    n_params = num_params(model)
    g = torch.Generator().manual_seed(0)
    per = args.tokens // args.samples
    segs = []
    for k in range(args.samples):
        ids = torch.randint(0, 150000, (per,), generator=g)
        pix = grid = None
        if k < args.images:  # 448x448 -> 32x32 patches -> 256 image tokens after the 2x2 merge
            grid = torch.tensor([[1, 32, 32]])
            pix = torch.randn(1024, 3 * 2 * 14 * 14, generator=g)
            ids[10:266] = config.image_token_id
        mask = torch.zeros(per, dtype=torch.bool)
        mask[per // 4 :] = True
        segs.append(forward.Segment(ids, pix, grid, target_mask=mask))
    packed = forward.pack(segs, model).to(d.device)
    times = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        lp, _ = model.mvl_logprobs(packed)
        (-lp.mean()).backward()
        fsdp.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = sum(times[2:]) / len(times[2:])
    tps = args.tokens / dt
    peak = peak_flops(d.device)
    flops = model_flops(model, args.tokens, per, logit_rows=packed.pred_pos.numel())  # logits only at the targets
    mfu = flops / dt / peak if peak else float("nan")
    print(f"{torch.cuda.get_device_name()} | attn {model.config._attn_implementation} | {args.tokens} tokens/row, "
          f"{args.samples} samples, {args.images} images | {n_params / 1e9:.2f} B params (no embeddings)")
    print("MFU = step FLOPs (6 N_blocks + 12 L d S per token + 6 N_head per target, common.model.model_flops) / step "
          f"time / peak dense bf16 FLOP/s = {flops:.3g} / {dt:.3g} / {peak:.3g}")
    print(f"step {dt * 1000:.0f} ms | {tps:.0f} tokens/s | MFU {100 * mfu:.1f} % | peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    dist.cleanup()


if __name__ == "__main__":
    main()
