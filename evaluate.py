"""Evaluate a model on the six medical VQA benchmarks the recipe's way (RECIPE §7): greedy, 4096 new tokens, 3 runs,
graded by the lenient regrader; tables in the paper's column order with mean +- std over runs, 95 % bootstrap CIs,
pass@k / majority@k when sampling, and a PNG chart.

    python evaluate.py --model 3b                                   # UCSC-VLAA/MedVLThinker-Eval from the hub
    python evaluate.py --model outputs/grpo/hf/final --data data/eval --benchmarks vqa_rad_closed --limit 100
    torchrun --nproc_per_node 8 evaluate.py --model 7b --engine vllm     # one data-parallel shard per rank
    python evaluate.py --model 3b --samples 5 --temperature 0.5          # pass@k and majority@k (the recipe's n=5)
    python evaluate.py compare outputs/eval/base outputs/eval/rl          # paired bootstrap of the difference
    python evaluate.py regrade outputs/eval/rl                           # recompute everything from saved responses
    torchrun --nproc_per_node 8 evaluate.py --model 3b --engine vllm --data data/text --runs 1 --samples 16 \
        --temperature 1.0 --out data/passrate     # the recipe's pass counts (§2.1); data_prep.py filter reads them

Resumable: records are appended per batch and a rerun skips finished batches, so a killed run ends with the same
results as an uninterrupted one. Rows that cannot be used are written to rejects.jsonl and counted in the summary.
An item whose generation fails (the processor or the engine raises on it) costs only itself: it is written to
failed.jsonl with its error, counted in the summary (failed_items, left out of the accuracies as rejected rows are,
as upstream skipped items whose API call failed), tried again on resume, and the run goes on.
"""

import glob
import hashlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from types import SimpleNamespace
from typing import Literal

import numpy as np
from tqdm import tqdm

from common import checkpoint, cli, dist, grading, prompts, report, speed
from common.data import RowError, admit_row, column, data_root, load_image, load_rows, mix_seed, reason_kind, read_row
from common.faults import crash_point
from common.files import atomic_file, check_output, read_jsonl, repair_tail, write_json, write_jsonl
from common.generate import HFEngine, Prompt, generate_each, pick_engine
from common.images import MIN_SIDE
from common.log import git_sha
from common.vllm_engine import VLLMEngine
from common.model import Attn, Dtype, control_strings, load_model, load_processor, resolve

# dataset_name -> column of the paper's tables, in their order (RECIPE §8)
COLUMNS = {"pmc_vqa": "PMC", "MMMU-medical": "MMMU", "MedXpertQA-MM": "MedX-M", "pathvqa_closed": "PathVQA",
           "slake_closed": "SLAKE", "vqa_rad_closed": "VQA-Rad"}
# A result folder resumes only for the same weights (checkpoint.model_id, not the --model spelling) and the same flags
# that shape an answer; --runs, --benchmarks and --limit may grow, the engine and batch size may change.
RESUME_SAME = ("model_id", "data", "split", "samples", "temperature", "top_p", "max_new_tokens", "seed", "dtype",
               "small_images")

# -----------------------------------------------------------------------------------------------------------------
# Pure helpers (tested directly)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for c correct among n samples."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(letters: list, answer_label: str) -> bool:
    """Majority vote over the samples' option letters (unmapped answers do not vote; ties go to the first seen)."""
    votes = Counter(x for x in letters if x is not None)
    return bool(votes) and votes.most_common(1)[0][0] == answer_label


def item_scores(records: list, grader: str = "lenient") -> dict:
    """{(benchmark, index): {run: [correct per sample]}} from per-sample records, under one grader
    (grading.GRADERS). SystemExit if a record lacks the grader's verdict (folders from older versions:
    `evaluate.py regrade` adds it). Failed generations are not records (failed.jsonl)."""
    key = grading.verdict_field(grader)
    out = defaultdict(lambda: defaultdict(list))
    for r in records:
        if key not in r:
            raise SystemExit(f"record {r['dataset_name']} #{r['dataset_index']} has no {key!r}: regrade the folder")
        out[(r["dataset_name"], r["dataset_index"])][r["run"]].append(float(r[key]))
    return out


def bootstrap(groups: list, n_boot: int, rng: np.random.Generator) -> tuple[float, float, np.ndarray]:
    """95 % percentile-bootstrap CI of the unweighted mean over `groups` of each group's mean: (lo, hi, stats).

    What is resampled: items, with replacement, within each group separately (a stratified bootstrap; benchmarks are
    the strata, so each keeps its size). One group is the plain bootstrap of a mean. Each of the `n_boot` resamples
    gives one statistic, `stats` with shape (n_boot,); lo/hi are its 2.5th and 97.5th percentiles, the percentile
    method of Efron & Tibshirani, An Introduction to the Bootstrap (1993), ch. 13. Groups are 1-D arrays of per-item
    scores (any unit: the statistic keeps it). No groups, or an empty one, gives nan. Draws from `rng` in group
    order, one (n_boot, len(group)) block each, so one seeded generator passed to several calls is reproducible."""
    if not groups or any(len(g) == 0 for g in groups):
        return float("nan"), float("nan"), np.full(n_boot, np.nan)
    stats = np.mean([g[rng.integers(0, len(g), size=(n_boot, len(g)))].mean(1) for g in groups], axis=0)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5)), stats


def ordered(names) -> list:
    """Benchmarks in the paper's column order, any others after them alphabetically."""
    return [n for n in COLUMNS if n in names] + sorted(n for n in names if n not in COLUMNS)


def summarise(records: list, n_boot: int = 1000, seed: int = 0, grader: str = "lenient") -> dict:
    """Per-benchmark accuracy (x100) per run under `grader`, mean +- std over runs, bootstrap CI, the strict
    reward's accuracy, and with several samples pass@k and majority@n.

    Graders as upstream used them (RECIPE §7.2-7.3): tables by the lenient regrader; pass@k by the inference grader
    (plot_pass_n.ipynb reads the un-regraded `is_correct`); majority@n by the regrader's option letters
    (plot_metrics_n.ipynb reads regraded results)."""
    scores = item_scores(records, grader)
    strict = item_scores(records, "strict")
    letters = defaultdict(list)
    for r in records:
        letters[(r["dataset_name"], r["dataset_index"], r["run"])].append(r.get("letter"))
    labels = {(r["dataset_name"], r["dataset_index"]): r["answer_label"] for r in records}
    bench = {}
    for name in ordered({b for b, _ in scores}):
        keys = sorted(k for k in scores if k[0] == name)
        runs = sorted({run for k in keys for run in scores[k]})
        per_run = [100 * np.mean([np.mean(scores[k][run]) for k in keys if run in scores[k]]) for run in runs]
        per_item = np.array([grading.item_score(scores[k]) for k in keys]) * 100
        lo, hi, _ = bootstrap([per_item], n_boot, np.random.default_rng(seed))
        n = max(len(v) for k in keys for v in scores[k].values())
        entry = {"n_items": len(keys), "runs": per_run, "mean": float(np.mean(per_run)),
                 "std": float(np.std(per_run, ddof=1)) if len(per_run) > 1 else 0.0, "ci95": [lo, hi],
                 "strict_mean": float(100 * np.mean([grading.item_score(strict[k]) for k in keys])),
                 "format_rate": float(100 * np.mean([r.get("format", False) for r in records if r["dataset_name"] == name])),
                 "samples_per_item": n}
        if n > 1:
            ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n} | {n})
            inference = item_scores([r for r in records if r["dataset_name"] == name], "inference")
            entry["pass@k"] = {str(k): float(100 * np.mean([np.mean([pass_at_k(len(v), int(sum(v)), k)
                                                                      for v in inference[key].values()]) for key in keys]))
                               for k in ks}
            entry[f"maj@{n}"] = float(100 * np.mean([np.mean([majority_correct(letters[(*key, run)], labels[key])
                                                               for run in scores[key]]) for key in keys]))
        bench[name] = entry
    avg = float(np.mean([b["mean"] for b in bench.values()])) if bench else float("nan")
    per_bench_items = [np.array([grading.item_score(scores[k]) for k in sorted(scores) if k[0] == name]) * 100
                       for name in bench]
    avg_lo, avg_hi, _ = bootstrap(per_bench_items, n_boot, np.random.default_rng(seed))
    return {"benchmarks": bench, "avg": avg, "avg_ci95": [avg_lo, avg_hi], "grader": grader,
            "letters": letter_counts(records),
            "pass@k_grader": "inference", "majority_grader": "lenient",
            "avg_note": "unweighted mean over the benchmarks present" +
                        ("" if set(COLUMNS) <= set(bench) else f" ({len(bench)} of the paper's 6)")}


def letter_counts(records: list) -> dict:
    """{benchmark: {"predicted": {letter: n}, "gold": {letter: n}}} over every response (item x run x sample):
    the option letter the lenient grader read from each response ("none" when it names no option) against the
    gold letter. A model that always answers "A" scores the share of A's; this shows it (MedVLSynther rebalances
    letters for the same reason)."""
    out = {}
    for name in ordered({r["dataset_name"] for r in records}):
        mine = [r for r in records if r["dataset_name"] == name]
        out[name] = {"predicted": dict(sorted(Counter(r.get("letter") or "none" for r in mine).items())),
                     "gold": dict(sorted(Counter(r["answer_label"] for r in mine).items()))}
    return out


def protocol_card(config: dict, items: list, rejects: list, failed: list, engine: str, processor, tokenizer) -> dict:
    """How this evaluation was made, for summary.json "protocol", report.html and results.md (issue 19 §3): the
    model (path, weights fingerprint: checkpoint.model_id), the data (path, split, items per benchmark, sha256 of
    the evaluated items' text fields and image sizes), grader, engine, sampling, seeds, the prompt's sha256 (a probe
    item rendered through this model's chat template), rejected and failed items with reasons, images under the
    processor's 28 px minimum per benchmark and what was done with them, and the code's git commit."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.dataset_name, it.dataset_index, it.question, it.options, it.answer, it.answer_label,
                             it.extra.get("sizes")], ensure_ascii=False, default=str).encode())
    probe = SimpleNamespace(question="Q?", options={"A": "a", "B": "b"}, images=[])
    small = Counter(it.dataset_name for it in items if small_image(it.extra.get("sizes") or []))
    small.update(r["dataset_name"] for r in rejects if r.get("small"))  # --small_images skip rejected them
    skip = config["small_images"] == "skip"
    return {
        "model": {"path": config["model"], "weights_id": config["model_id"]},
        "data": {"path": config["data"], "split": config["split"], "items_sha256": h.hexdigest()[:16],
                 "items": dict(Counter(it.dataset_name for it in items))},
        "grader": config["grader"], "engine": engine, "dtype": config["dtype"],
        "max_new_tokens": config["max_new_tokens"], "temperature": config["temperature"], "top_p": config["top_p"],
        "runs": config["runs"], "samples": config["samples"], "seed": config["seed"],
        "prompt_sha256": hashlib.sha256(prompts.prompt_text(processor, tokenizer, probe).encode()).hexdigest()[:16],
        "rejected": {"count": len(rejects), "reasons": dict(Counter(reason_kind(r["reason"]) for r in rejects))},
        "failed": {"count": len({(r["dataset_name"], r["dataset_index"]) for r in failed}),
                   "reasons": dict(Counter(r["error"].split(":")[0] for r in failed))},
        "small_images": {"min_side_px": MIN_SIDE, "items": dict(small),
                         "handling": "skipped (--small_images skip, as MedVLSynther's harness)" if skip else
                         "kept: the processor's smart_resize enlarges them to >= 3136 px^2, sides multiples of 28, "
                         "as upstream's harness did through qwen_vl_utils (RECIPE §7.1, §1.6)"},
        "code": git_sha()}


def small_image(sizes: list) -> bool:
    """Whether any of an item's (width, height) image sizes has a side under the processor's 28 px minimum."""
    return any(min(sz) < MIN_SIDE for sz in sizes)


PROTOCOL_SAME = ("data", "grader", "engine", "dtype", "max_new_tokens", "temperature", "top_p", "runs", "samples",
                 "seed", "prompt_sha256", "small_images")  # compare warns when two results differ in these


def protocol_lines(p: dict) -> list:
    """The protocol card as short "key: value" lines (results.md, the console)."""
    if not p:
        return []
    d, f, r = p["data"], p["failed"], p["rejected"]
    return [f"model: {p['model']['path']} (weights {p['model']['weights_id']})",
            f"data: {d['path']} [{d['split']}] items {d['items']} (sha256 {d['items_sha256']})",
            f"grader {p['grader']}, engine {p['engine']}, {p['dtype']}, max_new_tokens {p['max_new_tokens']}, "
            f"temperature {p['temperature']}, top_p {p['top_p']}, runs {p['runs']}, samples {p['samples']}, "
            f"seed {p['seed']}, prompt sha256 {p['prompt_sha256']}",
            f"rejected {r['count']} {r['reasons']}; failed {f['count']} {f['reasons']}",
            f"images under {p['small_images']['min_side_px']} px: {p['small_images']['items']} "
            f"({p['small_images']['handling']})", f"code: {p['code']}"]


def markdown_table(summary: dict, label: str) -> str:
    names = list(summary["benchmarks"])
    cols = [COLUMNS.get(n, n) for n in names] + ["Avg."]
    cells = [f"{b['mean']:.2f} ± {b['std']:.2f}" for b in summary["benchmarks"].values()] + [f"{summary['avg']:.2f}"]
    ci = [f"[{b['ci95'][0]:.1f}, {b['ci95'][1]:.1f}]" for b in summary["benchmarks"].values()]
    ci.append(f"[{summary['avg_ci95'][0]:.1f}, {summary['avg_ci95'][1]:.1f}]")
    lines = ["| Model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             f"| {label} | " + " | ".join(cells) + " |", "| 95% CI | " + " | ".join(ci) + " |"]
    lines.append(f"\nAccuracy graded by the {summary.get('grader', 'lenient')} grader (common/grading.py).")
    sampled = {n: b for n, b in summary["benchmarks"].items() if "pass@k" in b}
    if sampled:
        ks = sorted({int(k) for b in sampled.values() for k in b["pass@k"]})
        lines += ["", f"| pass@k ({summary.get('pass@k_grader', 'inference')} grader) | "
                  + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        lines += [f"| {COLUMNS.get(n, n)} | " + " | ".join(f"{b['pass@k'][str(k)]:.2f}" if str(k) in b["pass@k"] else ""
                                                          for k in ks) + " |" for n, b in sampled.items()]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["benchmarks"]) + ["Avg."]
    means = [b["mean"] for b in summary["benchmarks"].values()] + [summary["avg"]]
    cis = [b["ci95"] for b in summary["benchmarks"].values()] + [summary["avg_ci95"]]
    err = np.array([[m - lo, hi - m] for m, (lo, hi) in zip(means, cis)]).T
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4))
    ax.bar([COLUMNS.get(n, n) for n in names], means, yerr=err, capsize=4, color=["C0"] * (len(names) - 1) + ["C3"])
    for i, m in enumerate(means):
        ax.text(i, 1.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8, color="white", fontweight="bold")
    ax.set_ylabel("accuracy (%) ± 95% bootstrap CI")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def grade_record(rec: dict, options: dict) -> dict:
    """Fill every grader's verdict (grading.GRADERS, field grading.verdict_field(name)), the lenient extraction, its
    option letter and the format check into a record holding a response."""
    pred = grading.extract_lenient(rec["response"])
    rec["extracted"] = pred
    rec["letter"] = grading.option_letter(pred, options)
    for g, judge in grading.GRADERS.items():
        rec[grading.verdict_field(g)] = judge(rec["response"], rec["answer"], rec["answer_label"])
    rec["format"] = grading.format_ok(rec["response"])
    return rec


def bench_order(name: str) -> tuple:
    keys = list(COLUMNS)
    return (keys.index(name), "") if name in COLUMNS else (len(keys), name)


def read_records(folder: str) -> list:
    """All per-sample records in a result folder (merged file and per-rank shards), de-duplicated, sorted.
    Unreadable lines are skipped and reported: the batch they belonged to counts as not done and is generated again."""
    seen = {}
    for path in sorted(glob.glob(os.path.join(folder, "items*.jsonl"))):
        records, bad = read_jsonl(path)
        if bad:
            dist.print0(f"{path}: {len(bad)} unreadable line(s) skipped, e.g. {bad[0]}")
        for r in records:
            seen[(r["dataset_name"], r["dataset_index"], r["run"], r["sample"])] = r
    return [seen[k] for k in sorted(seen, key=lambda k: (bench_order(k[0]), k[1], k[2], k[3]))]


def finish(folder: str, records: list, label: str, n_boot: int, extra: dict, grader: str = "lenient",
           page: bool = True) -> dict:
    summary = summarise(records, n_boot, grader=grader)
    summary.update(extra)
    write_json(os.path.join(folder, "summary.json"), summary)
    table = markdown_table(summary, label)
    card = protocol_lines(summary.get("protocol"))
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(table + ("\nProtocol:\n" + "".join(f"- {x}\n" for x in card) if card else ""))
    plot(summary, os.path.join(folder, "accuracy.png"), label)
    # the browsable page; questions come from the records, images from thumbs.jsonl (written by main, read here so
    # that regrade shows them too without reading the data again)
    if page:
        report.write_eval(os.path.join(folder, "report.html"), records, summary, label, report.read_thumbs(folder),
                          os.path.join(folder, "accuracy.png"))
    return summary


def failure_record(item, run: int, error: Exception) -> dict:
    """The record of an item whose generation raised: its keys and `error` ("Type: message", 1000 chars at most)."""
    return {"dataset_name": item.dataset_name, "dataset_index": item.dataset_index, "run": run,
            "error": f"{type(error).__name__}: {error}"[:1000]}


def failure_check(failed: list, n_items: Counter, max_fail_frac: float) -> str:
    """'' when each benchmark's items that failed at generation (in any run) are at most `max_fail_frac` of its
    `n_items`, else the message that stops the run, with the counts and the errors' kinds. 5 % by default: an odd
    item (an image the processor cannot take) is reported and left out, but past that the failure is systemic (a dead
    engine, a CUDA error, a code bug) and the accuracies over the survivors would not be the benchmark's."""
    bad = {}
    for r in failed:
        bad.setdefault(r["dataset_name"], set()).add(r["dataset_index"])
    over = [f"{b}: {len(ix)} of {n_items[b]} items failed" for b, ix in sorted(bad.items())
            if len(ix) > max_fail_frac * n_items[b]]
    if not over:
        return ""
    kinds = Counter(r["error"].split(":")[0] for r in failed)
    return (f"generation failed past --max_fail_frac {max_fail_frac}: " + "; ".join(over) + " (errors: " +
            ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + f"; e.g. {failed[0]['error'][:200]}). "
            "The failures are in failed.jsonl; a rerun with the same --out retries them")


def merge_failures(folder: str, records: list) -> list:
    """Merge the ranks' failed.rank*.jsonl (and an earlier failed.jsonl) into failed.jsonl, one record per
    (benchmark, index, run), leaving out items that have results now (a resumed run generated them). Returns them."""
    done = {(r["dataset_name"], r["dataset_index"], r["run"]) for r in records}
    failed = {}
    paths = sorted(glob.glob(os.path.join(folder, "failed*.jsonl")))
    for path in paths:
        for r in read_jsonl(path)[0]:
            key = (r["dataset_name"], r["dataset_index"], r["run"])
            if key not in done:
                failed[key] = r
    out = [failed[k] for k in sorted(failed, key=lambda k: (bench_order(k[0]), k[1], k[2]))]
    write_jsonl(os.path.join(folder, "failed.jsonl"), out)
    for path in paths:
        if os.path.basename(path) != "failed.jsonl":
            os.remove(path)
    return out


def images_of(rows, item, root) -> list:
    """The decoded images of a validated item, read again from its row (main keeps items without them)."""
    if not item.images:
        return []
    return [load_image(v, root) for v in rows[item.extra["row"]].get("images") or []]


def hash_key(name: str, index: int) -> int:
    """A stable integer for (benchmark, index): Python's hash() is salted per process."""
    return int.from_bytes(hashlib.sha256(f"{name}\x00{index}".encode()).digest()[:8], "little")


def select_rows(names: list, wanted: set | None, limit: int) -> tuple[list, Counter]:
    """Row indices to check: those of the wanted benchmarks (None = all), the first `limit` of each in dataset order
    (-1 = all), and every row whose name is unknown (None: a broken .jsonl line, none, not a string), so that it is
    checked and reported. Also the count picked per benchmark. A wanted name that no row has stops the run (SystemExit
    naming it and the benchmarks the data holds): a typo must not shrink Avg. silently."""
    unknown = sorted((wanted or set()) - set(names))
    if unknown:
        raise SystemExit(f"--benchmarks {', '.join(map(repr, unknown))} not in the data; it holds: "
                         f"{', '.join(sorted({n for n in names if n is not None}))}")
    picked, per_bench = [], Counter()
    for i, bench in enumerate(names):
        if bench is None or (wanted is None or bench in wanted) and (limit < 0 or per_bench[bench] < limit):
            picked.append(i)
            per_bench[bench] += bench is not None
    return picked, per_bench


def check_rows(rows, picked: list, names: list, root, processor, control: list, report_page: bool, d,
               skip_small: bool = False):
    """(items, rejects, thumbs) for the picked rows, the same on every rank: each rank reads and checks every
    world_size-th row (decoding its images once, on one rank) and all ranks gather the result, in row order. Items
    are kept without their decoded images (row index in extra["row"]); a batch decodes its own again (images_of),
    so memory holds one batch of images, not the whole set (pass counts run on 177k PMC-VQA images). Each item keeps
    its images' sizes (extra["sizes"]); with `skip_small` an item with an image side under 28 px is rejected."""
    items, rejects, thumbs = [], [], []
    for i in tqdm(picked[d.rank :: d.world_size], desc="check rows", unit="row", disable=not d.is_main,
                  dynamic_ncols=True, mininterval=5):
        row = {}
        try:
            row = read_row(rows, i)
            item = admit_row(rows, i, root, control, text_only=processor is None, row=row)
            item.extra["sizes"] = [list(im.size) for im in item.images]
            if skip_small and small_image(item.extra["sizes"]):
                raise RowError(f"an image side under {MIN_SIDE} px (--small_images skip)")
            if report_page:
                thumbs += [(i, t) for t in report.thumb_records([item])]
            item.extra["row"], item.images = i, [None] * len(item.images)
            items.append(item)
        except RowError as e:
            index = row.get("dataset_index") if isinstance(row, dict) else None
            rejects.append({"row": i, "dataset_name": names[i], "dataset_index": index, "reason": str(e),
                            **({"small": True} if "--small_images skip" in str(e) else {})})
    parts = dist.all_gather_objects((items, rejects, thumbs))
    items = sorted((it for p in parts for it in p[0]), key=lambda it: it.extra["row"])
    rejects = sorted((r for p in parts for r in p[1]), key=lambda r: r["row"])
    thumbs = [t for _, t in sorted((t for p in parts for t in p[2]), key=lambda x: x[0])]  # row order, as 1 rank
    return items, rejects, thumbs


def finished_runs(out: str, samples: int) -> set:
    """{(benchmark, index, run)} with all `samples` records already in `out` (any rank's shard): a resumed run skips
    them. Read after every rank repaired its shard's tail, so all ranks see the same set."""
    have = Counter((r["dataset_name"], r["dataset_index"], r["run"]) for r in read_records(out))
    return {k for k, c in have.items() if c >= samples}


def pending_batches(mine: list, batch_size: int, gen_runs: int, done: set) -> list:
    """[(run, batch)] still to generate: a batch of `batch_size` items is skipped for a run when all its items are
    done (finished_runs)."""
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return [(run, b) for run in range(gen_runs) for b in batches
            if not all((it.dataset_name, it.dataset_index, run) in done for it in b)]


def sample_records(item, samples: list, run: int, copy_to: range | list, done: set):
    """The per-sample records of one item's generation in `run`, graded: one set per run in `copy_to` that is not
    done yet (greedy HF runs are generated once and copied to the later runs, marked copied_from_run 0)."""
    for run_copy in copy_to:
        if (item.dataset_name, item.dataset_index, run_copy) in done:
            continue
        for j, s in enumerate(samples):
            rec = {"dataset_name": item.dataset_name, "dataset_index": item.dataset_index, "run": run_copy,
                   "sample": j, "question": item.question, "answer": item.answer, "answer_label": item.answer_label,
                   "options": item.options, "response": s.text, "finish_reason": s.finish_reason,
                   "tokens": len(s.token_ids)}
            if run_copy != run:
                rec["copied_from_run"] = run
            yield grade_record(rec, item.options)


# -----------------------------------------------------------------------------------------------------------------


def main(
    # Model
    model: str = "3b",  # preset (3b/7b/32b/72b), hub id, or a folder (our sft/grpo exports load directly)
    engine: Literal["auto", "vllm", "hf"] = "auto",  # auto = vllm on a CUDA GPU where it is installed, else hf
    dtype: Dtype = "bf16",  # weights and compute, both engines (CPU tests use fp32)
    attn: Attn = "auto",  # auto = flash_attention_2 if installed on GPU, else sdpa
    tp: int = 1,  # vllm tensor-parallel size; data-parallel size = world size / tp
    gpu_memory_utilization: float = 0.9,  # vllm
    trust_remote_code: bool = False,  # only for models that need their own code
    # Data
    data: str = "UCSC-VLAA/MedVLThinker-Eval",  # hub id, or a local parquet / save_to_disk / jsonl path
    split: str = "test",  # split of a hub dataset or DatasetDict
    benchmarks: str = "all",  # comma-separated dataset_name values, or all
    limit: int = -1,  # max items per benchmark, first ones in dataset order (-1 = all)
    # Sampling (recipe: greedy, 4096 tokens, 3 runs)
    runs: int = 3,  # repeated runs, reported as mean +- std
    samples: int = 1,  # samples per item and run (pass@k, majority@k when > 1); the recipe's n
    temperature: float = 0.0,  # 0 = greedy
    top_p: float = 1.0,  # nucleus sampling when temperature > 0
    max_new_tokens: int = 4096,  # recipe: 4096
    seed: int = 42,  # sampling seeds derive from (seed, run, benchmark, index)
    batch_size: int = 32,  # prompts per generate call
    # Output
    out: str = "",  # result folder ('' = outputs/eval/<model name>)
    name: str = "",  # the model's label in tables and charts ('' = the model folder's name)
    n_boot: int = 1000,  # bootstrap resamples for the CIs
    report_page: bool = True,  # report.html + thumbs.jsonl (false for pass-count runs: it embeds every response)
    grader: grading.Grader = "lenient",  # tables: lenient (RECIPE §7.2 regrader) | inference (§2.1) | strict
    max_fail_frac: float = 0.05,  # stop non-zero when more of a benchmark's items fail at generation (1 = never)
    small_images: Literal["keep", "skip"] = "keep",  # items with an image side < 28 px: keep (upstream) | skip
):
    user_config = dict(locals())
    cli.check_choices(main, user_config)  # a misspelt choice fails here, before any work
    d = dist.init(seed=seed)
    path = resolve(model)  # a folder's own name (through links: outputs/x/final -> epoch_3), else the hub id's tail
    name = name or os.path.basename((os.path.realpath(path) if os.path.exists(path) else path).rstrip("/"))
    out = out or os.path.join("outputs", "eval", name)
    check_output(out)
    config = {**user_config, "model_id": checkpoint.model_id(path)}  # who wrote the records, and how
    if glob.glob(os.path.join(out, "items*.jsonl")) and os.path.exists(os.path.join(out, "config.json")):
        with open(os.path.join(out, "config.json")) as f:  # resuming: the records must be this model's, this way
            checkpoint.check_same_run(json.load(f), config, RESUME_SAME, out)
    if d.is_main:
        write_json(os.path.join(out, "config.json"), config)
    dist.barrier()

    # Data: validate every row once; unusable rows are reported, counted and skipped. Which rows: the benchmark
    # filter and --limit read one column, no image.
    processor, tokenizer = load_processor(model, trust_remote_code)
    rows = load_rows(data, split)
    root = data_root(data)
    names = [b if isinstance(b, str) else None for b in column(rows, "dataset_name")]
    picked, per_bench = select_rows(names, None if benchmarks == "all" else set(benchmarks.split(",")), limit)
    # the model's own special tokens may not appear in data text
    items, rejects, thumbs = check_rows(rows, picked, names, root, processor, control_strings(tokenizer), report_page,
                                        d, skip_small=small_images == "skip")
    if d.is_main:
        write_jsonl(os.path.join(out, "rejects.jsonl"), rejects, ensure_ascii=True)  # raw fields of bad rows
        for r in rejects[:5]:
            print(f"skipped row {r['row']} ({r['dataset_name']} #{r['dataset_index']}): {r['reason']}", flush=True)
        print(f"{len(items)} items from {data} ({dict(per_bench)}); {len(rejects)} rows skipped", flush=True)
    if not items:
        raise SystemExit("no usable items: check --data / --benchmarks")

    # Model: the one engine choice (vLLM checks that --tp divides the ranks)
    engine = pick_engine(engine, d.device)
    if engine == "vllm":
        gen = VLLMEngine(resolve(model), tokenizer, tp=tp, seed=seed, dtype=dtype,
                         gpu_memory_utilization=gpu_memory_utilization, is_vl=processor is not None,
                         processor=processor)
    else:
        speed.check_dtype(dtype, d.device)  # bf16 on a CPU without native bf16: ~80x slower matmuls
        net = load_model(model, dtype=dtype, device=d.device, attn=attn, trust_remote_code=trust_remote_code).eval()
        gen = HFEngine(net, processor, tokenizer, batch_size=batch_size)
    mine = gen.shard(items)  # a contiguous block per rank (per tensor-parallel group: its ranks share one)

    # Generate, batch by batch, appending records; finished batches are skipped on resume
    shard = os.path.join(out, f"items.rank{d.rank}.jsonl")
    fail_shard = os.path.join(out, f"failed.rank{d.rank}.jsonl")
    repair_tail(shard)
    repair_tail(fail_shard)
    dist.barrier()
    done = finished_runs(out, samples)
    # Greedy HF decoding is deterministic: later runs would repeat run 0 token for token, so they copy it.
    copy_runs = gen.greedy_repeats and temperature == 0
    todo = pending_batches(mine, batch_size, 1 if copy_runs else runs, done)
    bar = tqdm(total=sum(len(b) for _, b in todo), desc=f"eval {name}", unit="item", disable=not d.is_main,
               dynamic_ncols=True)
    t0, n_tokens = time.time(), 0
    with open(shard, "a") as f, open(fail_shard, "a") as fail:
        for run, batch in todo:
            ps = [Prompt(prompts.prompt_text(processor, tokenizer, it), images_of(rows, it, root)) for it in batch]
            seeds = [mix_seed(mix_seed(seed, run), hash_key(it.dataset_name, it.dataset_index)) for it in batch]
            outs = generate_each(gen, ps, seeds, n=samples, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
            for it, got in zip(batch, outs):
                if isinstance(got, Exception):  # this item only; the others of the batch keep their results
                    fail.write(json.dumps(failure_record(it, run, got), ensure_ascii=False) + "\n")
                    fail.flush()
                    continue
                for rec in sample_records(it, got, run, range(runs) if copy_runs else [run], done):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n_tokens += rec["tokens"] if rec["run"] == run else 0
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            crash_point("eval_batch")
    bar.close()
    elapsed = time.time() - t0
    dist.barrier()
    gen.shutdown()  # before our process group goes (vLLM's groups are built on it); hf: nothing

    # Merge, summarise, report (rank 0)
    if d.is_main:
        records = read_records(out)
        write_jsonl(os.path.join(out, "items.jsonl"), records)
        for p in glob.glob(os.path.join(out, "items.rank*.jsonl")):
            os.remove(p)
        if report_page:
            write_jsonl(os.path.join(out, "thumbs.jsonl"), thumbs)  # images for report.html
        failed = merge_failures(out, records)
        too_many = failure_check(failed, Counter(it.dataset_name for it in items), max_fail_frac)
        if too_many:
            dist.cleanup()
            raise SystemExit(too_many)
        n_gen = sum(len(b) for _, b in todo)
        summary = finish(out, records, name, n_boot, {
            "model": model, "data": data, "skipped_rows": len(rejects),
            "skip_reasons": dict(Counter(reason_kind(r["reason"]) for r in rejects)),
            "failed_items": len({(r["dataset_name"], r["dataset_index"]) for r in failed}),
            "fail_reasons": dict(Counter(r["error"].split(":")[0] for r in failed)),
            "items_per_second": n_gen / elapsed if elapsed > 0 and n_gen else None,
            "generated_tokens_per_second": n_tokens / elapsed if elapsed > 0 and n_tokens else None,
            "runs_copied_from_run0": copy_runs and runs > 1,
            "protocol": protocol_card(config, items, rejects, failed, engine, processor, tokenizer)}, grader, report_page)
        print(open(os.path.join(out, "results.md")).read(), end="")
        if summary["items_per_second"]:
            print(f"{n_gen} items in {elapsed:.1f}s ({summary['items_per_second']:.2f} items/s, "
                  f"{summary['generated_tokens_per_second'] or 0:.1f} new tokens/s)")  # None: no item generated
        for r in failed[:5]:
            print(f"failed: {r['dataset_name']} #{r['dataset_index']} run {r['run']}: {r['error'][:200]}", flush=True)
        if failed:
            print(f"{len(failed)} item-run(s) failed at generation and are left out of the accuracies (failed.jsonl)")
        print(f"wrote {out}/: items.jsonl summary.json results.md accuracy.png"
              + (" report.html" if report_page else "") + " rejects.jsonl failed.jsonl")
    dist.cleanup()


def regrade(
    folder: str,  # a result folder of this script (items*.jsonl are read, everything else rewritten)
    n_boot: int = 1000,  # bootstrap resamples for the confidence intervals
    grader: Literal["", "lenient", "inference", "strict"] = "",  # the tables' grader ('' = the one the run used)
):
    """Recompute verdicts, tables and charts from the saved responses (no model)."""
    cli.check_choices(regrade, locals())
    records = read_records(folder)
    if not records:
        raise SystemExit(f"{folder}: no items*.jsonl records")
    for r in records:
        grade_record(r, r.get("options") or {})
    write_jsonl(os.path.join(folder, "items.jsonl"), records)
    old = json.load(open(os.path.join(folder, "summary.json"))) if os.path.exists(os.path.join(folder, "summary.json")) else {}
    grader = grader or old.get("grader", "lenient")
    keep = {k: v for k, v in old.items() if k not in ("benchmarks", "avg", "avg_ci95", "avg_note", "grader", "letters")}
    if "protocol" in keep:  # carried along, with the grader the tables now use
        keep["protocol"] = {**keep["protocol"], "grader": grader}
    finish(folder, records, os.path.basename(folder.rstrip("/")), n_boot, keep, grader)
    print(open(os.path.join(folder, "results.md")).read(), end="")
    print(f"wrote {os.path.join(folder, 'report.html')}")


def read_protocol(folder: str) -> dict:
    """The protocol card of a result folder's summary.json ({} when there is none)."""
    path = os.path.join(folder, "summary.json")
    return (json.load(open(path)).get("protocol") or {}) if os.path.exists(path) else {}


def compare(
    a: str,  # result folder of the baseline
    b: str,  # result folder of the model compared with it
    n_boot: int = 2000,  # paired bootstrap resamples
    seed: int = 0,  # bootstrap seed
    grader: grading.Grader = "lenient",  # the table's and the flips' (lenient = RECIPE §7.2 regrader)
    out: str = "",  # the page of flipped items ('' = <b>/compare.html)
):
    """Paired bootstrap of accuracy(b) - accuracy(a) per benchmark and on Avg., over the items both evaluated; the
    table is printed and, with the items that flipped, written to compare.html (`out`); the table alone (rows:
    benchmark, name, n, and a, b, diff, lo, hi in accuracy points, p_le0) and the protocol keys that differ go to
    the page's name with .json (compare.json)."""
    cli.check_choices(compare, locals())
    if out.endswith(".json"):
        raise SystemExit(f"--out {out}: the page is HTML and its table goes beside it as .json; name the page .html")
    ra, rb = read_records(a), read_records(b)
    pa, pb = (read_protocol(x) for x in (a, b))
    differ = [k for k in PROTOCOL_SAME if pa.get(k) != pb.get(k)] if pa and pb else []
    if not (pa and pb):
        print("WARNING: a folder has no protocol card (summary.json from an older version): protocols not compared")
    if differ:
        print("WARNING: the two evaluations were not made the same way: " +
              "; ".join(f"{k} {pa.get(k)} vs {pb.get(k)}" for k in differ))
    sa, sb = item_scores(ra, grader), item_scores(rb, grader)
    common = sorted(set(sa) & set(sb))
    if not common:
        raise SystemExit("the two folders share no (benchmark, index) items")
    per = lambda s, k: grading.item_score(s[k]) * 100  # noqa: E731
    rng = np.random.default_rng(seed)
    table, diffs = [], []  # one named row per benchmark, then Avg.
    for name in ordered({k[0] for k in common}):
        keys = [k for k in common if k[0] == name]
        diff = np.array([per(sb, k) - per(sa, k) for k in keys])
        lo, hi, boots = bootstrap([diff], n_boot, rng)
        diffs.append(diff)
        table.append({"benchmark": COLUMNS.get(name, name), "n": len(keys), "a": np.mean([per(sa, k) for k in keys]),
                      "b": np.mean([per(sb, k) for k in keys]), "diff": diff.mean(), "lo": lo, "hi": hi,
                      "p_le0": float(np.mean(boots <= 0)), "name": name})
    lo, hi, avg_boots = bootstrap(diffs, n_boot, rng)
    table.append({"benchmark": "Avg.", "n": len(common), "a": None, "b": None,
                  "diff": np.mean([x.mean() for x in diffs]), "lo": lo, "hi": hi,
                  "p_le0": float(np.mean(avg_boots <= 0)), "name": None})
    print(f"accuracy by the {grader} grader")
    print("| benchmark | n | A | B | B-A | 95% CI | P(B-A<=0) |\n|---|---|---|---|---|---|---|")
    for r in table:
        ab = "| | |" if r["a"] is None else f"| {r['a']:.2f} | {r['b']:.2f} |"
        print(f"| {r['benchmark']} | {r['n']} {ab} {r['diff']:+.2f} | [{r['lo']:+.2f}, {r['hi']:+.2f}] | "
              f"{r['p_le0']:.3f} |")
    out = out or os.path.join(b, "compare.html")
    report.write_compare(out, os.path.basename(a.rstrip("/")), os.path.basename(b.rstrip("/")), table, ra, rb,
                         {**report.read_thumbs(a), **report.read_thumbs(b)}, key=grading.verdict_field(grader),
                         grader=grader, protocols=[protocol_lines(pa), protocol_lines(pb)], differ=differ)
    write_json(os.path.splitext(out)[0] + ".json", {"a": a, "b": b, "grader": grader, "n_boot": n_boot, "seed": seed,
                                                    "differ": differ, "table": table})
    print(f"wrote {out} and its table as {os.path.splitext(out)[0]}.json")


COMMANDS = {"": main, "regrade": regrade, "compare": compare}

if __name__ == "__main__":
    cli.run(COMMANDS)
