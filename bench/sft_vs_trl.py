"""SFT throughput, side by side in one run: sft.py vs TRL 1.16 SFTTrainer, same model, data, global batch and dtype.

    .venv/bin/pip install -r bench/requirements.txt && .venv/bin/python bench/sft_vs_trl.py [--steps 6] [--dtype auto]

Model: the real SmolLM2-135M-Instruct on the CPU. Data: the bundled reasoning traces (variable lengths), rendered
the same way for both (our prompt, chat template, `<think> .. </think>\\n<answer> L </answer>` target) with the loss
on the completion only. Global batch 8 samples; ours packs them into one padding-free row, TRL pads (its default).

Same work on both sides: TRL's configs default to bf16=True (autocast) and gradient_checkpointing=True even with
use_cpu=True, so both are set here explicitly to match sft.py: `--dtype auto` = bf16 where the CPU has native bf16
(avx512_bf16 / amx_bf16), else fp32; activation checkpointing off. Each side's *effective* dtype is then read from
the running process (every linear matmul counted by output dtype, autocast included: bench/matmuls.py) and printed;
when the two differ, the bench prints no ratio and exits 1.
Reported: median real (non-pad) tokens per second over the optimizer steps after the `--warmup` steps, sft.py's MFU
against this machine's measured matmul peak, and the ratio.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs a script as `python script.py ...` would, with every linear matmul counted (argv[1] = where the counts go).
WATCHED = ("import runpy, sys; from bench import matmuls; matmuls.watch_matmuls(sys.argv[1]); sys.argv = sys.argv[2:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")

TRL_SCRIPT = r'''
import json, sys, time, torch
A = json.loads(sys.argv[1])
ROOT, DATA, MODEL, OUT, GB, STEPS = A["root"], A["data"], A["model"], A["out"], A["gb"], A["steps"]
sys.path.insert(0, ROOT)
from bench import matmuls
calls, _ = matmuls.watch_matmuls()
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from common import prompts
from common.data import load_rows, parse_row
rows = [parse_row(r) for r in load_rows(DATA)]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": prompts.user_text(it.question, it.options)}],
                         "completion": [{"role": "assistant", "content": prompts.sft_target(it.reasoning, it.answer_label)}]}
                        for it in rows])
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)  # fp32 master weights, as ours
times, tokens = [], []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
# bf16/fp16/gradient_checkpointing set explicitly: TRL's own defaults are bf16=True and gradient_checkpointing=True
cfg = SFTConfig(output_dir=OUT, per_device_train_batch_size=GB, gradient_accumulation_steps=1, max_steps=STEPS,
                learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.05, adam_beta2=0.95, weight_decay=1e-4,
                use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                completion_only_loss=True, max_length=32768, seed=42,
                bf16=A["dtype"] == "bf16", fp16=False, gradient_checkpointing=False)
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
orig = trainer.training_step
def counting_step(model, inputs, *a, **k):
    tokens.append(int(inputs["attention_mask"].sum()))
    return orig(model, inputs, *a, **k)
trainer.training_step = counting_step
trainer.train()
print("RESULT " + json.dumps({"times": times, "tokens": tokens, "calls": [[*k, v] for k, v in calls.items()],
                              "grad_ckpt": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
                              "mixed_precision": str(trainer.accelerator.mixed_precision)}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    ap.add_argument("--global_batch", type=int, default=8)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 if this CPU has native bf16, else fp32) | fp32 | bf16")
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench"))
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup} to take the median of")
    import torch

    from common import speed
    from common.testmodels import convert_smollm2

    dtype = speed.auto_dtype() if args.dtype == "auto" else args.dtype
    speed.check_dtype(dtype, torch.device("cpu"))
    model = convert_smollm2(os.path.join(args.work, "smollm2"))
    data = os.path.join(args.work, "sample", "text")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run([sys.executable, "data_prep.py", "sample", "--out", os.path.join(args.work, "sample")],
                       cwd=ROOT, check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

    # ours
    out = os.path.join(args.work, "sft_ours")
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start it empty
    seen = os.path.join(args.work, "sft_ours_matmuls.json")
    t = time.time()
    p = subprocess.run([sys.executable, "-c", WATCHED, seen, "sft.py", "--model", model, "--data", data, "--dtype",
                        dtype, "--activation_checkpointing", "false", "--global_batch", str(args.global_batch),
                        "--micro_batch", str(args.global_batch), "--max_steps", str(args.steps), "--epochs", "100",
                        "--resume", "", "--export_every_epoch", "false", "--out", out], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall_ours = time.time() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    peak_line = next((x for x in p.stdout.splitlines() if x.startswith("peak ")), "peak: not printed")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][-args.steps:]
    ours_tps = [r["tokens_per_s"] for r in rows]
    ours_mfu = [r["mfu"] for r in rows[args.warmup:] if r.get("mfu") is not None]
    ours_dtype, ours_detail = matmuls.matmul_dtype(json.load(open(seen)))
    # TRL
    a = {"root": ROOT, "data": data, "model": model, "out": os.path.join(args.work, "sft_trl"),
         "gb": args.global_batch, "steps": args.steps, "dtype": dtype}
    t = time.time()
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(a)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    wall_trl = time.time() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    res = json.loads(p.stdout.split("RESULT ")[1].splitlines()[0])
    trl_tps = [n / s for n, s in zip(res["tokens"], res["times"])]
    trl_dtype, trl_detail = matmuls.matmul_dtype(res["calls"])

    ours, trl = statistics.median(ours_tps[args.warmup:]), statistics.median(trl_tps[args.warmup:])
    steps = f"steps {args.warmup + 1}..{args.steps}"
    print(f"SmolLM2-135M SFT, {args.steps} steps x {args.global_batch} samples, CPU ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads), --dtype {dtype}; {peak_line}")
    print(f"| trainer | effective matmul dtype | tokens/s, median of {steps} | per step | wall incl. load (s) |")
    print("|---|---|---|---|---|")
    print(f"| sft.py (packed, FSDP2 world 1, no act. ckpt) | {ours_dtype} | {ours:.1f} | "
          f"{', '.join(f'{x:.0f}' for x in ours_tps)} | {wall_ours:.0f} |")
    print(f"| TRL 1.16 SFTTrainer (padded, grad ckpt {res['grad_ckpt']}, mixed_precision {res['mixed_precision']}) "
          f"| {trl_dtype} | {trl:.1f} | {', '.join(f'{x:.0f}' for x in trl_tps)} | {wall_trl:.0f} |")
    print(f"matmuls seen: sft.py: {ours_detail}\n              TRL: {trl_detail}")
    if ours_mfu:
        print(f"sft.py MFU (median of {steps}): {100 * statistics.median(ours_mfu):.1f} % of the measured {dtype} peak")
    ratio, why = matmuls.same_dtype_ratio(ours, trl, ours_dtype, trl_dtype)
    if ratio is None:
        print(why)
        raise SystemExit(1)
    print(f"ratio sft.py / TRL tokens/s = {ratio:.2f}x, {why} (target >= 2x)")


if __name__ == "__main__":
    main()
