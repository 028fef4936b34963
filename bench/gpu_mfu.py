"""SFT step throughput and MFU on one GPU: a Qwen2.5-VL-3B-shaped model with random weights, bf16, our FSDP2 loop.

    python bench/gpu_mfu.py                         # sdpa (flash_attention_2 when installed), 8k-token packed rows
    python bench/gpu_mfu.py --attn sdpa --tokens 16384 --images 2

The model is built from the published Qwen2.5-VL-3B-Instruct architecture numbers (no download), sharded with
common/fsdp.py exactly as sft.py does it (world of 1), and trained on packed rows of random token ids (plus random
images when --images > 0) with the assistant-only loss code path. MFU = tokens/s x common.model.flops_per_token
(6 N + 12 L d S, the vision tower not counted) / the GPU's dense bf16 peak.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def qwen25_vl_3b_config(vocab: int):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True)


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

    from common import dist, forward, fsdp
    from common.log import peak_flops
    from common.model import attn_implementation, flops_per_token, model_class, num_params

    d = dist.init(seed=0)
    assert d.device.type == "cuda", "this benchmark needs a GPU"
    vocab = 151936
    config = qwen25_vl_3b_config(vocab)
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
    mfu = tps * flops_per_token(model, per) / peak if peak else float("nan")
    print(f"{torch.cuda.get_device_name()} | attn {model.config._attn_implementation} | {args.tokens} tokens/row, "
          f"{args.samples} samples, {args.images} images | {n_params / 1e9:.2f} B params (no embeddings)")
    print(f"step {dt * 1000:.0f} ms | {tps:.0f} tokens/s | MFU {100 * mfu:.1f} % | peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    dist.cleanup()


if __name__ == "__main__":
    main()
