"""sft.py and grpo.py step times at two commits, in one run on one machine, plus the line count of every .py file.

    .venv/bin/python bench/step_times.py --before e6f7fca --after HEAD [--sft_steps 6] [--grpo_steps 3]

A refactor must not make a step slower: this checks out both commits as detached worktrees (the working tree is
used for `--after WORKTREE`), runs the same short SmolLM2-135M jobs with each (fp32, CPU, same data and seeds),
alternating before/after so that machine drift hits both, and prints the median step time after the first step
(`time/*` fields of metrics.jsonl summed) and the ratio after/before. Jobs run one at a time: two cores are little.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def checkout(rev: str, where: str) -> str:
    """A detached worktree of `rev` under `where` (WORKTREE = this checkout as it is)."""
    if rev == "WORKTREE":
        return ROOT
    path = os.path.join(where, rev.replace("/", "_"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", path, rev], cwd=ROOT, check=True,
                   capture_output=True)
    return path


def step_times(tree: str, script: str, args: list, out: str, env: dict) -> list:
    """Per-step seconds of one run of `script` in `tree`: the sum of a step's time/* metrics (grpo.py), else the
    time between consecutive steps' log stamps (sft.py; the first step then has none and is left out)."""
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, script, *args, "--out", out], cwd=tree, env={**env, "PYTHONPATH": tree},
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{script} in {tree} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    timed = [r for r in rows if any(k.startswith("time/") for k in r)]
    if timed:
        return [sum(v for k, v in r.items() if k.startswith("time/")) for r in timed]
    stamps = [r["time"] for r in rows if "loss" in r]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def line_counts(tree: str) -> dict:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=tree, capture_output=True, text=True).stdout.split()
    if tree == ROOT:  # the working tree: untracked files count too
        files += subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=tree,
                                capture_output=True, text=True).stdout.split()
    return {f: sum(1 for _ in open(os.path.join(tree, f))) for f in sorted(set(files)) if os.path.exists(os.path.join(tree, f))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="e6f7fca", help="a commit (the state before the refactor)")
    ap.add_argument("--after", default="WORKTREE", help="a commit, or WORKTREE for this checkout as it is")
    ap.add_argument("--sft_steps", type=int, default=6)
    ap.add_argument("--grpo_steps", type=int, default=3)
    ap.add_argument("--jobs", default="sft,grpo", help="which of sft,grpo to time")
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench"))
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    from common.testmodels import convert_smollm2

    model = convert_smollm2(os.path.join(args.work, "smollm2"))
    data = os.path.join(args.work, "sample", "text")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if not os.path.exists(data):
        subprocess.run([sys.executable, "data_prep.py", "sample", "--out", os.path.dirname(data)], cwd=ROOT, check=True,
                       env={**env, "PYTHONPATH": ROOT}, capture_output=True)
    sft = ["--model", model, "--data", data, "--dtype", "fp32", "--activation_checkpointing", "false",
           "--global_batch", "8", "--micro_batch", "8", "--max_steps", str(args.sft_steps), "--epochs", "100",
           "--resume", "", "--export_every_epoch", "false"]
    grpo = ["--model", model, "--data", data, "--engine", "hf", "--dtype", "fp32", "--group_size", "4",
            "--train_batch", "8", "--mini_batch", "8", "--max_new_tokens", "32", "--temperature", "1.0",
            "--kl_coef", "0.01", "--max_steps", str(args.grpo_steps), "--shuffle", "false",
            "--activation_checkpointing", "false", "--rollout_batch", "8", "--save_every", "0", "--resume", "",
            "--val_before_train", "false", "--val_every", "0"]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        trees = {"before": checkout(args.before, tmp), "after": checkout(args.after, tmp)}
        try:
            res = {}
            for job, script, flags in (("sft", "sft.py", sft), ("grpo", "grpo.py", grpo)):
                if job not in jobs:
                    continue
                for side, tree in trees.items():
                    times = step_times(tree, script, flags, os.path.join(tmp, f"{job}_{side}"), env)
                    res[(job, side)] = times
                    print(f"{job} {side}: " + ", ".join(f"{t:.2f}" for t in times), flush=True)
            lines = {side: line_counts(tree) for side, tree in trees.items()}
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, capture_output=True)
    print(f"\nSmolLM2-135M fp32, CPU ({os.cpu_count()} cores); before = {args.before}, after = {args.after}")
    print("| job | before s/step | after s/step | after/before |\n|---|---|---|---|")
    for job in jobs:
        b, a = (statistics.median(res[(job, s)][1:]) for s in ("before", "after"))
        print(f"| {job} (median after the first timed step) | {b:.2f} | {a:.2f} | {a / b:.2f}x |")
    print("\n| file | before | after |\n|---|---|---|")
    for f in sorted(set(lines["before"]) | set(lines["after"])):
        b, a = lines["before"].get(f, "-"), lines["after"].get(f, "-")
        if b != a:
            print(f"| {f} | {b} | {a} |")
    print(f"| total .py | {sum(lines['before'].values())} | {sum(lines['after'].values())} |")


if __name__ == "__main__":
    main()
