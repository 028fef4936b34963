"""Fault trials at full size: >= 10 kill -9 trials per stage plus every other trial of tests/fault_trials.py, as one
table in which every line should read 100 %.

    .venv/bin/python bench/faults.py                 # >= 10 kill trials per stage (~25 min on 2 cores)
    .venv/bin/python bench/faults.py --trials 2      # the CI-sized subset (tests/test_faults.py runs the same code)
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.fault_trials import (broken_save_trials, disk_trials, fixtures, fuzz_trials, kill_trial,  # noqa: E402
                                nan_trials, rank_death_trial, reference_run, reward_trials)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10, help="kill trials per stage")
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "faults"))
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    fx = fixtures(args.work)
    rows = []
    for stage in ("sft", "grpo", "evaluate"):
        ref_time, ref = reference_run(stage, fx, args.work)
        res = [kill_trial(stage, fx, args.work, ref_time, args.seed + k, ref) for k in range(args.trials)]
        killed = [r for r in res if r["killed"]]
        rows.append((f"{stage}: kill -9 at a random moment, then resume", f"{sum(r['exact'] for r in res)}/{len(res)} "
                     f"exact ({len(killed)} killed mid-run)", all(r["exact"] for r in res)))
    bs = broken_save_trials(fx, args.work)
    rows.append(("broken checkpoints recovered (" + ", ".join(r["case"] for r in bs) + ")",
                 f"{sum(r['recovered'] for r in bs)}/{len(bs)}", all(r["recovered"] for r in bs)))
    nn = nan_trials(fx, args.work)
    rows.append(("NaN/inf: step skipped and logged; K in a row stop", f"{sum(r['ok'] for r in nn)}/{len(nn)}",
                 all(r["ok"] for r in nn)))
    dk = disk_trials(fx, args.work)
    rows.append(("unwritable / too-small output folder: clear error before work", f"{sum(r['ok'] for r in dk)}/{len(dk)}",
                 all(r["ok"] for r in dk)))
    rd = rank_death_trial(fx, args.work)
    rows.append(("a rank dies: the run stops with an error, no hang", f"{int(rd['ok'])}/1 ({rd['seconds']} s)", rd["ok"]))
    fz = fuzz_trials(fx, args.work)
    rows.append((f"fuzz: {fz['bad_rows']} malformed rows among {fz['good_rows']} valid (data_prep)",
                 f"{fz['prep_rejected_with_reason']}/{fz['bad_rows']} rejected with reason, {fz['prep_kept']}/"
                 f"{fz['good_rows']} valid kept", fz["prep_ok"]))
    rows.append(("fuzz: the same rows through evaluate.py", "all counted and skipped" if fz["eval_ok"] else "MISMATCH",
                 fz["eval_ok"]))
    rows.append(("fuzz: malformed files (corrupt parquet, empty jsonl, no data)", "clear outcome" if fz["files_ok"]
                 else "crash", fz["files_ok"] and fz["no_tmp_left"]))
    rw = reward_trials()
    rows.append(("adversarial completions score 0", f"{rw['zero']}/{rw['adversarial']}", rw["zero"] == rw["adversarial"]))
    rows.append(("1 MB completions graded (linear time)", f"max {rw['max_ms_1mb']:.0f} ms", rw["max_ms_1mb"] < 2000))
    print("\n| trial | result | pass |\n|---|---|---|")
    for name, result, ok in rows:
        print(f"| {name} | {result} | {'100 %' if ok else 'FAIL'} |")
    sys.exit(0 if all(ok for _, _, ok in rows) else 1)


if __name__ == "__main__":
    main()
