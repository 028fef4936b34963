"""Fault trials, shared by tests/test_faults.py (the CI-sized subset) and bench/faults.py (>= 10 kill trials per
stage, one table): kill -9 at random moments, broken checkpoints, NaNs, full/unwritable disks, a dying rank, a fuzz
corpus of malformed rows and files, adversarial completions. Test support, not a test module (pytest collects test_*).

Stages run on the offline tiny Qwen2.5-VL so a trial takes seconds: sft.py (16 steps), grpo.py with the hf engine
(8 steps, KL), evaluate.py (24 VQA-RAD items with their real images). "Exact" means the resumed run's metrics and
final weights (or per-item records and summary) equal the uninterrupted run's, byte for byte.
"""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


def sh(args, env=None, timeout=900, check=True):
    p = subprocess.run([PY, *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    p.stdout += p.stderr
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return p


# ---------------------------------------------------------------------------------------------------------------
# fixtures


def fixtures(work: str) -> dict:
    """Tiny VL model, bundled sample data, the dark/bright toy set and a VQA-RAD eval set (if the real data exists)."""
    from PIL import Image

    from common.testmodels import build_tiny_vl

    os.makedirs(work, exist_ok=True)
    fx = {"model": os.path.join(work, "tiny_vl"), "sample": os.path.join(work, "sample")}
    if not os.path.exists(os.path.join(fx["model"], "config.json")):
        build_tiny_vl(fx["model"])
    if not os.path.exists(os.path.join(fx["sample"], "eval", "manifest.json")):
        sh(["data_prep.py", "sample", "--out", fx["sample"]])
    toy = os.path.join(work, "toy")
    os.makedirs(os.path.join(toy, "img"), exist_ok=True)
    rows = []
    for i in range(16):
        bright = i % 2 == 1
        Image.new("RGB", (56, 56), (235,) * 3 if bright else (15,) * 3).save(os.path.join(toy, "img", f"{i}.png"))
        rows.append({"question": "Is the image dark or bright?", "options": {"A": "Dark", "B": "Bright"},
                     "answer_label": "B" if bright else "A", "answer": "Bright" if bright else "Dark",
                     "dataset_name": "toy", "dataset_index": i, "images": [f"img/{i}.png"]})
    with open(os.path.join(toy, "toy.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    fx["toy"] = os.path.join(toy, "toy.jsonl")
    real = os.path.join(ROOT, "..", "shared", "data", "real", "vqa_rad")
    fx["eval"] = os.path.join(work, "vqa_rad_eval") if os.path.isdir(real) else os.path.join(fx["sample"], "eval")
    if os.path.isdir(real) and not os.path.exists(os.path.join(fx["eval"], "manifest.json")):
        sh(["data_prep.py", "eval", "--vqa_rad", real, "--out", fx["eval"]])
    return fx


def stage_args(stage: str, fx: dict, out: str) -> list:
    if stage == "sft":
        return ["sft.py", "--model", fx["model"], "--data", os.path.join(fx["sample"], "image"), "--dtype", "fp32",
                "--global_batch", "4", "--micro_batch", "2", "--epochs", "2", "--lr", "1e-3", "--warmup_ratio", "0",
                "--save_every", "3", "--out", out]
    if stage == "grpo":
        return ["grpo.py", "--model", fx["model"], "--data", fx["toy"], "--engine", "hf", "--dtype", "fp32",
                "--group_size", "4", "--train_batch", "8", "--mini_batch", "4", "--max_new_tokens", "4", "--lr",
                "3e-3", "--kl_coef", "0.01", "--epochs", "100", "--max_steps", "8", "--save_every", "2",
                "--activation_checkpointing", "false", "--reward", "tests.toy_rewards:image_parity", "--out", out]
    return ["evaluate.py", "--model", fx["model"], "--data", fx["eval"], "--dtype", "fp32", "--limit", "24",
            "--max_new_tokens", "8", "--batch_size", "4", "--runs", "1", "--n_boot", "100", "--out", out]


def fingerprint(stage: str, out: str):
    """What must be identical between an uninterrupted and a killed-then-resumed run."""
    if stage == "evaluate":
        recs = [json.loads(x) for x in open(os.path.join(out, "items.jsonl"))]
        summary = json.load(open(os.path.join(out, "summary.json")))
        return recs, summary["benchmarks"]
    rows = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        r = json.loads(line)
        if "step" in r:
            rows.setdefault(r["step"], {}).update(r)
    keys = ["loss", "grad_norm", "lr"] if stage == "sft" else ["reward", "pg_loss", "kl", "grad_norm", "len_mean"]
    curve = [[rows[s].get(k) for k in keys] for s in sorted(rows) if any(k in rows[s] for k in keys)]
    with open(os.path.join(out, "final", "model.safetensors"), "rb") as f:
        weights = f.read()
    return curve, weights


# ---------------------------------------------------------------------------------------------------------------
# trials


def kill_trial(stage: str, fx: dict, work: str, ref_time: float, seed: int, reference) -> dict:
    """Start a run, SIGKILL it at a random moment, resume it, compare with the uninterrupted run."""
    out = os.path.join(work, f"{stage}_kill_{seed}")
    shutil.rmtree(out, ignore_errors=True)
    delay = random.Random(seed).uniform(0.15, 0.95) * ref_time
    p = subprocess.Popen([PY, *stage_args(stage, fx, out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        p.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        killed = True
    # grpo writes its page before each checkpoint: a run killed after a save has one (issue 13's leftover)
    from common import checkpoint

    saved = stage == "grpo" and checkpoint.latest(os.path.join(out, "ckpt"), report=lambda _: None) is not None
    page = not saved or os.path.exists(os.path.join(out, "report.html"))
    sh(stage_args(stage, fx, out))  # resume (auto) or, for evaluate, pick up the remaining batches
    return {"killed": killed, "delay": round(delay, 1), "exact": fingerprint(stage, out) == reference,
            "page_after_kill": page}


def reference_run(stage: str, fx: dict, work: str):
    out = os.path.join(work, f"{stage}_ref")
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    sh(stage_args(stage, fx, out))
    return time.time() - t, fingerprint(stage, out)


def broken_save_trials(fx: dict, work: str) -> list:
    """Kill between checkpoint files; truncate a shard of a finished save; remove a COMPLETE marker: each time the
    newest complete checkpoint is used, the broken one is reported, and the run ends as the uninterrupted one."""
    results = []
    _, ref = reference_run("sft", fx, work)
    out = os.path.join(work, "sft_brokensave")
    shutil.rmtree(out, ignore_errors=True)
    p = sh(stage_args("sft", fx, out), env={"MEDVL_CRASH": "ckpt_between_files:2"}, check=False)
    q = sh(stage_args("sft", fx, out))
    results.append({"case": "kill between checkpoint files", "recovered": p.returncode == 137 and
                    "interrupted save" in q.stdout and fingerprint("sft", out) == ref})
    for case in ("truncated shard", "missing COMPLETE", "garbage state.json"):
        out = os.path.join(work, "sft_corrupt")
        shutil.rmtree(out, ignore_errors=True)
        sh(stage_args("sft", fx, out), env={"MEDVL_CRASH": "sft_step:8"}, check=False)  # ckpts at 3 and 6
        newest = os.path.join(out, "ckpt", "step_000006")
        if case == "truncated shard":
            shard = next(f for f in sorted(os.listdir(newest)) if f.endswith(".distcp"))
            with open(os.path.join(newest, shard), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(newest, shard)) // 2)
        elif case == "missing COMPLETE":
            os.remove(os.path.join(newest, "COMPLETE"))
        else:
            with open(os.path.join(newest, "state.json"), "w") as f:
                f.write("{not json")
        q = sh(stage_args("sft", fx, out))
        results.append({"case": case, "recovered": "ignoring" in q.stdout and "step 3" in q.stdout.split("resumed")[1]
                        .split("\n")[0] if "resumed" in q.stdout else False})
        results[-1]["recovered"] = results[-1]["recovered"] and fingerprint("sft", out) == ref
    return results


def nan_trials(fx: dict, work: str) -> list:
    out = []
    for stage, point, ok_steps in [("sft", "sft_loss:1", 1), ("sft", "sft_grad:2", 1), ("grpo", "grpo_grad:1", 1)]:
        d = os.path.join(work, f"nan_{stage}")
        shutil.rmtree(d, ignore_errors=True)
        p = sh(stage_args(stage, fx, d) + ["--max_steps", "3"], env={"MEDVL_NAN": point}, check=False)
        skipped = sum(1 for x in open(os.path.join(d, "metrics.jsonl")) if '"skipped": 1' in x)
        out.append({"case": f"NaN at {point}", "ok": p.returncode == 0 and skipped == ok_steps, "rc": p.returncode,
                    "skipped": skipped, "tail": p.stdout[-1500:]})
    d = os.path.join(work, "nan_stop")
    shutil.rmtree(d, ignore_errors=True)
    p = sh(stage_args("sft", fx, d) + ["--max_bad_steps", "3"], env={"MEDVL_NAN": "sft_grad:1,2,3"}, check=False)
    out.append({"case": "3 NaN steps in a row stop the run", "ok": p.returncode != 0 and "in a row" in p.stdout})
    return out


def disk_trials(fx: dict, work: str) -> list:
    out = []
    blocker = os.path.join(work, "a_file")
    open(blocker, "w").close()
    for stage in ("sft", "grpo", "evaluate"):
        p = sh(stage_args(stage, fx, os.path.join(blocker, "out")), check=False, timeout=300)
        out.append({"case": f"{stage}: output under a regular file", "ok": p.returncode != 0 and
                    "not writable" in p.stdout and "Traceback" not in p.stdout})
    small = os.path.join(work, "tiny_fs")
    os.makedirs(small, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], capture_output=True).returncode == 0
    try:
        target = os.path.join(small, "out") if mounted else os.path.join(work, "roomy")
        extra = [] if mounted else ["--min_free_gb", "1e9"]  # no tmpfs here: ask for more room than any disk has
        p = sh(stage_args("sft", fx, target) + extra, check=False, timeout=300)
        out.append({"case": "sft: disk too small for a checkpoint" + ("" if mounted else " (simulated)"),
                    "ok": p.returncode != 0 and "free" in p.stdout and not os.path.exists(os.path.join(target, "ckpt"))})
    finally:
        if mounted:
            subprocess.run(["umount", small], capture_output=True)
    return out


def rank_death_trial(fx: dict, work: str) -> dict:
    """Two gloo ranks; rank 1 dies at step 3: the run must end with an error in bounded time, not hang."""
    out = os.path.join(work, "rank_death")
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    p = sh(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *stage_args("sft", fx, out),
            "--micro_batch", "1", "--timeout_s", "30"], env={"MEDVL_CRASH": "sft_step:3", "MEDVL_CRASH_RANK": "1"},
           check=False, timeout=240)
    return {"case": "rank 1 of 2 killed mid-run", "ok": p.returncode != 0, "seconds": round(time.time() - t, 1)}


# ---------------------------------------------------------------------------------------------------------------
# fuzz corpus


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def fuzz_corpus(folder: str) -> tuple[str, int, int]:
    """A jsonl of malformed rows (each a different way to be wrong) interleaved with valid ones, plus image files.
    Returns (path, bad rows, good rows)."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    img = lambda name: os.path.join(folder, "img", name)  # noqa: E731
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img("ok.png"))
    Image.new("CMYK", (64, 48), (0, 200, 0, 0)).save(img("cmyk.jpg"))  # convertible: kept
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 9).astype(np.uint16)).save(img("grey16.png"))  # kept
    open(img("zero.png"), "wb").close()
    with open(img("trunc.png"), "wb") as f:
        f.write(_png(Image.new("RGB", (64, 64), "blue"))[:70])
    with open(img("noise.png"), "wb") as f:
        f.write(os.urandom(3000))
    with open(img("text.png"), "w") as f:
        f.write("this is not an image")
    Image.new("RGB", (1, 1)).save(img("one.png"))
    Image.new("RGB", (2, 2)).save(img("two.png"))
    Image.new("1", (20000, 20000)).save(img("huge.png"))  # 400 M pixels, a few hundred KB compressed
    Image.new("RGB", (3000, 10)).save(img("thin.png"))
    with open(img("sparse.png"), "wb") as f:
        f.truncate(60 * 2**20)  # a 60 MB file (sparse: costs no disk)
    os.makedirs(img("adir.png"), exist_ok=True)
    good = {"question": "Which colour?", "options": {"A": "Red", "B": "Blue"}, "answer_label": "A", "answer": "Red",
            "dataset_name": "fuzz", "images": ["img/ok.png"]}
    bad = [
        {k: v for k, v in good.items() if k != "question"}, {k: v for k, v in good.items() if k != "options"},
        {k: v for k, v in good.items() if k != "answer_label"}, {k: v for k, v in good.items() if k != "answer"},
        {k: v for k, v in good.items() if k != "dataset_name"}, {**good, "dataset_index": None},
        {**good, "question": 7}, {**good, "question": ["q"]}, {**good, "options": 5}, {**good, "options": "[1, 2]"},
        {**good, "options": {}}, {**good, "options": {"A": "Red"}}, {**good, "options": '{"A": "Red", "A": "Blue"}'},
        {**good, "options": {"A": "Red", "B": ""}}, {**good, "options": {"A": "Red", "B": 3}},
        {**good, "options": '{"A": "Red", "B"'}, {**good, "answer_label": "C"}, {**good, "answer_label": "a"},
        {**good, "answer": "Blue"}, {**good, "answer_label": 1}, {**good, "dataset_index": "7"},
        {**good, "dataset_index": 7.5}, {**good, "dataset_index": True}, {**good, "question": ""},
        {**good, "question": "   \n "}, {**good, "question": "x" * 20000}, {**good, "question": "bad\x00byte"},
        {**good, "options": {"A": "Red\x1b[2J", "B": "Blue"}}, {**good, "question": "lone \ud800 surrogate"},
        {**good, "images": "img/ok.png"}, {**good, "images": [5]}, {**good, "images": ["img/missing.png"]},
        {**good, "images": ["../../../etc/passwd"]}, {**good, "images": ["/etc/passwd"]},
        {**good, "images": ["img/zero.png"]}, {**good, "images": ["img/trunc.png"]}, {**good, "images": ["img/noise.png"]},
        {**good, "images": ["img/text.png"]}, {**good, "images": ["img/one.png"]}, {**good, "images": ["img/two.png"]},
        {**good, "images": ["img/huge.png"]}, {**good, "images": ["img/thin.png"]}, {**good, "images": ["img/sparse.png"]},
        {**good, "images": ["img/adir.png"]}, {**good, "reasoning": 12}, {**good, "dataset_name": 3},
        {**good, "answer": None}, {**good, "options": {"A": {"t": "Red"}, "B": "Blue"}},
        {**good, "images": ["img/ok.png", "img/zero.png"]},
    ]
    raw_lines = [b"\xff\xfe not utf-8 at all\n", b'{"question": "cut off half way\n', b"[1, 2, 3]\n", b"null\n",
                 b'"just a string"\n']
    valid = [good, {**good, "images": ["img/cmyk.jpg"]}, {**good, "images": ["img/grey16.png"]},
             {**good, "extra_field": "kept", "images": None}]
    lines, n_good, idx = [], 0, 0
    for i, row in enumerate(bad):
        if "dataset_index" not in row:
            row = {**row, "dataset_index": 1000 + i}
        lines.append(json.dumps(row, ensure_ascii=True).encode() + b"\n")
        if i % 4 == 3:  # a valid row between every few bad ones
            v = valid[idx % len(valid)]
            lines.append(json.dumps({**v, "dataset_index": idx}).encode() + b"\n")
            idx += 1
            n_good += 1
    lines[10:10] = raw_lines
    path = os.path.join(folder, "fuzz.jsonl")
    with open(path, "wb") as f:
        f.writelines(lines)
    return path, len(bad) + len(raw_lines), n_good


def fuzz_trials(fx: dict, work: str) -> dict:
    from common.data import load_rows

    folder = os.path.join(work, "fuzz")
    shutil.rmtree(folder, ignore_errors=True)
    path, n_bad, n_good = fuzz_corpus(folder)
    out = os.path.join(folder, "prep")
    p = sh(["data_prep.py", "eval", "--source", path, "--out", out], check=False)
    man = json.load(open(os.path.join(out, "manifest.json"))) if p.returncode == 0 else {}
    rej = [json.loads(x) for x in open(os.path.join(out, "rejects.jsonl"))] if p.returncode == 0 else []
    kept = len(load_rows(out)) if p.returncode == 0 else -1
    ev = os.path.join(folder, "eval")
    q = sh(["evaluate.py", "--model", fx["model"], "--data", path, "--dtype", "fp32", "--max_new_tokens", "2",
            "--runs", "1", "--n_boot", "50", "--out", ev], check=False)
    s = json.load(open(os.path.join(ev, "summary.json"))) if q.returncode == 0 else {}
    files = []
    for name, make in [("corrupt.parquet", lambda p: open(p, "wb").write(os.urandom(500))),
                       ("empty.jsonl", lambda p: open(p, "wb").close()), ("nodata", lambda p: os.makedirs(p))]:
        fp = os.path.join(folder, name)
        make(fp)
        r = sh(["data_prep.py", "eval", "--source", fp, "--out", os.path.join(folder, "f_" + name)], check=False)
        files.append(r.returncode == 0 or ("Traceback" not in r.stdout and fp in r.stdout))
    return {"bad_rows": n_bad, "good_rows": n_good,
            "prep_rejected_with_reason": sum(1 for r in rej if r.get("reason")), "prep_kept": kept,
            "prep_ok": p.returncode == 0 and man.get("rows_rejected") == n_bad and kept == n_good,
            "eval_ok": q.returncode == 0 and s.get("skipped_rows") == n_bad and
            sum(b["n_items"] for b in s.get("benchmarks", {}).values()) == n_good,
            "files_ok": all(files), "no_tmp_left": not any(".tmp-" in x for x in os.listdir(folder))}


def reward_trials() -> dict:
    from common import grading
    from tests.test_grading import ADVERSARIAL, OPTS  # the grader's own adversarial table

    scores = [grading.strict_reward(r, OPTS.get(lbl, "Kelvin"), lbl) for r, lbl in ADVERSARIAL]
    big = ["<think>" + "</think><answer></answer>x" * 40000, "<answer>" * 130000, "<think>" + "<answer>" * 120000,
           "<think>" + "x" * (2**20) + "</think><answer>A</answer>"]
    times = []
    for s in big:
        t = time.perf_counter()
        grading.strict_reward(s, "x", "A")
        grading.lenient_correct(s, "x", "A")
        times.append(time.perf_counter() - t)
    return {"adversarial": len(scores), "zero": sum(x == 0 for x in scores), "max_ms_1mb": 1000 * max(times)}
