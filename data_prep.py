"""Data for the recipe (RECIPE §1-2): every source into one schema, difficulty curation by pass count, sample data.

Each sub-command reads a source and writes a folder: data.parquet (unified schema + prompt_tokens), manifest.json
(source, rows in/out, drop reasons with counts, content hash, flags) and rejects.jsonl (every row that could not be
used, with its source row and reason). Folders are written to a temp path and renamed, so a killed run leaves the
old folder or none, never half of one.

    python data_prep.py sample --out data/sample                   # bundled demo/test data (written by this project)
    python data_prep.py reasoning --out data/reasoning             # computable clinical MCQs, train + held-out part
    python data_prep.py eval --out data/eval                       # UCSC-VLAA/MedVLThinker-Eval (hub or local copy)
    python data_prep.py eval --vqa_rad ../shared/data/real/vqa_rad --out data/eval_raw   # or from raw benchmark files
    python data_prep.py text --medqa medqa/train.jsonl --headqa headqa/train_HEAD_EN.json --out data/text
    python data_prep.py pmc_vqa --csv_path PMC-VQA/train.csv --images PMC-VQA/images --out data/pmc_vqa
    torchrun --nproc_per_node 8 evaluate.py --model 3b --engine vllm --data data/text --runs 1 --samples 16 \
        --temperature 1.0 --out data/passrate                      # pass counts are an evaluation (RECIPE §2.1)
    python data_prep.py filter --data data/text --passrate data/passrate --out data/text_e2h   # keep 1..7 of 16
    python data_prep.py sft --data data/pmc_vqa --traces gpt4o_rollouts/items.jsonl --out data/pmc_vqa_sft
    python data_prep.py decontaminate --train data/text --eval_data data/eval --drop true --out data/text_clean

Closed PathVQA/SLAKE/VQA-RAD questions become MCQs by rule (yes/no -> Yes/No; "X or Y" -> the alternatives named
in the question); anything else is reported and skipped. Upstream asked GPT-4o instead: to reproduce the paper's
numbers exactly use the released eval set (`eval` with no raw flags).
"""

import ast
import csv
import functools
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import Counter
from typing import Literal

from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from common import cli, grading, prompts
from common.data import (JsonlRows, RowError, bound_image, data_root, features, load_image, load_rows, parse_row,
                         read_row, reason_kind, to_row, undecoded)
from common.files import atomic_dir, iter_jsonl, read_jsonl, write_json, write_jsonl

# -----------------------------------------------------------------------------------------------------------------
# Rule-based options for closed VQA questions

YES_NO = {"yes", "no"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def closed_options(question: str, answer: str) -> dict:
    """Options for a CLOSED question: Yes/No, or the alternatives of an 'X or Y' / 'X, Y, or Z' question.

    The alternatives are the fewest words around ' or ' (1..3 each side, optionally sharing the word after the
    right one: 'left or right side' -> left side / right side) such that the answer is one of them."""
    a = answer.strip().lower()
    if a in YES_NO:
        return {"A": "Yes", "B": "No"}
    q = question.strip().rstrip("?").strip()
    m = re.search(r"\s+or\s+", q, flags=re.IGNORECASE)
    if not m:
        raise RowError(f"closed question is neither yes/no nor 'X or Y': {question[:80]!r} -> {answer[:40]!r}")
    left, right = q[: m.start()].rstrip(","), q[m.end() :]
    lw, rw = left.split(), right.split()
    while rw and rw[0].lower() in ("a", "an", "the"):  # 'a CT or an MRI'
        rw.pop(0)
    heads = [w.rstrip(",") for w in lw]
    candidates = []
    # 'A, B, or C': comma-separated items before ' or ', each as long as the last one
    if "," in left:
        items = [x.strip() for x in left.split(",")]
        width = len(items[-1].split())
        first = " ".join(items[0].split()[-width:])
        for k in range(1, 4):
            candidates.append([first] + items[1:] + [" ".join(rw[:k])])
    for j in range(1, 4):
        for k in range(1, 4):
            candidates.append([" ".join(heads[-j:]), " ".join(rw[:k])])
            if len(rw) > k:  # shared trailing word: 'left or right side'
                candidates.append([" ".join(heads[-j:] + rw[k : k + 1]), " ".join(rw[: k + 1])])
    for opts in candidates:
        clean = [re.sub(r"^(a|an|the)\s+", "", o.strip(" ,.;:"), flags=re.IGNORECASE) for o in opts]
        if all(clean) and len({c.lower() for c in clean}) == len(clean) and a in {c.lower() for c in clean}:
            return {chr(65 + i): _cap(c) for i, c in enumerate(clean)}
    raise RowError(f"answer {answer[:40]!r} is not one of the alternatives in {question[:80]!r}")


def closed_row(question: str, answer: str, images, name: str, index: int, misc=None) -> dict:
    opts = closed_options(question, answer)
    label = next(k for k, v in opts.items() if v.lower() == answer.strip().lower())
    return {"images": images, "question": question.strip(), "options": opts, "answer_label": label,
            "answer": opts[label], "reasoning": None, "dataset_name": name, "dataset_index": index, "misc": misc}


def _mcq(question, options, label, name, index, images=None, reasoning=None, misc=None) -> dict:
    return {"images": images, "question": question, "options": options, "answer_label": label,
            "answer": options.get(label, "") if isinstance(options, dict) else "", "reasoning": reasoning,
            "dataset_name": name, "dataset_index": index, "misc": misc}


# -----------------------------------------------------------------------------------------------------------------
# Converters: each returns (root folder for image paths, [(source row, raw unified row or RowError)])


def _jsonl(path):
    """(line index from 0, object or RowError) per non-empty line; a bad line never fails the file."""
    for n, obj, reason in iter_jsonl(path):
        yield n - 1, obj if reason is None else RowError(reason)


def _options_field(v):
    """medagents files store options as a JSON object; tolerate a Python-literal string."""
    if isinstance(v, str):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            raise RowError("options string does not parse") from None
    return v


def medqa_rows(path, name="medqa"):
    """MedQA-USMLE (jind11 / medagents layout): question, options {A..}, answer_idx, answer."""
    out = []
    for i, r in _jsonl(path):
        if isinstance(r, RowError):
            out.append((i, r))
            continue
        try:
            out.append((i, _mcq(r.get("question"), _options_field(r.get("options")), r.get("answer_idx"), name, i,
                                misc={"source_id": r.get("realidx")})))
        except RowError as e:
            out.append((i, e))
    return None, out


def medxpertqa_text_rows(path):
    """MedXpertQA Text (medagents layout): the question carries '\\nAnswer Choices: ...', which is cut off."""
    root, rows = medqa_rows(path, "medxpertqa_text")
    for _, r in rows:
        if isinstance(r, dict) and isinstance(r["question"], str):
            r["question"] = r["question"].split("\nAnswer Choices: ")[0].strip()
    return root, rows


def headqa_rows(path):
    """HEAD-QA English: exams -> questions with answers [{aid, atext}] and ra; questions tied to images are skipped."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    out, i = [], 0
    for exam in d.get("exams", {}).values():
        for q in exam.get("data", []):
            if q.get("image"):
                out.append((i, RowError("question refers to an image that HEAD-QA does not ship")))
            else:
                try:
                    opts = {chr(64 + int(a["aid"])): a["atext"] for a in q["answers"]}
                    out.append((i, _mcq(q["qtext"], opts, chr(64 + int(q["ra"])), "headqa", i,
                                        misc={"source_id": f"{exam.get('name')}/{q.get('qid')}"})))
                except (KeyError, ValueError, TypeError) as e:
                    out.append((i, RowError(f"malformed HEAD-QA question ({type(e).__name__}: {e})")))
            i += 1
    return None, out


def pubmedqa_rows(path, with_context=True):
    """PubMedQA PQA-L: yes/no/maybe; the abstract's contexts precede the question unless with_context is false."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    out = []
    opts = {"A": "yes", "B": "no", "C": "maybe"}
    for i, (pmid, r) in enumerate(d.items()):
        q = r.get("QUESTION")
        if with_context and isinstance(q, str):
            q = "\n".join(r.get("CONTEXTS", [])) + "\n\n" + q
        label = {v: k for k, v in opts.items()}.get(r.get("final_decision"))
        if label is None:
            out.append((i, RowError(f"final_decision {r.get('final_decision')!r} is not yes/no/maybe")))
        else:
            out.append((i, _mcq(q, opts, label, "pubmedqa", i, misc={"source_id": pmid})))
    return None, out


def vqa_rad_rows(folder):
    """VQA-RAD OSF release: 'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/'; CLOSED questions only."""
    with open(os.path.join(folder, "VQA_RAD Dataset Public.json"), encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for i, r in enumerate(rows):
        if str(r.get("answer_type", "")).strip() != "CLOSED":
            continue
        try:
            out.append((i, closed_row(str(r["question"]), str(r["answer"]),
                                      [os.path.join("VQA_RAD Image Folder", r["image_name"])], "vqa_rad_closed", i,
                                      misc={"qid": r.get("qid")})))
        except RowError as e:
            out.append((i, e))
        except KeyError as e:
            out.append((i, RowError(f"missing field {e}")))
    return folder, out


def slake_rows(folder, split="test"):
    """SLAKE 1.0: {split}.json + imgs/; English CLOSED questions only."""
    with open(os.path.join(folder, f"{split}.json"), encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for i, r in enumerate(rows):
        if r.get("q_lang", "en") != "en" or str(r.get("answer_type", "")).strip().upper() != "CLOSED":
            continue
        try:
            out.append((i, closed_row(r["question"], str(r["answer"]), [os.path.join("imgs", r["img_name"])],
                                      "slake_closed", i, misc={"qid": r.get("qid")})))
        except (RowError, KeyError) as e:
            out.append((i, e if isinstance(e, RowError) else RowError(f"missing field {e}")))
    return folder, out


def pathvqa_rows(path):
    """PathVQA as parquet (image, question, answer): the yes/no questions are its CLOSED set."""
    import datasets

    ds = undecoded(datasets.load_dataset("parquet", data_files=path, split="train"))  # keep the image bytes
    out = []
    for i, r in enumerate(ds):
        if str(r["answer"]).strip().lower() in YES_NO:
            out.append((i, closed_row(r["question"], str(r["answer"]), [r["image"]], "pathvqa_closed", i)))
    return None, out


def mmmu_rows(path):
    """MMMU parquet (health & medicine subsets): multiple-choice only; <image N> placeholders removed."""
    import datasets

    ds = undecoded(datasets.load_dataset("parquet", data_files=path, split="train"))  # keep the image bytes
    out = []
    for i, r in enumerate(ds):
        if r.get("question_type") != "multiple-choice":
            continue
        try:
            choices = ast.literal_eval(r["options"])
            opts = {chr(65 + k): str(c) for k, c in enumerate(choices)}
            images = [r[f"image_{k}"] for k in range(1, 8) if r.get(f"image_{k}") is not None]
            q = re.sub(r"\s*<image \d+>\s*", "", r["question"]).strip()
            out.append((i, _mcq(q, opts, str(r["answer"]).strip(), "MMMU-medical", i, images,
                                misc={"id": r.get("id"), "subfield": r.get("subfield")})))
        except (ValueError, SyntaxError, KeyError) as e:
            out.append((i, RowError(f"malformed MMMU row ({type(e).__name__})")))
    return None, out


def medxpertqa_mm_rows(path, image_dir):
    """MedXpertQA MM jsonl (question with '\\nAnswer Choices:', options, label, images=[file names])."""
    out = []
    for i, r in _jsonl(path):
        if isinstance(r, RowError):
            out.append((i, r))
            continue
        q = r.get("question")
        q = q.split("\nAnswer Choices: ")[0].strip() if isinstance(q, str) else q
        out.append((i, _mcq(q, r.get("options"), r.get("label"), "MedXpertQA-MM", i, list(r.get("images") or []),
                            misc={"id": r.get("id")})))
    return image_dir, out


STRIP = " \t\n\r\x0b\x0c'\"\xa0\u200a"  # RECIPE §1.4: string.whitespace + quotes + nbsp + hair space


def pmc_vqa_rows(csv_path, image_dir, name="pmc_vqa"):
    """PMC-VQA csv (Figure_path, Question, Answer, Answer_label, Choice A..D) with the upstream cleaning rules."""
    out = []
    with open(csv_path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            try:
                opts = {}
                for letter in "ABCD":
                    cell = (r.get(f"Choice {letter}") or "").strip(STRIP)
                    prefix, sep, text = cell.partition(":")
                    if not sep or prefix.strip(STRIP) != letter:
                        raise RowError(f"choice {letter} is not labelled '{letter}:' ({cell[:30]!r})")
                    opts[letter] = text.strip(STRIP)
                label = (r.get("Answer_label") or "").strip(STRIP)
                if label not in opts:
                    raise RowError(f"Answer_label {label!r} not in A-D")
                if opts[label] != (r.get("Answer") or "").strip(STRIP):
                    raise RowError("Answer differs from its choice")
                out.append((i, _mcq(r["Question"].strip(STRIP), opts, label, name, i, [r["Figure_path"].strip()])))
            except RowError as e:
                out.append((i, e))
            except (KeyError, AttributeError) as e:
                out.append((i, RowError(f"missing column {e}")))
    return image_dir, out


def unified_rows(source, split="test"):
    """Rows already in the unified schema (a hub dataset or a local copy): indices, read lazily by the workers."""
    ds = load_rows(source, split, decode_images=False)  # image bytes reach the writer undecoded (kept if unchanged)
    return data_root(source), [(i, i) for i in range(len(ds))], ds


# -----------------------------------------------------------------------------------------------------------------
# Bundled sample data: written by this project, images drawn here (nothing binary is committed)


def draw_scan(rng: random.Random, spots: list, size: int = 112) -> Image.Image:
    """A grey 'scan': noisy elliptical body on black, with bright round 'lesions' at the given (x, y, r) spots."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    d.ellipse([8, 12, size - 8, size - 12], fill=70 + rng.randint(-10, 10))
    for x, y, r in spots:
        d.ellipse([x - r, y - r, x + r, y + r], fill=230)
    noise = Image.effect_noise((size, size), 12)
    img = Image.blend(img, noise, 0.15).filter(ImageFilter.GaussianBlur(0.8))
    return img.convert("RGB")


def sample_image_items(rng: random.Random, n: int) -> list:
    kinds = ["side", "quadrant", "count"]
    out = []
    for i in range(n):
        kind = kinds[i % 3]
        s = 112
        if kind == "side":
            left = rng.random() < 0.5
            x = rng.randint(24, 44) if left else rng.randint(68, 88)
            img = draw_scan(rng, [(x, rng.randint(36, 76), 8)])
            q, opts = "Which side of the image holds the bright lesion?", {"A": "Left", "B": "Right"}
            label, why = ("A" if left else "B"), f"The bright round focus lies in the {'left' if left else 'right'} half."
        elif kind == "quadrant":
            k = rng.randrange(4)
            x = rng.randint(26, 44) if k in (0, 2) else rng.randint(68, 86)
            y = rng.randint(26, 44) if k in (0, 1) else rng.randint(68, 86)
            img = draw_scan(rng, [(x, y, 7)])
            opts = {"A": "Upper left", "B": "Upper right", "C": "Lower left", "D": "Lower right"}
            q, label = "Which quadrant of the image contains the lesion?", "ABCD"[k]
            why = f"The only bright spot is in the {opts[label].lower()} quadrant."
        else:
            c = rng.randint(1, 3)
            xs = rng.sample([26, 46, 66, 86], c)
            img = draw_scan(rng, [(x, rng.randint(40, 72), 6) for x in xs])
            q, opts = "How many bright nodules are visible?", {"A": "1", "B": "2", "C": "3"}
            label, why = str("ABC"[c - 1]), f"Counting the separate bright round spots gives {c}."
        assert img.size == (s, s)
        out.append({"images": [img], "question": q, "options": opts, "answer_label": label, "answer": opts[label],
                    "reasoning": why, "dataset_name": "sample_image", "dataset_index": i, "misc": {"kind": kind}})
    return out


# Basic medical-knowledge MCQs written for this project's bundled sample set (not taken from any dataset): each entry
# has a question, its correct answer, three distractors and a short reasoning trace.
SAMPLE_FACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "sample_facts.json")


def sample_text_items(rng: random.Random) -> list:
    """The sample set's text rows from SAMPLE_FACTS, the correct answer at a seeded position among the options."""
    if not os.path.exists(SAMPLE_FACTS):
        raise SystemExit(f"{SAMPLE_FACTS} is missing: copy assets/ with data_prep.py (the sample set's questions)")
    with open(SAMPLE_FACTS, encoding="utf-8") as f:
        facts = json.load(f)
    out = []
    for i, fact in enumerate(facts):
        q, correct, wrong, why = fact["question"], fact["answer"], fact["distractors"], fact["reasoning"]
        choices = wrong[:]
        pos = rng.randrange(4)
        choices.insert(pos, correct)
        opts = {chr(65 + k): c for k, c in enumerate(choices)}
        out.append({"images": None, "question": q, "options": opts, "answer_label": chr(65 + pos), "answer": correct,
                    "reasoning": why, "dataset_name": "sample_text", "dataset_index": i, "misc": None})
    return out


# Computable clinical MCQs (sub-command `reasoning`): the answer follows from what the question states, so a skill
# learnt on the train part can carry over to the held-out part (other analytes, names, drugs, units, fever thresholds
# and temperatures; the BMI values come from the same bands in both parts).
CLINICAL_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "clinical_vocab.json")
CLINICAL_KINDS = ("abnormal", "fever", "gcs", "bmi", "dose", "convert")


def _fmt(x: float, dp: int) -> str:
    return f"{x:.{dp}f}"


def _num(x: float) -> str:
    """A number without trailing zeros: 250.0 -> '250', 0.25 -> '0.25'."""
    return f"{x:.10f}".rstrip("0").rstrip(".")


# Each maker returns (question, option texts, index of the answer, the working, a note per option text). The trace
# is the working, then the options in the order shown, letter first, each with its check, up to the one that fits,
# then that letter: the letter is written next to the check that picks it (SmolLM2-135M pilots: a trace that named
# the answer's text at its end taught SmolLM2 the format and often the right conclusion, but not the letter that goes
# with it; one that checked every option and then named the letter gave the letter of the fitting one 24-65 % of
# the time, by the SFT run).


def _abnormal(rng, vocab, k):
    picks = rng.sample(vocab["analytes"], k)
    odd = rng.randrange(k)
    lines, notes, names = [], {}, []
    for j, (name, lo, hi, unit, dp) in enumerate(picks):
        step = 10 ** -dp
        if j == odd:
            high = lo <= step or rng.random() < 0.5  # a lower limit of ~0 can only be exceeded
            v = hi * rng.uniform(1.15, 1.8) if high else lo * rng.uniform(0.45, 0.85)
            word = "above" if high else "below"
        else:
            v, word = rng.uniform(lo + (hi - lo) * 0.15, hi - (hi - lo) * 0.15), "within"
        v = round(v, dp)
        unit_s = f" {unit}" if unit else ""
        lines.append(f"- {name} {_fmt(v, dp)}{unit_s} (reference {_fmt(lo, dp)}-{_fmt(hi, dp)})")
        notes[name] = f"{name} {_fmt(v, dp)} is {word} {_fmt(lo, dp)}-{_fmt(hi, dp)}" + (", outside." if j == odd else ".")
        names.append(name)
    q = "Laboratory results:\n" + "\n".join(lines) + "\nWhich result lies outside its reference range?"
    return q, names, odd, "Check each result against its range.", notes


def _digits(t: int, thr: int) -> str:
    """The comparison of two temperatures in tenths of a degree written digit by digit: 379 vs 381 -> '37 < 38';
    381 vs 383 -> '38 = 38, 1 < 3'."""
    (a, x), (b, y) = divmod(t, 10), divmod(thr, 10)
    rel = (lambda u, v: "<" if u < v else (">" if u > v else "="))
    return f"{a} {rel(a, b)} {b}" + (f", {x} {rel(x, y)} {y}" if a == b else "")


def _fever_pair(rng, vocab, k, firsts):
    """Two MCQs on one temperature chart of k readings in time order, each stating a different fever threshold, so
    that the first reading at or above it, the answer, sits at place firsts[0] in the first and firsts[1] in the
    second (two different places). Any rule that ignores the stated threshold gives both the same answer, so it is
    right on at most one of the two: at most 50 % on a set of such pairs. The thresholds are two of the part's
    (fever_thresholds) at least 0.4 C apart, and every temperature lies on the part's half of the tenths, a
    checkerboard (degrees + tenth even in the train part, e.g. 37.5 and 38.0; odd held out, e.g. 37.6 and 38.1): no
    held-out temperature or threshold appears in training, while nearly every digit comparison the held-out part
    needs does (31 of 32 in the default set).
    Rules that use the threshold only in part stay near 50 % too: the answer's reading equals the threshold one time in
    five, readings between the two answers lie at or above the lower threshold and below the higher one, all within
    0.6 C below and 0.8 C above a threshold. Returns a list of two (question, option texts, index of the answer, the
    working, a note per option text)."""
    who = rng.choice(vocab["patients"])
    pairs = [(a, b) for a in vocab["fever_thresholds"] for b in vocab["fever_thresholds"] if b - a > 0.35]
    lo, hi = (round(10 * t) for t in rng.choice(pairs))  # in tenths of a degree, at least 0.4 apart
    grid = [g for g in range(350, 410) if (g // 10 + g % 10) % 2 == vocab["fever_parity"]]
    def near(a, b):  # a reading from a to b tenths, both included
        return rng.choice([g for g in grid if a <= g <= b])
    def cross(thr, top):  # the answer's reading: above thr up to top; thr itself one time in five, or if no room
        above = [g for g in grid if thr < g <= top]
        return rng.choice(above) if above and rng.random() >= 0.2 else thr
    early, late = sorted(firsts)
    temps = ([near(lo - 6, lo - 1) for _ in range(early)] + [cross(lo, min(lo + 6, hi - 1))] +
             [near(lo, hi - 1) for _ in range(late - early - 1)] + [cross(hi, hi + 6)] +
             [near(hi - 4, hi + 8) for _ in range(k - late - 1)])
    start, step = rng.randrange(24), rng.choice([1, 2, 4])
    times = [f"{(start + step * j) % 24:02d}:00" for j in range(k)]
    chart = ", ".join(f"{h} {t / 10:.1f} C" for h, t in zip(times, temps))
    out = []
    for first in firsts:
        thr = lo if first == early else hi
        q = (f"Temperature chart of {who}, in time order: {chart}. On this ward fever is a temperature of "
             f"{thr / 10:.1f} C or higher. At which reading was fever first recorded?")
        notes = {h: f"{h} {t / 10:.1f}, {_digits(t, thr)}, " + ("fever." if j == first else "below.")
                 for j, (h, t) in enumerate(zip(times, temps))}  # short: SmolLM2 spends a token a digit
        out.append((q, times, first, f"Fever is {thr / 10:.1f} C or higher.", notes))
    return out


def _match(values, answer):  # the note of a computed kind: does this option equal the result?
    return {v: f"{v}, " + ("matches." if v == answer else "no.") for v in values}


def _gcs(rng, vocab, k, triples):
    e, v, m = rng.choice(triples)
    g = vocab["gcs"]
    total = e + v + m
    q = (f"A patient has {g['eye'][e - 1][1]} (E{e}), {g['verbal'][v - 1][1]} (V{v}) and {g['motor'][m - 1][1]} "
         f"(M{m}). What is the Glasgow Coma Scale score?")
    lo = max(3, min(total - rng.randrange(k), 15 - k + 1))
    values = [str(x) for x in range(lo, lo + k)]
    return q, values, values.index(str(total)), f"GCS = E + V + M = {e} + {v} + {m} = {total}.", _match(values, str(total))


def _bmi(rng, vocab, k):
    classes = vocab["bmi_classes"]
    c = rng.randrange(len(classes))
    lo, hi, name = classes[c]
    b = round(rng.uniform(max(lo, 15.0) + 0.2, min(hi, 42.0) - 0.2), 1)
    names = [x[2] for x in classes]
    others = rng.sample([n for n in names if n != name], k - 1)
    opts = others + [name]
    q = (f"A patient's body mass index is {b:.1f} kg/m2. The WHO classes are: underweight below 18.5, normal weight "
         f"18.5 to 24.9, overweight 25.0 to 29.9, obesity class I 30.0 to 34.9, obesity class II or higher 35.0 or "
         f"more. Which class applies?")
    def span(l, h):
        return f"{l:.1f} to {h - 0.1:.1f}" if 0 < l and h < 99 else (f"below {h:.1f}" if l == 0 else f"{l:.1f} or more")
    notes = {n: f"{n} is {span(l, h)}, " + ("yes." if n == name else "no.") for l, h, n in classes}
    return q, opts, opts.index(name), f"The BMI is {b:.1f}.", notes


def _dose(rng, vocab, k):
    drug = rng.choice(vocab["drugs"])
    w, d = rng.choice(range(10, 41, 2)), rng.choice([5, 10, 15, 20, 25, 30])
    total = w * d
    wrong = {w * (d + 5), w * (d - 5), (w + 10) * d, (w - 5) * d, w * d * 10, w + d, w * d // 10, w * (d + 10)}
    wrong = sorted(x for x in wrong if x > 0 and x != total)
    values = [f"{x} mg" for x in sorted(rng.sample(wrong, k - 1) + [total])]
    q = (f"A child weighing {w} kg is prescribed {drug} {d} mg/kg as a single dose. How many milligrams is the "
         f"dose?")
    return q, values, values.index(f"{total} mg"), f"{w} kg x {d} mg/kg = {total} mg.", _match(values, f"{total} mg")


def _convert(rng, vocab, k):
    src, dst, f = rng.choice(vocab["conversions"])
    x = rng.choice([0.25, 0.5, 1.5, 2.5, 4, 0.75, 3, 1.2, 2, 6.5, 9, 12.5] if f > 1 else [20, 25, 40, 125, 250, 500, 750, 1500])
    ans = x * f
    ladder = [ans * 10 ** p for p in range(-2, 3)]  # the answer among its powers of ten
    start = rng.randrange(5 - k + 1) if k < 5 else 0
    nums = ladder[start:start + k]
    if ans not in nums:
        nums = ladder[:k] if ladder.index(ans) < k else ladder[-k:]
    values = [f"{_num(v)} {dst}" for v in nums]
    a = f"{_num(ans)} {dst}"
    return (f"Convert {_num(x)} {src} to {dst} (1 {src} = {_num(f)} {dst}).", values, values.index(a),
            f"{_num(x)} x {_num(f)} = {a}.", _match(values, a))


def clinical_items(rng: random.Random, n: int, part: str, start_index: int = 0,
                   kinds: str | tuple[str, ...] = CLINICAL_KINDS) -> list:
    """`n` computable clinical MCQs from the `part` ('train' | 'held_out') of CLINICAL_VOCAB, the `kinds` (a subset of
    CLINICAL_KINDS) in turn. Each item has a short worked trace: the working, the options in the order shown with their
    checks up to the one that fits, and `The answer is {letter}.` Two rounds of the kinds have 4 options, the next two
    5, and so on; the answer sits at each letter equally often per option count, within each kind and over all (up to
    n's remainder), the other options in a seeded random order. Fever items come in pairs, one round apart
    (_fever_pair): one chart, two thresholds, two answers; their options are the chart's times in time order."""
    with open(CLINICAL_VOCAB, encoding="utf-8") as f:
        raw = json.load(f)
    vocab = {k: (v[part] if isinstance(v, dict) and part in v else v) for k, v in raw.items()}
    all_triples = [(e, v, m) for e in range(1, 5) for v in range(1, 6) for m in range(1, 7)]
    held = set(random.Random(1234).sample(all_triples, 40))  # GCS: the held-out part uses unseen E/V/M combinations
    triples = sorted(held) if part == "held_out" else [t for t in all_triples if t not in held]
    parts = kinds.split(",") if isinstance(kinds, str) else kinds  # 'fever,gcs' or ('fever', 'gcs')
    kinds = tuple(dict.fromkeys(k.strip() for k in parts if k.strip()))  # in order, each once
    bad = [k for k in kinds if k not in CLINICAL_KINDS]
    if bad or not kinds:
        what = f"unknown clinical kind(s) {bad}" if bad else "no clinical kind given"
        raise ValueError(f"{what}; the kinds are {', '.join(CLINICAL_KINDS)}")
    ks = [4 + (i // (2 * len(kinds))) % 2 for i in range(n)]  # two rounds of 4 options, two of 5, ...
    count = Counter((kinds[i % len(kinds)], k) for i, k in enumerate(ks))
    wants, start = {}, {4: 0, 5: 0}  # the answer's places per kind and option count: one cycle of the letters runs
    for kind in kinds:  # on through the kinds, so each letter comes equally often per option count within a kind
        for k in (4, 5):  # and over all (up to n's remainder), in a seeded order
            wants[kind, k] = [(start[k] + j) % k for j in range(count[kind, k])]
            start[k] += count[kind, k]
            rng.shuffle(wants[kind, k])
    out, second = [], {}  # fever: the pair's second item (same chart, other threshold), for the next round's item
    for i, k in enumerate(ks):
        kind = kinds[i % len(kinds)]
        if kind == "fever":  # the options are the chart's times, in time order: the answer's place is drawn with it
            if k not in second:
                w, paired = wants[kind, k], i + len(kinds) < n  # the pair's second item: the next round's fever item
                # the two places left most often (then latest in the shuffled list), so a pair always finds two
                top = sorted(set(w), key=lambda v: (w.count(v), max(j for j, x in enumerate(w) if x == v)))[-2:]
                top = top if paired else top[-1:]  # a last, unpaired item takes one place: n's remainder
                for v in top:
                    del w[max(j for j, x in enumerate(w) if x == v)]
                places = top + [(top[-1] + 1) % k] if len(top) == 1 else top  # a second place for its chart
                if paired:
                    rng.shuffle(places)
                pair = _fever_pair(rng, vocab, k, places)
                if paired:
                    second[k] = pair[1]
                q, texts, pos, working, notes = pair[0]
            else:
                q, texts, pos, working, notes = second.pop(k)
        else:
            want = wants[kind, k].pop()
            make = {"abnormal": _abnormal, "bmi": _bmi, "dose": _dose, "convert": _convert}.get(kind)
            q, texts, pos, working, notes = make(rng, vocab, k) if make else _gcs(rng, vocab, k, triples)
            answer, rest = texts[pos], texts[:pos] + texts[pos + 1:]
            rng.shuffle(rest)
            texts, pos = rest[:want] + [answer] + rest[want:], want
        letters = [chr(65 + j) for j in range(len(texts))]
        opts = dict(zip(letters, texts))
        why = " ".join([working] + [f"{L}. {notes[t]}" for L, t in list(opts.items())[:pos + 1]] +
                       [f"The answer is {letters[pos]}."])
        out.append({"images": None, "question": q, "options": opts, "answer_label": letters[pos],
                    "answer": texts[pos], "reasoning": why, "dataset_name": f"clinical_{kind}",
                    "dataset_index": start_index + i, "misc": {"kind": kind, "part": part}})
    return out


# -----------------------------------------------------------------------------------------------------------------
# Writing: validate, bound images, count prompt tokens, drop over-long prompts, write data + manifest + rejects


def shuffle_options(item, seed: int):
    """The item with its option texts permuted and the answer letter moved with its text (--shuffle_options): the
    permutation is seeded by (seed, dataset_name, dataset_index), so a rerun writes the same order. Letters stay
    A, B, ... in order; the answer text is unchanged."""
    letters = sorted(item.options)
    key = hashlib.sha256(f"{seed}\0{item.dataset_name}\0{item.dataset_index}".encode()).digest()
    perm = random.Random(int.from_bytes(key[:8], "little")).sample(range(len(letters)), len(letters))
    texts = [item.options[k] for k in letters]
    item.options = {letters[i]: texts[perm[i]] for i in range(len(letters))}
    item.answer_label = letters[perm.index(letters.index(item.answer_label))]
    return item


def _process(raw, root, bound, counter, shuffle_seed=None):
    """((unified row, prompt tokens), None) or (None, reason) for one raw row; raw['_root'] overrides root; with
    `shuffle_seed` the options are permuted (shuffle_options)."""
    if isinstance(raw, RowError):
        return None, str(raw)
    try:
        raw = dict(raw)
        root = raw.pop("_root", root)
        if isinstance(raw.get("options"), dict):
            raw["options"] = json.dumps(raw["options"], ensure_ascii=False)
        item = parse_row(raw, root)
        if shuffle_seed is not None:
            item = shuffle_options(item, shuffle_seed)
        if bound:
            item.images = [bound_image(im) for im in item.images]
        return (to_row(item), counter(item) if counter else -1), None
    except RowError as e:
        return None, str(e)


@functools.lru_cache(maxsize=2)
def _token_counter(name: str, trust_remote_code: bool):
    """Per process: the processor that counts prompt tokens (workers load their own copy)."""
    from common.model import load_processor

    processor, tok = load_processor(name, trust_remote_code)
    return lambda item: prompts.prompt_tokens(processor, tok, item)


META = ("reject_reason", "source", "source_row")  # bookkeeping columns, removed before writing


def _rows_gen(shards, table, root, bound, tokenizer, trust_remote_code, max_prompt_length, extra, source,
             shuffle_seed=None):
    """One worker's shards of rows: converted and validated, or an empty row carrying the reason it was rejected."""
    counter = _token_counter(tokenizer, trust_remote_code) if tokenizer else None
    for src, raw in (x for shard in shards for x in shard):
        if isinstance(raw, int):  # an index into an existing dataset: read it here, in the worker
            try:
                raw = table[raw]
            except RowError as e:
                raw = e
            except Exception as e:  # a cell that cannot be decoded
                raw = RowError(f"unreadable row ({type(e).__name__})")
        got, reason = _process(raw, root, bound, counter, shuffle_seed)
        if got is not None and counter is not None and got[1] > max_prompt_length:
            got, reason = None, f"prompt too long ({got[1]} tokens > {max_prompt_length})"
        label, row_no = src if isinstance(src, tuple) else (source, src)
        if got is None:
            row = {"dataset_name": raw.get("dataset_name") if isinstance(raw, dict) else None,
                   "dataset_index": raw.get("dataset_index") if isinstance(raw, dict) else None}
            row["dataset_index"] = row["dataset_index"] if isinstance(row["dataset_index"], int) else None
            yield {**row, "reject_reason": reason, "source": str(label), "source_row": row_no}
            continue
        row, n = got
        row["prompt_tokens"] = n
        for k, (_, fn) in extra.items():
            row[k] = fn(row)
        yield {**row, "reject_reason": None, "source": str(label), "source_row": row_no}


def write_set(rows, out: str, flags: dict, source: str, root=None, bound: bool = True, tokenizer: str = "",
              max_prompt_length: int = 2048, extra_columns: dict | None = None, rejects_in: list | None = None,
              trust_remote_code: bool = False, table=None, num_proc: int = 0) -> dict:
    """Validate and write rows [(source_row, raw | index into `table`)] to `out` atomically; return the manifest.

    Rows stream through datasets' generator builder (images never all in memory), in `num_proc` worker processes
    (0 = up to 4 for large inputs); rejected rows travel as empty rows with their reason and are split off at the end."""
    import datasets

    extra = extra_columns or {}
    feats = features()
    feats["prompt_tokens"] = datasets.Value("int32")
    for k, (feat, _) in extra.items():
        feats[k] = feat
    feats["reject_reason"], feats["source"] = datasets.Value("string"), datasets.Value("string")
    feats["source_row"] = datasets.Value("int64")
    rows = list(rows)
    num_proc = num_proc or (min(4, os.cpu_count() or 1) if len(rows) > 2000 else 1)
    n_shards = num_proc * 4 if num_proc > 1 else 1
    step = max(1, -(-len(rows) // n_shards))
    shards = [rows[i : i + step] for i in range(0, len(rows), step)] or [[]]
    kw = dict(table=table, root=root, bound=bound, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
              max_prompt_length=max_prompt_length, extra=extra, source=source,
              shuffle_seed=flags.get("option_seed", 0) if flags.get("shuffle_options") else None)
    with atomic_dir(out) as tmp:
        if rows:
            ds = datasets.Dataset.from_generator(_rows_gen, features=feats, cache_dir=os.path.join(tmp, ".cache"),
                                                 gen_kwargs={"shards": shards, **kw},
                                                 num_proc=num_proc if len(shards) > 1 else None)
        else:
            ds = datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
        meta = ds.select_columns(["reject_reason", "source", "source_row", "dataset_name", "dataset_index",
                                  "prompt_tokens", "answer_label"]).to_list()
        rejects = list(rejects_in or []) + [
            {"source": m["source"], "source_row": m["source_row"], "dataset_name": m["dataset_name"],
             "dataset_index": m["dataset_index"], "reason": m["reject_reason"]} for m in meta if m["reject_reason"]]
        kept = [m for m in meta if not m["reject_reason"]]
        ok = ds.filter(lambda r: r is None, input_columns="reject_reason", num_proc=None).remove_columns(list(META))
        ok.to_parquet(os.path.join(tmp, "data.parquet"))
        del ds, ok
        shutil.rmtree(os.path.join(tmp, ".cache"), ignore_errors=True)
        write_jsonl(os.path.join(tmp, "rejects.jsonl"), rejects)
        h = hashlib.sha256()
        with open(os.path.join(tmp, "data.parquet"), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        lengths = [m["prompt_tokens"] for m in kept]
        manifest = {"source": source, "rows_in": len(rows) + len(rejects_in or []), "rows_out": len(kept),
                    "rows_rejected": len(rejects),
                    "reject_reasons": dict(Counter(reason_kind(r["reason"]) for r in rejects)),
                    "per_dataset": dict(Counter(m["dataset_name"] for m in kept)),
                    "gold_letters": gold_letters(kept), "options_shuffled": bool(flags.get("shuffle_options")),
                    "prompt_tokens": {
                        "checked_with": tokenizer or None, "max_prompt_length": max_prompt_length if tokenizer else None,
                        "max": max(lengths) if lengths and tokenizer else None,
                        "mean": sum(lengths) / len(lengths) if lengths and tokenizer else None},
                    "images_bounded": bound, "num_proc": num_proc, "sha256": h.hexdigest(), "flags": flags,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(os.path.join(tmp, "manifest.json"), manifest)
    print(f"wrote {out}: {manifest['rows_out']} rows kept of {manifest['rows_in']} "
          f"({manifest['rows_rejected']} rejected: {manifest['reject_reasons']})", flush=True)
    for name, letters in manifest["gold_letters"].items():
        n = sum(letters.values())
        print(f"  {name}: gold letters " + ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in letters.items()), flush=True)
    return manifest


def gold_letters(rows: list) -> dict:
    """{dataset_name: {letter: n}} of the rows' answer letters (a set whose answers are mostly "A" rewards a model
    that always says "A"; --shuffle_options randomises them, balanced in expectation)."""
    out = {}
    for m in rows:
        out.setdefault(m["dataset_name"], Counter())[m["answer_label"]] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items(), key=lambda kv: str(kv[0]))}


# -----------------------------------------------------------------------------------------------------------------
# Sub-commands


def sample(
    out: str = "data/sample",  # writes out/{text,image,eval}
    seed: int = 0,  # option order and drawn images
    n_images: int = 40,  # image MCQs (32 train / 8 eval)
    eval_fraction: float = 0.2,  # held-out share of each kind
):
    """The bundled demo/test set: 60 text MCQs with short reasoning, and drawn-image MCQs a model can learn."""
    rng = random.Random(seed)
    text, image = sample_text_items(rng), sample_image_items(rng, n_images)
    n_te, n_ie = int(len(text) * eval_fraction), int(len(image) * eval_fraction)
    flags = dict(seed=seed, n_images=n_images, eval_fraction=eval_fraction)
    write_set(list(enumerate(text[n_te:])), os.path.join(out, "text"), flags, "bundled facts (train)")
    write_set(list(enumerate(image[n_ie:])), os.path.join(out, "image"), flags, "drawn images (train)")
    write_set(list(enumerate(text[:n_te] + image[:n_ie])), os.path.join(out, "eval"), flags, "bundled (held out)")


def reasoning(
    out: str = "data/reasoning",  # writes out/{train,eval,image,image_eval}
    seed: int = 0,  # values, names, option order and drawn images
    n_train: int = 240,  # computable text MCQs to train on (the kinds in turn)
    n_eval: int = 120,  # held-out ones: other analytes, patients, drugs, units, GCS triples, fever values
    n_images: int = 40,  # drawn-image MCQs whose answer follows from the picture (VL path; 80 % train)
    kinds: str = ",".join(CLINICAL_KINDS),  # comma-separated subset of abnormal,fever,gcs,bmi,dose,convert
):
    """The learnable bundled set: clinical MCQs whose answer can be worked out from the question (a lab value against
    its stated range, the first reading of a temperature chart at or above a stated fever threshold, a GCS total, a
    BMI class from stated cut-offs, a weight-based dose, a unit conversion), each with a short worked trace for SFT,
    and a held-out part that shares no analyte, patient, drug, conversion, GCS combination, fever threshold or
    temperature with the train part (CLINICAL_VOCAB); the BMI values come from the same bands in both parts. Fever
    items come in pairs that only the stated threshold tells apart, so a rule that ignores it scores at most 50 % on
    them. `kinds` (a comma-separated string or a sequence) picks which of them; ValueError for an unknown one. On
    SmolLM2-135M with one epoch of 240 traces, held out: fever alone 77.5 %, 80.8 % after 4 GRPO steps (run/demo.sh,
    2026-12-06); with the earlier fever kind (one threshold for all), lab ranges alone 15 % and the six kinds mixed
    23 %, at chance (pilots of 2026-12-04)."""
    flags = dict(locals())
    rng = random.Random(seed)
    train = clinical_items(rng, n_train, "train", kinds=kinds)
    held = clinical_items(rng, n_eval, "held_out", start_index=n_train, kinds=kinds)
    image = sample_image_items(rng, n_images)
    n_ie = n_images // 5
    write_set(list(enumerate(train)), os.path.join(out, "train"), flags, "computable clinical MCQs (train)")
    write_set(list(enumerate(held)), os.path.join(out, "eval"), flags, "computable clinical MCQs (held out)")
    write_set(list(enumerate(image[n_ie:])), os.path.join(out, "image"), flags, "drawn images (train)")
    write_set(list(enumerate(image[:n_ie])), os.path.join(out, "image_eval"), flags, "drawn images (held out)")


def eval_set(
    out: str = "data/eval",  # output folder
    source: str = "UCSC-VLAA/MedVLThinker-Eval",  # unified eval set (hub id or local copy); used when no raw flag is set
    split: str = "test",  # split of a hub dataset
    vqa_rad: str = "",  # raw VQA-RAD folder (OSF release layout)
    slake: str = "",  # raw SLAKE folder (test.json + imgs/)
    pathvqa: str = "",  # PathVQA parquet (image, question, answer)
    mmmu: str = "",  # MMMU parquet of the health/medicine subsets
    medxpertqa_mm: str = "",  # MedXpertQA MM jsonl
    medxpertqa_images: str = "",  # its images folder
    pmc_vqa_csv: str = "",  # PMC-VQA test csv
    pmc_vqa_images: str = "",  # its images folder
    bound_images: bool = False,  # recipe: eval images are not resized (the processor's max_pixels applies)
    tokenizer: str = "",  # count prompt tokens with this model's processor ('' = skip)
    max_prompt_length: int = 1_000_000,  # eval prompts are not length-filtered by default
    num_proc: int = 0,  # worker processes (0 = up to 4 for large inputs)
    shuffle_options: bool = False,  # shuffle each row's options (seeded; balanced in expectation only; recipe: off)
    option_seed: int = 0,  # the permutations' seed
):
    """The unified six-benchmark evaluation set."""
    flags = dict(locals())
    raw = {"vqa_rad": vqa_rad, "slake": slake, "pathvqa": pathvqa, "mmmu": mmmu, "medxpertqa_mm": medxpertqa_mm,
           "pmc_vqa": pmc_vqa_csv}
    if not any(raw.values()):
        root, rows, table = unified_rows(source, split)
        write_set(rows, out, flags, source, root, bound_images, tokenizer, max_prompt_length, table=table,
                  num_proc=num_proc)
        return
    parts = []
    if pmc_vqa_csv:
        parts.append((pmc_vqa_csv, pmc_vqa_rows(pmc_vqa_csv, pmc_vqa_images)))
    if mmmu:
        parts.append((mmmu, mmmu_rows(mmmu)))
    if medxpertqa_mm:
        parts.append((medxpertqa_mm, medxpertqa_mm_rows(medxpertqa_mm, medxpertqa_images)))
    if pathvqa:
        parts.append((pathvqa, pathvqa_rows(pathvqa)))
    if slake:
        parts.append((slake, slake_rows(slake)))
    if vqa_rad:
        parts.append((vqa_rad, vqa_rad_rows(vqa_rad)))
    _write_parts(parts, out, flags, "raw benchmark files", bound_images, tokenizer, max_prompt_length, num_proc)


def _write_parts(parts, out, flags, source, bound, tokenizer, max_prompt_length, num_proc=0):
    """Concatenate converted sources (images resolve inside each source's own folder); indices become 0..N-1."""
    rows, rejects = [], []
    for label, (root, part) in parts:
        for src, raw in part:
            if isinstance(raw, RowError):
                rejects.append({"source": label, "source_row": src, "dataset_name": None, "dataset_index": None,
                                "reason": str(raw)})
                continue
            misc = raw.get("misc") or {}
            rows.append(((label, src), {**raw, "_root": root, "dataset_index": len(rows),
                                        "misc": {**misc, "source_index": raw["dataset_index"]}}))
    return write_set(rows, out, flags, source, None, bound, tokenizer, max_prompt_length, rejects_in=rejects,
                     num_proc=num_proc)


def text(
    out: str = "data/text",  # output folder
    source: str = "",  # unified text set, e.g. UCSC-VLAA/MedVLThinker-m23k-tokenized (hub or local); '' = raw files
    split: str = "train",  # split of a hub dataset
    medqa: str = "",  # MedQA-USMLE jsonl (jind11/medagents layout)
    medmcqa: str = "",  # MedMCQA jsonl (medagents layout)
    headqa: str = "",  # HEAD-QA English json
    pubmedqa: str = "",  # PubMedQA ori_pqal.json
    pubmedqa_context: bool = True,  # put the abstract's contexts before the question
    medxpertqa_text: str = "",  # MedXpertQA Text jsonl (medagents layout)
    tokenizer: str = "",  # count prompt tokens with this model's processor ('' = skip)
    max_prompt_length: int = 2048,  # recipe: prompts over 2048 tokens cannot be trained on
    num_proc: int = 0,  # worker processes (0 = up to 4 for large inputs)
    shuffle_options: bool = False,  # shuffle each row's options (seeded; balanced in expectation only; recipe: off)
    option_seed: int = 0,  # the permutations' seed
):
    """Text-only training MCQs (m23k, or raw MedQA / MedMCQA / HEAD-QA / PubMedQA / MedXpertQA-Text files)."""
    flags = dict(locals())
    if source:
        root, rows, table = unified_rows(source, split)
        write_set(rows, out, flags, source, root, True, tokenizer, max_prompt_length, table=table, num_proc=num_proc)
        return
    parts = []
    if medqa:
        parts.append((medqa, medqa_rows(medqa)))
    if medmcqa:
        parts.append((medmcqa, medqa_rows(medmcqa, "medmcqa")))
    if headqa:
        parts.append((headqa, headqa_rows(headqa)))
    if pubmedqa:
        parts.append((pubmedqa, pubmedqa_rows(pubmedqa, pubmedqa_context)))
    if medxpertqa_text:
        parts.append((medxpertqa_text, medxpertqa_text_rows(medxpertqa_text)))
    if not parts:
        raise SystemExit("text: give --source or at least one raw file flag")
    _write_parts(parts, out, flags, "raw text QA files", True, tokenizer, max_prompt_length, num_proc)


def pmc_vqa(
    out: str = "data/pmc_vqa",  # output folder
    csv_path: str = "",  # PMC-VQA train.csv ('' = use --source)
    images: str = "",  # folder the csv's Figure_path values are relative to
    source: str = "UCSC-VLAA/MedVLThinker-pmc_vqa",  # the converted hub copy, used when --csv_path is empty
    split: str = "train",  # split of a hub dataset
    tokenizer: str = "",  # count prompt tokens with this model's processor ('' = skip)
    max_prompt_length: int = 2048,  # recipe: prompts over 2048 tokens cannot be trained on
    num_proc: int = 0,  # worker processes (0 = up to 4 for large inputs)
    shuffle_options: bool = False,  # shuffle each row's options (seeded; balanced in expectation only; recipe: off)
    option_seed: int = 0,  # the permutations' seed
):
    """PMC-VQA training set with the upstream cleaning rules (RECIPE §1.4) and image bounds (§1.6)."""
    flags = dict(locals())
    if csv_path:
        _write_parts([(csv_path, pmc_vqa_rows(csv_path, images))], out, flags, csv_path, True, tokenizer,
                     max_prompt_length, num_proc)
        return
    root, rows, table = unified_rows(source, split)
    write_set(rows, out, flags, source, root, True, tokenizer, max_prompt_length, table=table, num_proc=num_proc)


def pass_counts(path: str, grader: str = "inference") -> tuple[dict, int]:
    """{dataset_index: number of samples graded correct} and n (samples per item) from evaluate.py's items.jsonl.

    `path` is evaluate's output folder or its items.jsonl; every record is one sample, graded by every grader
    (field grading.verdict_field(grader)); items whose generation failed are in failed.jsonl, not here, and count as
    not evaluated.
    Raises SystemExit when the file is missing, comes from a greedy run, has unreadable lines, lacks the grader's
    field, mixes sample counts, or holds one dataset_index under two dataset_names (pass counts are keyed by
    dataset_index, RECIPE §2.2)."""
    path = path if path.endswith(".jsonl") else os.path.join(path, "items.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found (run evaluate.py --runs 1 --samples 16 --temperature 1.0 --out ... first)")
    config = os.path.join(os.path.dirname(path), "config.json")  # evaluate.py's flags for this folder
    if os.path.exists(config) and json.load(open(config)).get("temperature", 1.0) == 0:
        raise SystemExit(f"{path}: a greedy evaluation (temperature 0); pass counts need sampling (RECIPE §2.1: "
                         "--runs 1 --samples 16 --temperature 1.0)")
    records, bad = read_jsonl(path)
    if bad:  # evaluate.py writes this file whole when it finishes: a bad line is damage, not a kill
        raise SystemExit(f"{path}: {len(bad)} unreadable line(s), e.g. {bad[0]}")
    field = grading.verdict_field(grader)
    counts, n, names = Counter(), Counter(), {}
    for k, r in enumerate(records):
        if field not in r:
            raise SystemExit(f"{path} line {k + 1}: no {field!r} field (written by an older evaluate.py? run "
                             f"`evaluate.py regrade` on its folder)")
        i = r["dataset_index"]
        if names.setdefault(i, r["dataset_name"]) != r["dataset_name"]:
            raise SystemExit(f"{path}: dataset_index {i} appears under {names[i]!r} and {r['dataset_name']!r}")
        counts[i] += bool(r[field])
        n[i] += 1
    sizes = Counter(n.values())
    if len(sizes) > 1:
        raise SystemExit(f"{path}: items have different numbers of samples {dict(sizes)} (a run still going?)")
    return {i: counts[i] for i in n}, next(iter(sizes), 0)


def filter_set(
    data: str = "data/text",  # a folder written by this script
    passrate: str = "data/passrate",  # evaluate.py output folder (or its items.jsonl) with the pass-count samples
    grader: grading.Grader = "inference",  # inference = upstream's pass-count grader (RECIPE §2.1) | strict | lenient
    out: str = "data/text_e2h",  # output folder
    min_pass: int = 1,  # keep min_pass <= pass_count <= max_pass (recipe: 1..7 of 16)
    max_pass: int = 7,  # recipe: 7 (at most 7 of 16 right)
    order: Literal["easy_to_hard", "hard_to_easy", "shuffle"] = "easy_to_hard",  # after the seeded shuffle
    seed: int = 42,  # the shuffle before the stable sort
):
    """Keep the medium-difficulty items, shuffle (seed 42), stable-sort by pass count (RECIPE §2.2).

    Pass counts come from evaluate.py run on the training data with the recipe's sampling (§2.1):
    `evaluate.py --model 3b --data data/text --runs 1 --samples 16 --temperature 1.0 --out data/passrate`."""
    flags = dict(locals())
    cli.check_choices(filter_set, flags)
    counts, n = pass_counts(passrate, grader)
    if max_pass >= n or min_pass > n:
        print(f"note: pass counts are out of {n} samples; --min_pass {min_pass} --max_pass {max_pass} are counts "
              f"(the recipe's 1..7 are of 16)")
    ds = load_rows(data)
    if isinstance(ds, JsonlRows):  # a .jsonl source becomes a Dataset (the filter writes parquet); a bad line stops
        import datasets

        try:
            ds = datasets.Dataset.from_list([read_row(ds, i) for i in range(len(ds))])
        except RowError as e:
            raise SystemExit(f"{data}: {e}") from None
    before = Counter(counts.get(i, -1) for i in ds["dataset_index"])
    ds = ds.map(lambda i: {"pass_count": counts.get(i, -1)}, input_columns="dataset_index")
    keep = ds.filter(lambda c: min_pass <= c <= max_pass, input_columns="pass_count")
    keep = keep.shuffle(seed=seed)
    if order in ("easy_to_hard", "hard_to_easy"):
        sign = -1 if order == "easy_to_hard" else 1  # Python's sort is stable: ties keep the shuffled order
        pcs = keep["pass_count"]
        keep = keep.select(sorted(range(len(keep)), key=lambda i: sign * pcs[i]))
    after = Counter(keep["pass_count"])
    manifest = {"source": data, "passrate": passrate, "grader": grader, "samples_per_item": n,
                "rows_in": len(ds), "rows_out": len(keep),
                "dropped": {"not evaluated (-1)": before.get(-1, 0),
                            f"pass_count < {min_pass}": sum(v for k, v in before.items() if 0 <= k < min_pass),
                            f"pass_count > {max_pass}": sum(v for k, v in before.items() if k > max_pass)},
                "histogram_before": dict(sorted(before.items())), "histogram_after": dict(sorted(after.items())),
                "flags": flags}
    with atomic_dir(out) as tmp:
        keep.to_parquet(os.path.join(tmp, "data.parquet"))
        write_json(os.path.join(tmp, "manifest.json"), manifest)
    print(f"pass counts ({grader} grader, of {n} samples) before: {manifest['histogram_before']}")
    print(f"kept {len(keep)} of {len(ds)} ({min_pass}..{max_pass}), order {order}: {manifest['histogram_after']}")


def sft(
    data: str = "data/pmc_vqa",  # a folder written by this script
    out: str = "data/pmc_vqa_sft",  # output folder: rows with reasoning only
    traces: str = "",  # evaluate.py items.jsonl (or any jsonl with dataset_index + response [+ correct]) to attach
    split: str = "train",  # split of a hub dataset
):
    """Attach reasoning traces (first correct rollout's <think> text, RECIPE §1.5) and keep rows that have one.

    sft.py trains on `<think> {reasoning} </think>\\n<answer> {label} </answer>` built from these rows."""
    flags = dict(locals())
    import datasets

    ds = load_rows(data, split, decode_images=False)
    found = {}
    if traces:
        records, bad = read_jsonl(traces)
        if bad:
            raise SystemExit(f"{traces}: {len(bad)} unreadable line(s), e.g. {bad[0]}")
        for r in records:
            ok = r.get(grading.verdict_field("lenient"), True)
            m = re.search(r"<think>(.*?)</think>", r.get("response", ""), re.DOTALL)
            if ok and m and r["dataset_index"] not in found:
                found[r["dataset_index"]] = m.group(1).strip()
    table = _WithTraces(ds, found)
    write_set([(i, i) for i in range(len(ds))], out, flags, data, data_root(data), False, table=table,
              extra_columns={"target": (datasets.Value("string"),
                                        lambda r: prompts.sft_target(r["reasoning"], r["answer_label"]))})


class _WithTraces:
    """A dataset whose rows get their reasoning from `found` (dataset_index -> trace); rows without one are rejected."""

    def __init__(self, ds, found):
        self.ds, self.found = ds, found

    def __getitem__(self, i):
        row = dict(self.ds[i])
        row.pop("prompt_tokens", None)
        row["reasoning"] = self.found.get(row["dataset_index"], row.get("reasoning"))
        if not (row["reasoning"] or "").strip():
            raise RowError("no reasoning trace")
        return row


def normalise_question(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


HASH_SIDE = 16  # pHash of 16 x 16 DCT frequencies: 256 bits
NEAR_BITS = 32  # Hamming distance (of 256) that counts as the same image; measured by bench/decontam_hash.py


def image_hashes(img: Image.Image) -> tuple[str, int]:
    """(sha256 of the RGB pixels, 256-bit DCT hash) of an image, as the one image path shows it (load_image).

    The DCT hash (pHash; Zauner 2010, as imagehash.phash computes it): grey, resized to 64 x 64 (bilinear), 2-D
    DCT-II, the 16 x 16 lowest frequencies, one bit per frequency above their median. Chosen by bench/decontam_hash.py
    on the 177 real VQA-RAD scans: the 8 x 8 average hash used before called 372 of 15,576 pairs of different scans
    (2.4 %) duplicates at distance 4; this hash puts every pair of different scans at least 68 bits apart and each
    scan's copies (JPEG q=75, half size, 10 % brighter) at most 16 bits away, so NEAR_BITS = 32 sits between them."""
    import numpy as np

    img = load_image(img)
    exact = hashlib.sha256(img.tobytes()).hexdigest()
    n = 4 * HASH_SIDE
    a = np.asarray(img.convert("L").resize((n, n), Image.BILINEAR), dtype=np.float64)
    k = np.arange(n)
    d = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # DCT-II basis; scale does not change the bits
    low = (d @ a @ d.T)[:HASH_SIDE, :HASH_SIDE].ravel()
    return exact, sum(1 << i for i, v in enumerate(low > np.median(low)) if v)


def near_index(bits: int, width: int = HASH_SIDE**2):
    """(add, find) over hashes of up to `width` bits (ints): find(h) is the value of the first added hash within
    `bits` Hamming distance of h, else None. One vectorised XOR + popcount over all added hashes (numpy, 64-bit words)
    per find: 0.1 ms against 5,000 random 256-bit hashes here, where the multi-index hashing used before (bits + 1 =
    33 blocks at distance 32) took 1 ms."""
    import numpy as np

    words, mask = (width + 63) // 64, (1 << 64) - 1
    rows, values, table = [], [], [np.zeros((0, words), np.uint64)]

    def split(h: int) -> list[int]:
        return [(h >> (64 * w)) & mask for w in range(words)]

    def add(h: int, value) -> None:
        rows.append(split(h))
        values.append(value)

    def find(h: int):
        if len(table[0]) != len(rows):
            table[0] = np.array(rows, dtype=np.uint64).reshape(len(rows), words)
        dist = np.bitwise_count(table[0] ^ np.array(split(h), dtype=np.uint64)).sum(axis=1)
        hit = np.flatnonzero(dist <= bits)
        return values[hit[0]] if len(hit) else None

    return add, find


def decontaminate(
    train: str = "data/text",  # training folder written by this script
    eval_data: str = "data/eval",  # evaluation folder
    out: str = "",  # folder for manifest.json (the counts) and, with a drop flag, the cleaned training set
    drop: bool = False,  # drop question overlaps (same question and image) from the training set (else only report)
    drop_image_overlap: bool = False,  # also drop image-only overlaps (VQA-RAD's own train/test splits share images)
    phash_bits: int = NEAR_BITS,  # DCT-hash Hamming distance (of 256) that counts as the same image (0 = exact only)
):
    """Report training rows that overlap the eval set, in two disjoint kinds, with counts per benchmark:
    question overlap = the normalised question matches and so do the images (exact pixels or DCT hash), or both
    are text-only; image overlap = an image matches an eval image under any other question (a paraphrase on the same
    pixels, or another question about the same scan). Only question overlaps are dropped with --drop; image
    overlaps are dropped only with --drop_image_overlap, since benchmarks' own splits share images."""
    tr, ev = load_rows(train), load_rows(eval_data)
    ev_q, ev_exact = {}, {}
    add_near, find_near = near_index(phash_bits)
    for r in tqdm(ev, desc="index eval", unit="row"):
        hashes = [image_hashes(im) for im in (r.get("images") or [])]
        ev_q.setdefault(normalise_question(r["question"]), []).append((r["dataset_name"], hashes))
        for exact, avg in hashes:
            ev_exact.setdefault(exact, r["dataset_name"])
            add_near(avg, r["dataset_name"])
    flagged, per_bench, image_rows, image_bench, image_kind = [], Counter(), [], Counter(), Counter()
    for i, r in enumerate(tqdm(tr, desc="scan train", unit="row")):
        mine = [image_hashes(im) for im in (r.get("images") or [])]
        for bench, theirs in ev_q.get(normalise_question(r["question"]), []):
            same = (not mine and not theirs) or any(
                a[0] == b[0] or bin(a[1] ^ b[1]).count("1") <= phash_bits for a in mine for b in theirs)
            if same:
                flagged.append({"train_row": i, "dataset_index": r["dataset_index"], "benchmark": bench})
                per_bench[bench] += 1
                break
        else:  # not a question overlap: does any of its images appear in the eval set under another question?
            for exact, avg in mine:
                kind, bench = ("exact", ev_exact[exact]) if exact in ev_exact else ("near", find_near(avg))
                if bench is not None:
                    image_rows.append({"train_row": i, "dataset_index": r["dataset_index"], "benchmark": bench,
                                       "match": kind})
                    image_bench[bench] += 1
                    image_kind[kind] += 1
                    break
    report = {"train": train, "eval": eval_data, "train_rows": len(tr), "flagged": len(flagged),
              "per_benchmark": dict(per_bench), "rows": flagged[:1000],
              "image_overlap": {"rows": len(image_rows), "exact": image_kind["exact"], "near": image_kind["near"],
                                "per_benchmark": dict(image_bench), "dropped": drop_image_overlap,
                                "listed": image_rows[:1000]}}
    print(f"{len(flagged)} of {len(tr)} training rows also appear in the eval set (question and image): "
          f"{dict(per_bench)}; {len(image_rows)} more share an eval image under another question: {dict(image_bench)}"
          f"{' (dropped)' if drop_image_overlap else ' (kept; --drop_image_overlap true drops them)'}")
    if (drop or drop_image_overlap) and not out:
        raise SystemExit("--drop / --drop_image_overlap need --out")
    if out and os.path.realpath(out) in (os.path.realpath(train), os.path.realpath(eval_data)):
        raise SystemExit(f"--out {out} is an input folder: it would be replaced (give a new folder)")
    if out:
        bad = {f["train_row"] for f in (flagged if drop else []) + (image_rows if drop_image_overlap else [])}
        with atomic_dir(out) as tmp:
            if drop or drop_image_overlap:
                tr.select([i for i in range(len(tr)) if i not in bad]).to_parquet(os.path.join(tmp, "data.parquet"))
            write_json(os.path.join(tmp, "manifest.json"), {**report, "rows_out": len(tr) - len(bad)})


COMMANDS = {"sample": sample, "reasoning": reasoning, "eval": eval_set, "text": text, "pmc_vqa": pmc_vqa, "filter": filter_set, "sft": sft,
            "decontaminate": decontaminate}

if __name__ == "__main__":
    cli.run(COMMANDS)
