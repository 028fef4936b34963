"""GRPO step time, side by side in one run: grpo.py (hf engine) vs TRL 1.16 GRPOTrainer (use_vllm false), same dtype.

    .venv/bin/pip install -r bench/requirements.txt && .venv/bin/python bench/grpo_vs_trl.py [--steps 4] [--dtype auto]

Same real model (SmolLM2-135M-Instruct, CPU), same prompts (MedQA-USMLE test questions from ../shared/data/real
when present, else the bundled ones, rendered with the recipe's prompt), same reward (the strict recipe reward),
8 prompts x 4 responses x 64 new tokens, beta 0.01 (a reference model), one update per step, temperature 1.

Same work on both sides: TRL's configs default to bf16=True (autocast) and gradient_checkpointing=True even with
use_cpu=True, so both are set here explicitly to match grpo.py: `--dtype auto` = bf16 where the CPU has native bf16
(avx512_bf16 / amx_bf16), else fp32; activation checkpointing off. Each side's *effective* dtype is then read from
the running process (every linear matmul counted by output dtype, autocast included: bench/matmuls.py) and printed;
when the two differ, the bench prints no ratio and exits 1.
Reported: median seconds per step over the steps after the `--warmup` steps, grpo.py's phases and its update-phase
MFU against this machine's measured matmul peak, and the ratio (target <= 0.2x of TRL's time).
Where the time goes for us: each prompt is prefilled once per group (TRL prefills it once per response), decoding
drops finished rows, and the update scores each group as one prompt with branching responses (no padding).
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
sys.path.insert(0, A["root"])
from bench import matmuls
calls, _ = matmuls.watch_matmuls()
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from common import grading, prompts
from common.data import load_rows, parse_row
rows = [parse_row(r) for r in load_rows(A["data"])][: 8 * A["steps"]]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": prompts.user_text(it.question, it.options)}],
                         "answer": it.answer, "answer_label": it.answer_label} for it in rows])
def strict(completions, answer, answer_label, **kw):
    return [grading.strict_reward(c[0]["content"], a, l) for c, a, l in zip(completions, answer, answer_label)]
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
# bf16/fp16/gradient_checkpointing set explicitly: TRL's own defaults are bf16=True and gradient_checkpointing=True.
# The reference model TRL builds itself loads in fp32 (its default), like the policy here.
# One optimizer step = one generation batch of 32 completions (8 prompts x 4), as in grpo.py; the backward runs in
# micro-batches of A["micro"] completions (steps_per_generation = gradient_accumulation_steps = 32 / micro).
cfg = GRPOConfig(output_dir=A["out"], per_device_train_batch_size=A["micro"], num_generations=4,
                 gradient_accumulation_steps=32 // A["micro"],
                 max_completion_length=64, temperature=1.0, beta=0.01, learning_rate=1e-6, max_steps=A["steps"],
                 use_vllm=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                 shuffle_dataset=False, dataloader_num_workers=0,
                 bf16=A["dtype"] == "bf16", fp16=False, gradient_checkpointing=False)
tok = AutoTokenizer.from_pretrained(A["model"])
model = AutoModelForCausalLM.from_pretrained(A["model"], dtype=torch.float32)
trainer = GRPOTrainer(model=model, reward_funcs=strict, args=cfg, train_dataset=ds, processing_class=tok,
                      callbacks=[Clock()])
trainer.train()
print("RESULT " + json.dumps({"times": times, "calls": [[*k, v] for k, v in calls.items()],
                              "grad_ckpt": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
                              "mixed_precision": str(trainer.accelerator.mixed_precision)}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 if this CPU has native bf16, else fp32) | fp32 | bf16")
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench"))
    ap.add_argument("--trl_micro", type=int, default=8, choices=(4, 8, 16, 32),
                    help="TRL's completions per backward (32 in one was OOM-killed at 23.6 GB RSS on 24 GB here)")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup} to take the median of")
    import torch

    from common import speed
    from common.testmodels import convert_smollm2

    dtype = speed.auto_dtype() if args.dtype == "auto" else args.dtype
    speed.check_dtype(dtype, torch.device("cpu"))
    model = convert_smollm2(os.path.join(args.work, "smollm2"))
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    medqa = os.path.join(ROOT, "..", "shared", "data", "real", "medqa_usmle_4opt", "test.jsonl")
    data = os.path.join(args.work, "medqa" if os.path.exists(medqa) else "sample")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        cmd = ["text", "--medqa", medqa, "--out", data] if os.path.exists(medqa) else ["sample", "--out", data]
        subprocess.run([sys.executable, "data_prep.py", *cmd], cwd=ROOT, check=True, capture_output=True, env=env)
    if not os.path.exists(medqa):
        data = os.path.join(data, "text")
    from common import prompts
    from common.data import load_rows, parse_row
    from common.model import load_processor

    _, tok = load_processor(model)
    its = [parse_row(r) for r in list(load_rows(data))[: 8 * args.steps]]
    if len(its) < 8 * args.steps:
        raise SystemExit(f"{data} has {len(its)} prompts; {args.steps} steps need {8 * args.steps}")
    p_len = sum(prompts.prompt_tokens(None, tok, i) for i in its) / len(its)

    # ours
    out = os.path.join(args.work, "grpo_ours")
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start it empty
    seen = os.path.join(args.work, "grpo_ours_matmuls.json")
    t = time.time()
    p = subprocess.run([sys.executable, "-c", WATCHED, seen, "grpo.py", "--model", model, "--data", data, "--engine",
                        "hf", "--dtype", dtype, "--group_size", "4", "--train_batch", "8", "--mini_batch", "8",
                        "--max_new_tokens", "64", "--temperature", "1.0", "--kl_coef", "0.01", "--lr", "1e-6",
                        "--max_steps", str(args.steps), "--shuffle", "false", "--activation_checkpointing", "false",
                        "--rollout_batch", "8", "--save_every", "0", "--resume", "", "--out", out], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    wall_ours = time.time() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    peak_line = next((x for x in p.stdout.splitlines() if x.startswith("peak ")), "peak: not printed")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if "reward" in r][-args.steps:]  # training steps only
    ours = [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows]
    ours_dtype, ours_detail = matmuls.matmul_dtype(json.load(open(seen)))
    # TRL
    a = {"root": ROOT, "data": data, "model": model, "out": os.path.join(args.work, "grpo_trl"), "steps": args.steps,
         "dtype": dtype, "micro": args.trl_micro}
    t = time.time()
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(a)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    wall_trl = time.time() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    res = json.loads(p.stdout.split("RESULT ")[1].splitlines()[0])
    trl = res["times"]
    trl_dtype, trl_detail = matmuls.matmul_dtype(res["calls"])

    mo, mt = statistics.median(ours[args.warmup:]), statistics.median(trl[args.warmup:])
    steps = f"steps {args.warmup + 1}..{args.steps}"
    print(f"SmolLM2-135M GRPO, 8 prompts x 4 x 64 new tokens, beta 0.01, mean prompt {p_len:.0f} tokens, CPU "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} threads), --dtype {dtype}, {args.steps} steps; "
          f"{peak_line}")
    print(f"| trainer | effective matmul dtype | s/step, median of {steps} | per step | wall incl. load (s) |")
    print("|---|---|---|---|---|")
    print(f"| grpo.py (hf engine, no act. ckpt) | {ours_dtype} | {mo:.1f} | {', '.join(f'{x:.1f}' for x in ours)} | "
          f"{wall_ours:.0f} |")
    print(f"| TRL 1.16 GRPOTrainer (grad ckpt {res['grad_ckpt']}, mixed_precision {res['mixed_precision']}, "
          f"micro-batch {args.trl_micro}) | "
          f"{trl_dtype} | {mt:.1f} | {', '.join(f'{x:.1f}' for x in trl)} | {wall_trl:.0f} |")
    print(f"matmuls seen: grpo.py: {ours_detail}\n              TRL: {trl_detail}")
    timed = rows[args.warmup:]
    phases = {k[5:]: round(statistics.median(r[k] for r in timed), 1) for k in rows[0] if k.startswith("time/")}
    mfu = [r["mfu_update"] for r in timed if r.get("mfu_update") is not None]
    print(f"grpo.py phases (s, median of {steps}): {phases}"
          + (f"; update-phase MFU {100 * statistics.median(mfu):.1f} % of the measured {dtype} peak" if mfu else ""))
    ratio, why = matmuls.same_dtype_ratio(mo, mt, ours_dtype, trl_dtype)
    if ratio is None:
        print(why)
        raise SystemExit(1)
    print(f"ratio grpo.py / TRL time = {ratio:.2f}x, {why} (target <= 0.2x)")


if __name__ == "__main__":
    main()
