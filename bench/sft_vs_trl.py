"""SFT throughput, side by side in one run: sft.py vs TRL 1.16 SFTTrainer, same model, data and global batch.

    .venv/bin/pip install -r bench/requirements.txt && .venv/bin/python bench/sft_vs_trl.py [--steps 6]

Model: the real SmolLM2-135M-Instruct (fp32, CPU). Data: the bundled reasoning traces (variable lengths), rendered
the same way for both (our prompt, chat template, `<think> .. </think>\\n<answer> L </answer>` target) with the loss
on the completion only. Global batch 8 samples; ours packs them into one padding-free row, TRL pads (its default).
Reported: real (non-pad) tokens per second of the optimizer steps after the first (warm-up) step, and the ratio.
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
ROOT, DATA, MODEL, OUT, GB, STEPS = A["root"], A["data"], A["model"], A["out"], A["gb"], A["steps"]
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
sys.path.insert(0, ROOT)
from common import prompts
from common.data import load_rows, parse_row
rows = [parse_row(r) for r in load_rows(DATA)]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": prompts.user_text(it.question, it.options)}],
                         "completion": [{"role": "assistant", "content": prompts.sft_target(it.reasoning, it.answer_label)}]}
                        for it in rows])
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
times, tokens = [], []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
cfg = SFTConfig(output_dir=OUT, per_device_train_batch_size=GB, gradient_accumulation_steps=1, max_steps=STEPS,
                learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.05, adam_beta2=0.95, weight_decay=1e-4,
                use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                completion_only_loss=True, max_length=32768, seed=42)
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
orig = trainer.training_step
def counting_step(model, inputs, *a, **k):
    tokens.append(int(inputs["attention_mask"].sum()))
    return orig(model, inputs, *a, **k)
trainer.training_step = counting_step
trainer.train()
print("RESULT " + json.dumps({"times": times, "tokens": tokens}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global_batch", type=int, default=8)
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench"))
    args = ap.parse_args()
    from common.testmodels import convert_smollm2

    model = convert_smollm2(os.path.join(args.work, "smollm2"))
    data = os.path.join(args.work, "sample", "text")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run([sys.executable, "data_prep.py", "sample", "--out", os.path.join(args.work, "sample")],
                       cwd=ROOT, check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

    # ours
    out = os.path.join(args.work, "sft_ours")
    t = time.time()
    subprocess.run([sys.executable, "sft.py", "--model", model, "--data", data, "--dtype", "fp32", "--global_batch",
                    str(args.global_batch), "--micro_batch", str(args.global_batch), "--max_steps", str(args.steps),
                    "--epochs", "100", "--resume", "", "--export_every_epoch", "false", "--out", out], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    wall_ours = time.time() - t
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][-args.steps:]
    ours_tps = [r["tokens_per_s"] for r in rows[1:]]
    # TRL
    a = {"root": ROOT, "data": data, "model": model, "out": os.path.join(args.work, "sft_trl"),
         "gb": args.global_batch, "steps": args.steps}
    t = time.time()
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(a)], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    wall_trl = time.time() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    res = json.loads(p.stdout.split("RESULT ")[1].splitlines()[0])
    trl_tps = [n / s for n, s in zip(res["tokens"][1:], res["times"][1:])]
    ours, trl = sum(ours_tps) / len(ours_tps), sum(trl_tps) / len(trl_tps)
    print(f"SmolLM2-135M SFT, {args.steps} steps x {args.global_batch} samples, CPU fp32 ({os.cpu_count()} cores)")
    print(f"| trainer | tokens/s (steps 2..{args.steps}) | wall incl. load (s) |\n|---|---|---|")
    print(f"| sft.py (packed, FSDP2 world 1) | {ours:.1f} | {wall_ours:.0f} |")
    print(f"| TRL 1.16 SFTTrainer (padded) | {trl:.1f} | {wall_trl:.0f} |")
    print(f"ratio sft.py / TRL = {ours / trl:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
