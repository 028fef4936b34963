"""data_prep.py throughput: rows/s on the real VQA-RAD sample, and a large PMC-VQA-shaped run with its peak memory.

    .venv/bin/python bench/data_prep_rows.py                      # VQA-RAD + 100k synthetic PMC-VQA rows
    .venv/bin/python bench/data_prep_rows.py --scale_rows 20000   # a smaller scale run

The scale run writes a PMC-VQA train.csv layout (Figure_path, Question, Answer, Answer_label, Choice A..D) whose
rows point at 64 real-size JPEGs (drawn here), converts it with `data_prep.py pmc_vqa` (cleaning rules, image bounds,
parquet out) and reports rows/s and the peak resident memory of the whole process tree.
"""

import argparse
import csv
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(args, env) -> tuple[float, float]:
    """(seconds, peak RSS GiB of the children so far) for one data_prep.py command."""
    t = time.time()
    subprocess.run([sys.executable, "data_prep.py", *args], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale_rows", type=int, default=100_000)
    ap.add_argument("--num_proc", type=int, default=0)
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "bench", "data_prep"))
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.makedirs(args.work, exist_ok=True)
    print(f"data_prep.py throughput, {os.cpu_count()} CPU cores")
    print("| run | rows in | seconds | rows/s | peak RSS (GiB) |\n|---|---|---|---|---|")

    real = os.path.join(ROOT, "..", "shared", "data", "real", "vqa_rad")
    if os.path.isdir(real):
        from common.testmodels import build_tiny_vl

        tok = os.path.join(args.work, "tiny_vl")
        if not os.path.exists(os.path.join(tok, "config.json")):
            build_tiny_vl(tok)
        for label, extra in [("VQA-RAD eval (221 closed, decode + validate)", []),
                             ("VQA-RAD eval + prompt-token count", ["--tokenizer", tok])]:
            run(["eval", "--vqa_rad", real, "--out", os.path.join(args.work, "vqa_rad"), *extra], env)  # warm cache
            s, rss = run(["eval", "--vqa_rad", real, "--out", os.path.join(args.work, "vqa_rad"), *extra], env)
            print(f"| {label} | 221 | {s:.1f} | {221 / s:.0f} | {rss:.2f} |")

    # a PMC-VQA-shaped csv pointing at real-size JPEGs
    img_dir = os.path.join(args.work, "pmc_images")
    os.makedirs(img_dir, exist_ok=True)
    rng = random.Random(0)
    from PIL import Image, ImageDraw

    for k in range(64):
        path = os.path.join(img_dir, f"fig{k}.jpg")
        if not os.path.exists(path):
            w, h = rng.choice([(640, 480), (1400, 900), (320, 320), (2048, 1536)])
            im = Image.new("RGB", (w, h), (rng.randrange(256), 80, 80))
            ImageDraw.Draw(im).ellipse([w // 4, h // 4, w // 2, h // 2], fill=(250, 250, 250))
            im.save(path, quality=85)
    csv_path = os.path.join(args.work, f"train_{args.scale_rows}.csv")
    if not os.path.exists(csv_path):
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Figure_path", "Question", "Answer", "Answer_label", "Choice A", "Choice B", "Choice C", "Choice D"])
            for i in range(args.scale_rows):
                label = "ABCD"[i % 4]
                opts = [f"finding {i % 97} variant {j}" for j in range(4)]
                w.writerow([f"fig{i % 64}.jpg", f"What does panel {i} show?", opts["ABCD".index(label)], label,
                            *[f" {L}:{o}" for L, o in zip("ABCD", opts)]])
    out = os.path.join(args.work, "pmc_out")
    s, rss = run(["pmc_vqa", "--csv_path", csv_path, "--images", img_dir, "--out", out,
                  "--num_proc", str(args.num_proc)], env)
    print(f"| PMC-VQA-shaped csv -> parquet (bounded images) | {args.scale_rows} | {s:.0f} | {args.scale_rows / s:.0f} "
          f"| {rss:.2f} |")
    size = os.path.getsize(os.path.join(out, "data.parquet")) / 2**30
    print(f"output {size:.2f} GiB parquet; peak RSS is the largest single process (ru_maxrss of the children)")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
