"""GRPO step time, side by side in one run: grpo.py (hf engine) vs TRL 1.16 GRPOTrainer (use_vllm false).

    .venv/bin/pip install -r bench/requirements.txt && .venv/bin/python bench/grpo_vs_trl.py [--steps 3]

Same real model (SmolLM2-135M-Instruct, fp32, CPU), same prompts (MedQA-USMLE test questions from
../shared/data/real when present, else the bundled ones, rendered with the recipe's prompt), same reward (the
strict recipe reward), 8 prompts x 4 responses x 64 new tokens, beta 0.01 (a reference model), one update per step,
temperature 1. Reported: seconds per step after the first, and the ratio (target <= 0.5x of TRL's time).
Where the time goes for us: each prompt is prefilled once per group (TRL prefills it once per response), decoding
drops finished rows, and the update scores each group as one prompt with branching responses (no padding).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRL_SCRIPT = r'''
import json, sys, time, torch
A = json.loads(sys.argv[1])
sys.path.insert(0, A["root"])
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
cfg = GRPOConfig(output_dir=A["out"], per_device_train_batch_size=32, num_generations=4, gradient_accumulation_steps=1,
                 max_completion_length=64, temperature=1.0, beta=0.01, learning_rate=1e-6, max_steps=A["steps"],
                 use_vllm=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                 shuffle_dataset=False, dataloader_num_workers=0)
tok = AutoTokenizer.from_pretrained(A["model"])
model = AutoModelForCausalLM.from_pretrained(A["model"], dtype=torch.float32)
trainer = GRPOTrainer(model=model, reward_funcs=strict, args=cfg, train_dataset=ds, processing_class=tok,
                      callbacks=[Clock()])
trainer.train()
print("RESULT " + json.dumps({"times": times}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench"))
    args = ap.parse_args()
    from common.testmodels import convert_smollm2

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
    p_len = sum(prompts.prompt_tokens(None, tok, i) for i in its) / len(its)

    out = os.path.join(args.work, "grpo_ours")
    t = time.time()
    subprocess.run([sys.executable, "grpo.py", "--model", model, "--data", data, "--engine", "hf", "--dtype", "fp32",
                    "--group_size", "4", "--train_batch", "8", "--mini_batch", "8", "--max_new_tokens", "64",
                    "--temperature", "1.0", "--kl_coef", "0.01", "--lr", "1e-6", "--max_steps", str(args.steps),
                    "--shuffle", "false", "--activation_checkpointing", "false", "--rollout_batch", "8",
                    "--save_every", "0", "--resume", "", "--out", out], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    wall_ours = time.time() - t
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][-args.steps:]
    ours = [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows]
    a = {"root": ROOT, "data": data, "model": model, "out": os.path.join(args.work, "grpo_trl"), "steps": args.steps}
    t = time.time()
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(a)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    wall_trl = time.time() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    trl = json.loads(p.stdout.split("RESULT ")[1].splitlines()[0])["times"]
    mo, mt = sum(ours[1:]) / len(ours[1:]), sum(trl[1:]) / len(trl[1:])
    print(f"SmolLM2-135M GRPO, 8 prompts x 4 x 64 new tokens, beta 0.01, mean prompt {p_len:.0f} tokens, CPU fp32 "
          f"({os.cpu_count()} cores), {args.steps} steps")
    print("| trainer | s/step (steps 2..) | per step | wall incl. load (s) |\n|---|---|---|---|")
    print(f"| grpo.py (hf engine) | {mo:.1f} | {', '.join(f'{x:.1f}' for x in ours)} | {wall_ours:.0f} |")
    print(f"| TRL 1.16 GRPOTrainer | {mt:.1f} | {', '.join(f'{x:.1f}' for x in trl)} | {wall_trl:.0f} |")
    phases = {k[5:]: round(sum(r[k] for r in rows[1:]) / len(rows[1:]), 1) for k in rows[0] if k.startswith("time/")}
    print(f"grpo.py phases (s): {phases}")
    print(f"ratio grpo.py / TRL time = {mo / mt:.2f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
