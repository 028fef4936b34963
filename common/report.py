"""Report pages: self-contained HTML for an evaluation, a comparison of two evaluations, and a GRPO run.

A page opens from disk with no server and no network: CSS and script inline, images as small base64 thumbnails, the
rows as one JSON block that the page's script turns into cards, one page of 50 at a time (10,000 items stay quick).
Model output and dataset text are untrusted: Jinja escapes whatever the templates print (autoescape), the JSON block
goes through `tojson` (which writes < > & ' as \\u escapes, so a `</script>` in the data cannot end the block), and the
script inserts text with textContent only (common/templates/base.html).
"""

import base64
import io
import math
import os
import re
from collections import defaultdict

import jinja2
from PIL import Image

from common import grading
from common.files import atomic_file, read_jsonl

THUMB_SIDE = 128  # px, longest side of a thumbnail (JPEG, quality 70: ~3 KB for a radiograph)
ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                         autoescape=True, undefined=jinja2.StrictUndefined)
ENV.policies["json.dumps_kwargs"] = {"sort_keys": False, "separators": (",", ":")}  # compact: pages hold 10k rows
ENV.filters["num"] = lambda v, spec="%.2f": "n/a" if v is None else spec % v  # json_safe made NaN/inf None
TAG = re.compile(r"(</?(?:think|answer)>)", re.IGNORECASE)

# -----------------------------------------------------------------------------------------------------------------
# Pieces of a page


def thumbnail(img: Image.Image, side: int = THUMB_SIDE) -> str:
    """A `data:image/jpeg;base64,...` URI of `img` shrunk to at most `side` px on its longest side."""
    small = img.convert("RGB")
    small.thumbnail((side, side))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def png_uri(path: str) -> str | None:
    """A `data:image/png;base64,...` URI of the PNG file at `path`, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def split_response(text: str) -> list[list[str]]:
    """[[kind, text], ...] with kind 'think', 'answer' or 'text': the response cut at its <think>/<answer> tags, the
    tags kept inside their part, so the parts joined give `text` back exactly (a malformed response shows as it is)."""
    parts, kind = [], "text"
    for piece in TAG.split(text or ""):
        if not piece:
            continue
        tag = piece.lower()
        if tag in ("<think>", "<answer>"):
            kind = tag[1:-1]
            parts.append([kind, piece])
            continue
        if parts and parts[-1][0] == kind:
            parts[-1][1] += piece
        else:
            parts.append([kind, piece])
        if tag in ("</think>", "</answer>"):
            kind = "text"
    return parts


def verdicts(rec: dict) -> dict:
    """{field: bool} of every grader verdict in a record (`correct`, `correct_strict`, and any later `correct_*`)."""
    return {k: bool(v) for k, v in rec.items() if k.startswith("correct") and isinstance(v, (bool, int, float))}


def thumb_records(items: list) -> list[dict]:
    """One {dataset_name, dataset_index, thumbs} per item with images (items: common.data.Item), for thumbs.jsonl:
    evaluate.py writes it once per run, so regrade and compare show images without reading the data again."""
    return [{"dataset_name": it.dataset_name, "dataset_index": it.dataset_index,
             "thumbs": [thumbnail(im) for im in it.images]} for it in items if it.images]


def read_thumbs(folder: str) -> dict:
    """{(dataset_name, dataset_index): [data URI]} from a result folder's thumbs.jsonl ({} when it has none)."""
    path = os.path.join(folder, "thumbs.jsonl")
    rows = read_jsonl(path)[0] if os.path.exists(path) else []
    return {(r["dataset_name"], r["dataset_index"]): r["thumbs"] for r in rows}


def item_key(rec: dict) -> tuple:
    return rec["dataset_name"], rec["dataset_index"]


def item_entry(rec: dict, thumbs: dict) -> dict:
    """The item-level fields a card shows (question, options, gold, thumbnails), shared by its records."""
    return {"b": rec["dataset_name"], "i": rec["dataset_index"], "q": rec.get("question", ""),
            "o": rec.get("options") or {}, "a": rec.get("answer", ""), "al": rec.get("answer_label", ""),
            "img": thumbs.get(item_key(rec), [])}


def sample_entry(rec: dict) -> dict:
    """One response as a card shows it: its parts, extraction, verdicts, format flag and length."""
    return {"run": rec.get("run", 0), "sample": rec.get("sample", 0), "parts": split_response(rec.get("response", "")),
            "ext": rec.get("extracted"), "letter": rec.get("letter"), "fmt": bool(rec.get("format")),
            "fin": rec.get("finish_reason"), "tok": rec.get("tokens"), "v": verdicts(rec)}


def json_safe(obj):
    """`obj` with every NaN/inf float replaced by None, recursively (dicts, lists, tuples): json.dumps would write
    NaN, which is not JSON, and the page's JSON.parse would fail and leave the page blank (a NaN reward, trl#2737)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def render(path: str, template: str, **context) -> None:
    """Render common/templates/`template` with `context` (json_safe) into `path`, atomically."""
    html = ENV.get_template(template).render(**json_safe(context))
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(html)


# -----------------------------------------------------------------------------------------------------------------
# The three pages


def write_eval(path: str, records: list, summary: dict, title: str, thumbs: dict | None = None,
               chart: str | None = None) -> None:
    """report.html of an evaluation: summary table (summary.json's fields), the chart PNG at `chart` if it exists,
    and one browsable row per record (item x run x sample). Raises KeyError for a record without
    dataset_name/dataset_index."""
    thumbs = thumbs or {}
    index, items, rows = {}, [], []
    for r in records:
        if item_key(r) not in index:
            index[item_key(r)] = len(items)
            items.append(item_entry(r, thumbs))
        rows.append({"k": index[item_key(r)], **sample_entry(r)})
    main = grading.verdict_field(summary.get("grader", "lenient"))
    graders = sorted({g for r in rows for g in r["v"]}, key=lambda g: (g != main, g != "correct", g))  # the run's first
    data = {"items": items, "recs": rows, "graders": graders, "benchmarks": list(dict.fromkeys(i["b"] for i in items)),
            "runs": sorted({r["run"] for r in rows})}
    render(path, "eval.html", title=title, summary=summary, chart=png_uri(chart) if chart else None, data=data)


def item_scores(records: list, key: str = "correct") -> dict:
    """{(dataset_name, dataset_index): (grading.item_score of `key`, first record by run then sample)}: the mean over
    runs of the mean over samples, the same per-item score as evaluate.py's tables, so compare's table and its flips
    agree when runs are unbalanced. A record without `key` counts as wrong."""
    by_item = defaultdict(list)
    for r in records:
        by_item[item_key(r)].append(r)
    first = lambda rs: min(rs, key=lambda r: (r.get("run", 0), r.get("sample", 0)))  # noqa: E731
    out = {}
    for k, rs in by_item.items():
        runs = defaultdict(list)
        for r in rs:
            runs[r.get("run", 0)].append(bool(r.get(key)))
        out[k] = (grading.item_score(runs), first(rs))
    return out


def flips(records_a: list, records_b: list, key: str = "correct") -> list[dict]:
    """Items both folders evaluated whose verdict differs: right = an item score (item_scores, the mean over runs
    of the mean over samples) above 0.5 under `key`. One {k: (bench, index), dir: 'wr' (wrong -> right in B) | 'rw',
    a/b: (score, first record)} each."""
    sa, sb = item_scores(records_a, key), item_scores(records_b, key)
    out = []
    for k in sorted(set(sa) & set(sb), key=lambda k: (str(k[0]), k[1])):
        ra, rb = sa[k][0] > 0.5, sb[k][0] > 0.5
        if ra != rb:
            out.append({"k": k, "dir": "wr" if rb else "rw", "a": sa[k], "b": sb[k]})
    return out


def write_compare(path: str, label_a: str, label_b: str, table: list, records_a: list, records_b: list,
                  thumbs: dict | None = None, key: str = "correct", grader: str = "lenient",
                  protocols: list | None = None, differ: list | tuple = ()) -> None:
    """compare.html: the paired bootstrap `table` (dicts with benchmark, n, a, b, diff, lo, hi, p_le0; evaluate.py
    compare builds it) with flip counts, then the items whose verdict under `key` flipped, with A's and B's first
    response side by side; `protocols` (A's and B's protocol card lines) and the card fields that `differ`."""
    thumbs = thumbs or {}
    found = flips(records_a, records_b, key)
    count = defaultdict(lambda: {"wr": 0, "rw": 0})
    for f in found:
        count[f["k"][0]][f["dir"]] += 1
    side = lambda score_rec: {"score": score_rec[0], **sample_entry(score_rec[1])}  # noqa: E731
    cards = [{**item_entry(f["b"][1], thumbs), "dir": f["dir"], "A": side(f["a"]), "B": side(f["b"])} for f in found]
    data = {"flips": cards, "labels": [label_a, label_b], "benchmarks": list(dict.fromkeys(c["b"] for c in cards))}
    render(path, "compare.html", title=f"{label_a} vs {label_b}", label_a=label_a, label_b=label_b, table=table,
           grader=grader, count=count, data=data, protocols=protocols or [[], []], differ=list(differ))


def read_rollouts(path: str) -> list[dict]:
    """grpo.py's rollouts.jsonl, one record per (step, group) sorted by both; a resumed run rewrites the steps after
    its checkpoint, so the last record of a (step, group) wins. [] when the file does not exist."""
    if not os.path.exists(path):
        return []
    rows = {(r["step"], r["group"]): r for r in read_jsonl(path)[0]}
    return [rows[k] for k in sorted(rows)]


def write_grpo(path: str, title: str, metrics: list, rollouts: list, curves: str | None = None) -> None:
    """report.html of a GRPO run: the curves PNG at `curves` if it exists, the last step's metrics, and the logged
    rollout groups (read_rollouts) browsable step by step."""
    groups = [{"step": g["step"], "group": g["group"], "b": g.get("dataset_name"), "i": g.get("dataset_index"),
               "prompt": g.get("prompt", ""), "img": g.get("thumbs", []), "a": g.get("answer", ""),
               "al": g.get("answer_label", ""),
               "responses": [{"parts": split_response(s["text"]), "reward": s.get("reward"), "adv": s.get("advantage"),
                              "tok": s.get("tokens"), "fin": s.get("finish_reason"), "in_loss": s.get("in_loss", True)}
                             for s in g.get("responses", [])]} for g in rollouts]
    train = [m for m in metrics if "reward" in m]
    last = {k: v for k, v in (train[-1] if train else {}).items() if isinstance(v, (int, float)) and k != "time"}
    data = {"groups": groups, "steps": sorted({g["step"] for g in groups})}
    render(path, "grpo.html", title=title, curves=png_uri(curves) if curves else None, last=last, data=data)
