"""data_prep.py: converters, rejects, token-length filter, pass rates, curation, decontamination, SFT traces.

    pytest -q tests/test_data_prep.py"""

import csv
import json
import os
import random
from collections import Counter

import pytest
from PIL import Image

import data_prep as dp
from common.data import RowError, load_image, load_rows
from conftest import run_py


def manifest(path):
    return json.load(open(os.path.join(path, "manifest.json")))


def rejects(path):
    return [json.loads(x) for x in open(os.path.join(path, "rejects.jsonl"))]


@pytest.mark.parametrize("q,a,want", [
    ("Is there a fracture?", "yes", {"A": "Yes", "B": "No"}),
    ("Is this supratentorial or infratentorial?", "supratentorial", {"A": "Supratentorial", "B": "Infratentorial"}),
    ("Is the lesion on the left or right side of the brain?", "Left", {"A": "Left", "B": "Right"}),
    ("Is the gastric bubble shown on the left or right side of the patient?", "Right side",
     {"A": "Left side", "B": "Right side"}),
    ("Is this a T1 weighted, T2 weighted, or FLAIR image?", "FLAIR",
     {"A": "T1 weighted", "B": "T2 weighted", "C": "FLAIR"}),
    ("Is this a CT or an MRI?", "MRI", {"A": "CT", "B": "MRI"}),
])
def test_closed_options(q, a, want):
    assert dp.closed_options(q, a) == want


@pytest.mark.parametrize("q,a", [("What organ is shown?", "liver"), ("Are there multiple or just 1 focus?", "one")])
def test_closed_options_reject(q, a):
    with pytest.raises(RowError):
        dp.closed_options(q, a)


def test_sample_set(sample_data):
    text, image, ev = (load_rows(os.path.join(sample_data, k)) for k in ("text", "image", "eval"))
    assert (len(text), len(image), len(ev)) == (48, 32, 20)
    assert all(r["reasoning"] for r in text) and all(r["images"] is None for r in text)
    assert all(len(r["images"]) == 1 and r["images"][0].size == (112, 112) for r in image)
    labels = {r["answer_label"] for r in text}
    assert labels == {"A", "B", "C", "D"}  # the correct option moves around
    train_q = {(r["dataset_name"], r["question"], r["answer"]) for r in text}
    assert not train_q & {(r["dataset_name"], r["question"], r["answer"]) for r in ev}


def test_reasoning_set_is_computable_balanced_and_held_out(tmp_path):
    """Issue 19 item 1: every answer follows from the question (recomputed here from its numbers), the held-out part
    shares no analyte, patient, drug, conversion, GCS combination, temperature or fever threshold with the train
    part, its fever items come in pairs that only the stated threshold tells apart, it has 4- and 5-option
    items with each letter equally often per option count, and every trace checks the options in the order
    shown, letter first, up to the answer's, and ends with the answer's letter."""
    import re

    dp.reasoning(out=str(tmp_path / "r"), n_train=60, n_eval=120, n_images=10)
    train, held = (load_rows(str(tmp_path / "r" / k)) for k in ("train", "eval"))
    assert len(train) == 60 and len(held) == 120 and len(load_rows(str(tmp_path / "r" / "image_eval"))) == 2
    assert manifest(tmp_path / "r" / "eval")["per_dataset"] == {f"clinical_{k}": 20 for k in dp.CLINICAL_KINDS}

    def facts(r):  # the names a question mentions, and its GCS triple
        return set(re.findall(r"(?:Mr|Ms) [A-Z][a-z]+|^- ([A-Za-z ]+?) [0-9]", r["question"], re.M)) - {""}, \
            re.findall(r"\(E(\d)\).*\(V(\d)\).*\(M(\d)\)", r["question"]), \
            re.findall(r"prescribed ([a-z-]+)|Convert [0-9.]+ (.+?) to (.+?) \(", r["question"])
    seen = [set(), set(), set()]
    for r in train:
        for s, f in zip(seen, facts(r)):
            s.update(map(str, f) if not isinstance(f, set) else f)
    for r in held:
        for s, f in zip(seen, facts(r)):
            assert not s & (set(map(str, f)) if not isinstance(f, set) else f), (r["question"], s & set(map(str, f)))
    by_k = Counter((len(json.loads(r["options"])), r["answer_label"]) for r in held)
    assert by_k == {**{(4, L): 15 for L in "ABCD"}, **{(5, L): 12 for L in "ABCDE"}}, by_k
    for kind in dp.CLINICAL_KINDS:  # and within each kind, up to one
        per = Counter((len(json.loads(r["options"])), r["answer_label"])
                      for r in held if r["dataset_name"] == f"clinical_{kind}")
        assert all(max(per[k, L] for L in "ABCDE"[:k]) - min(per[k, L] for L in "ABCDE"[:k]) <= 1 for k in (4, 5)), per
    for r in list(train) + list(held):
        opts, kind = json.loads(r["options"]), r["dataset_name"].removeprefix("clinical_")
        assert opts[r["answer_label"]] == r["answer"] and len(set(opts.values())) == len(opts), r
        walk = re.findall(r" ([A-E])\. (.+?)(?= [A-E]\. | The answer is)", r["reasoning"])  # every option in order
        upto = list(opts)[:list(opts).index(r["answer_label"]) + 1]
        assert [L for L, _ in walk] == upto and r["reasoning"].endswith(f"The answer is {r['answer_label']}.")
        picked = [L for L, note in walk if note.endswith(("matches.", "yes.", "outside.", "fever."))]
        assert picked == [r["answer_label"]], r["reasoning"]
        assert all(re.match(re.escape(opts[L]) + r"[ ,]", note) for L, note in walk), r["reasoning"]  # its own text
        q = r["question"]
        if kind == "gcs":
            assert int(r["answer"]) == sum(map(int, re.findall(r"\([EVM](\d)\)", q)))
        elif kind == "dose":
            w, d = map(int, re.findall(r"(\d+) kg .* (\d+) mg/kg", q)[0])
            assert r["answer"] == f"{w * d} mg"
        elif kind == "convert":
            x, f = (float(v) for v in re.findall(r"Convert ([0-9.]+) .*= ([0-9.]+) ", q)[0])
            assert abs(float(r["answer"].split()[0]) - x * f) < 1e-9 * max(1, x * f)
        elif kind == "fever":  # the first reading at or above the stated threshold; the ones before it below
            chart = re.findall(r"(\d\d:00) ([0-9.]+) C", q)
            thr = float(re.findall(r"fever is a temperature of ([0-9.]+) C or higher", q)[0])
            assert [h for h, _ in chart] == list(opts.values())  # the options are the chart's times, in order
            assert r["answer"] == next(h for h, t in chart if float(t) >= thr), q
        elif kind == "bmi":
            b = float(re.findall(r"index is ([0-9.]+)", q)[0])
            assert r["answer"] == next(n for lo, hi, n in [(0, 18.5, "Underweight"), (18.5, 25, "Normal weight"),
                                        (25, 30, "Overweight"), (30, 35, "Obesity class I"),
                                        (35, 99, "Obesity class II or higher")] if lo <= b < hi)
        else:
            out = [n for n, v, lo, hi in re.findall(r"^- ([A-Za-z ]+?) ([0-9.]+)\S* ?\S* \(reference ([0-9.]+)-([0-9.]+)\)",
                                                   q, re.M) if not float(lo) <= float(v) <= float(hi)]
            assert out == [r["answer"]], (q, out)
    again = tmp_path / "again"
    dp.reasoning(out=str(again), n_train=60, n_eval=120, n_images=10)  # seeded: the same bytes again
    assert manifest(again / "eval")["sha256"] == manifest(tmp_path / "r" / "eval")["sha256"]
    dp.reasoning(out=str(tmp_path / "f"), n_train=240, n_eval=120, n_images=5, kinds="fever")  # run/demo.sh's set
    fever = load_rows(str(tmp_path / "f" / "eval"))
    assert manifest(tmp_path / "f" / "eval")["per_dataset"] == {"clinical_fever": 120}
    assert Counter((len(json.loads(r["options"])), r["answer_label"]) for r in fever) == by_k  # still balanced
    # unseen values: no held-out temperature or threshold appears in any train item
    def temps(rows):
        return {t for r in rows for t in re.findall(r"([0-9]{2}\.[0-9]) C", r["question"])}
    assert temps(fever) and not temps(fever) & temps(list(load_rows(str(tmp_path / "f" / "train"))))
    # pairs on one chart with two thresholds and two answers: a rule that ignores the stated threshold answers both
    # alike, so it is right on at most half the items; e.g. one fever band of 38.0 C for all
    charts = {}
    for r in fever:
        charts.setdefault(r["question"].split(". On this ward")[0], []).append(r["answer"])
    assert len(charts) == 60 and all(len(set(a)) == 2 for a in charts.values()), charts
    # rules that use the threshold only in part stay near that bound too (run/demo.sh's test asserts the trained
    # model's CI lies above 60 %): the reading equal to it, else a 38.0 C band; the reading closest to it; the first
    # reading whose degrees reach its degrees; and, threshold-blind, the 38.0 C band and the highest reading
    def first(chart, ok):
        return next((h for h, t in chart if ok(t)), None)
    rules = {"equal, else band": lambda c, x: first(c, lambda t: t == x) or first(c, lambda t: t >= 38.0),
             "closest": lambda c, x: min(c, key=lambda ht: abs(ht[1] - x))[0],
             "degrees": lambda c, x: first(c, lambda t: int(t) >= int(x)),
             "band 38.0": lambda c, x: first(c, lambda t: t >= 38.0),
             "highest": lambda c, x: max(c, key=lambda ht: ht[1])[0]}
    items = [([(h, float(t)) for h, t in re.findall(r"(\d\d:00) ([0-9.]+) C", r["question"])],
              float(re.findall(r"of ([0-9.]+) C or higher", r["question"])[0]), r["answer"]) for r in fever]
    score = {name: sum(rule(c, x) == a for c, x, a in items) / len(items) for name, rule in rules.items()}
    assert max(score.values()) <= 0.6 and score["band 38.0"] <= 0.5 and score["highest"] <= 0.5, score
    for n, kinds in [(1, "fever"), (3, "fever"), (7, "fever,gcs"), (61, "gcs,fever"), (6, dp.CLINICAL_KINDS)]:
        rows = dp.clinical_items(random.Random(1), n, "held_out", kinds=kinds)  # pairs cut by n: one left unpaired
        letters = Counter((len(r["options"]), r["answer_label"]) for r in rows)
        assert len(rows) == n and all(max(letters[(k, chr(65 + j))] for j in range(k)) -
                                      min(letters[(k, chr(65 + j))] for j in range(k)) <= 1 for k in (4, 5)), letters
    with pytest.raises(ValueError, match="unknown clinical kind.*fevr.*the kinds are abnormal, fever"):
        dp.reasoning(out=str(tmp_path / "x"), kinds="fever,fevr")
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_real_text_sources_convert(real, tmp_path):
    out = tmp_path / "text"
    m = dp.text(out=str(out), medqa=f"{real}/medqa_usmle_4opt/test.jsonl", medmcqa=f"{real}/medmcqa_medagents/test.jsonl",
                headqa=f"{real}/headqa_en/test_HEAD_EN.json", pubmedqa=f"{real}/pubmedqa/ori_pqal.json",
                medxpertqa_text=f"{real}/medxpertqa_text_medagents/test.jsonl")
    assert m is None
    m = manifest(out)
    assert m["per_dataset"] == {"medqa": 500, "medmcqa": 200, "headqa": 200, "pubmedqa": 400, "medxpertqa_text": 100}
    assert m["rows_rejected"] == 32 and all("image" in r["reason"] for r in rejects(out))  # HEAD-QA image questions
    ds = load_rows(str(out))
    assert ds["dataset_index"] == list(range(1400))  # unique across the merged sources
    first = json.loads(open(f"{real}/medqa_usmle_4opt/test.jsonl").readline())
    r0 = ds[0]
    assert r0["question"] == first["question"] and r0["answer_label"] == first["answer_idx"] == "B"
    assert json.loads(r0["options"]) == first["options"] and r0["answer"] == first["answer"]
    x = next(r for r in ds if r["dataset_name"] == "medxpertqa_text")
    assert "Answer Choices" not in x["question"] and len(json.loads(x["options"])) == 10
    p = next(r for r in ds if r["dataset_name"] == "pubmedqa")
    assert json.loads(p["options"]) == {"A": "yes", "B": "no", "C": "maybe"} and "\n\n" in p["question"]


def test_real_vqa_rad_closed(vqa_rad_eval):
    m = manifest(vqa_rad_eval)
    assert (m["rows_in"], m["rows_out"]) == (221, 220)  # 221 CLOSED rows; 'one' vs '1 focus' cannot be mapped
    ds = load_rows(vqa_rad_eval)
    assert sum(json.loads(o) == {"A": "Yes", "B": "No"} for o in ds["options"]) == 204
    r = ds[0]
    assert r["question"] == "Is there airspace consolidation on the left side?" and r["answer"] == "Yes"
    assert r["images"][0].size == (480, 503)  # eval images are not resized (recipe)


def _bad_rows_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (50, 40), "red").save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "zero.png").write_bytes(b"")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = {"question": "q?", "options": {"A": "x", "B": "y"}, "answer_label": "A", "answer": "x", "dataset_name": "t",
            "dataset_index": 0, "images": ["img/ok.png"]}
    rows = [good, {**good, "question": None}, {**good, "options": "{oops"}, {**good, "answer_label": "C"},
            {**good, "answer": "y"}, {**good, "images": ["img/missing.png"]}, {**good, "images": ["img/zero.png"]},
            {**good, "images": ["img/bad.png"]}, {**good, "question": ""}, good]
    for i, r in enumerate(rows):
        r["dataset_index"] = i
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_bad_row_kind_is_rejected_with_reason(tmp_path):
    out = tmp_path / "out"
    dp.eval_set(out=str(out), source=str(_bad_rows_file(tmp_path)))
    m = manifest(out)
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (10, 2, 8)
    reasons = [r["reason"] for r in rejects(out)]
    for want in ["missing field", "not valid JSON", "not among the options", "differs from option", "not found",
                 "zero bytes", "cannot be decoded", "empty question"]:
        assert sum(want in r for r in reasons) == 1, (want, reasons)
    assert [r["dataset_index"] for r in rejects(out)] == list(range(1, 9))


def test_overlong_prompts_are_dropped_with_report(tmp_path, tiny_vl, sample_data):
    out = tmp_path / "short"
    dp.text(out=str(out), source=os.path.join(sample_data, "image"), tokenizer=tiny_vl, max_prompt_length=120)
    m = manifest(out)
    lengths = load_rows(os.path.join(sample_data, "image"))
    assert m["rows_out"] + m["reject_reasons"].get("prompt too long (_ tokens > _)", 0) == len(lengths)
    assert 0 < m["rows_out"] < len(lengths) and m["prompt_tokens"]["max"] <= 120


def test_prompt_tokens_count_image_tokens_exactly(tiny_vl, sample_data):
    from common import generate as G, prompts
    from common.data import parse_row
    from common.model import load_processor

    proc, tok = load_processor(tiny_vl)
    for row in list(load_rows(os.path.join(sample_data, "eval")))[10:14]:
        item = parse_row(row)
        p = G.Prompt(prompts.render(proc, prompts.messages(item.question, item.options, len(item.images), True)),
                     item.images)
        assert prompts.prompt_tokens(proc, tok, item) == len(G.encode(proc, tok, p).ids)


def test_pmc_vqa_cleaning_rules(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (2000, 20), "white").save(tmp_path / "images" / "f1.jpg")
    cols = ["Figure_path", "Question", "Answer", "Answer_label", "Choice A", "Choice B", "Choice C", "Choice D"]
    rows = [["f1.jpg", "What is shown? ", "CT ", "B", " A:MRI ", " B:CT", " C:PET", " D:US\xa0"],
            ["f1.jpg", "q", "CT", "B", " A:MRI", " X:CT", " C:PET", " D:US"],   # mislabelled choice
            ["f1.jpg", "q", "CT", "E", " A:MRI", " B:CT", " C:PET", " D:US"],    # label outside A-D
            ["f1.jpg", "q", "PET", "B", " A:MRI", " B:CT", " C:PET", " D:US"]]   # answer differs from its choice
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([cols] + rows)
    dp.pmc_vqa(out=str(tmp_path / "out"), csv_path=str(tmp_path / "train.csv"), images=str(tmp_path / "images"))
    ds = load_rows(str(tmp_path / "out"))
    assert len(ds) == 1 and json.loads(ds[0]["options"]) == {"A": "MRI", "B": "CT", "C": "PET", "D": "US"}
    assert ds[0]["images"][0].size == (2800, 28)  # short side raised to 28 first (recipe order)
    assert len(rejects(tmp_path / "out")) == 3


def _pass_records(pr, planted: dict, n: int = 16, grader_field: str = "correct_inference"):
    """An evaluate.py items.jsonl in which item i has planted[i] of n samples correct."""
    pr.mkdir(exist_ok=True)
    with open(pr / "items.jsonl", "w") as f:
        for i, c in planted.items():
            for j in range(n):
                f.write(json.dumps({"dataset_name": "medqa", "dataset_index": i, "run": 0, "sample": j,
                                    grader_field: j < c, "correct": False, "correct_strict": False}) + "\n")


def test_passrate_filter_order(tmp_path, tiny_text, sample_data):
    pr, data = tmp_path / "pr", os.path.join(sample_data, "text")
    idx = load_rows(data)["dataset_index"]
    # pass counts are an evaluation: evaluate.py with the recipe's sampling shape, then data_prep filter reads them
    args = ["evaluate.py", "--data", data, "--model", tiny_text, "--runs", "1", "--samples", "4", "--temperature", "1.0",
            "--max_new_tokens", "8", "--limit", "6", "--dtype", "fp32", "--out", str(pr)]
    run_py(*args)
    counts, n = dp.pass_counts(str(pr))
    assert n == 4 and all(0 <= c <= 4 for c in counts.values())
    rows, first6 = load_rows(data), {}
    for name, i in zip(rows["dataset_name"], idx):  # --limit is per benchmark: the first 6 rows of each
        first6.setdefault(name, [])
        if len(first6[name]) < 6:
            first6[name].append(i)
    assert sorted(counts) == sorted(i for v in first6.values() for i in v)
    before = (pr / "items.jsonl").read_text()
    run_py(*args)  # resumable: a second run finds everything done and changes nothing
    assert (pr / "items.jsonl").read_text() == before
    # plant known counts to test the filter boundaries and the easy-to-hard order
    planted = dict(zip(idx, [0, 1, 7, 8, 16, 3, 3, 1, 7, 5]))
    _pass_records(pr, planted)
    dp.filter_set(data=data, passrate=str(pr), out=str(tmp_path / "f"))
    ds = load_rows(str(tmp_path / "f"))
    assert sorted(ds["dataset_index"]) == sorted(i for i, c in planted.items() if 1 <= c <= 7)
    assert ds["pass_count"] == sorted(ds["pass_count"], reverse=True)
    m = manifest(tmp_path / "f")
    assert m["dropped"] == {"not evaluated (-1)": 38, "pass_count < 1": 1, "pass_count > 7": 2}
    assert m["grader"] == "inference" and m["samples_per_item"] == 16
    dp.filter_set(data=data, passrate=str(pr), out=str(tmp_path / "f2"))
    assert load_rows(str(tmp_path / "f2"))["dataset_index"] == ds["dataset_index"]  # stable ties, seeded shuffle


def test_pass_counts_refuse_bad_input(tmp_path):
    pr = tmp_path / "pr"
    _pass_records(pr, {1: 3, 2: 5})
    assert dp.pass_counts(str(pr)) == ({1: 3, 2: 5}, 16)
    assert dp.pass_counts(str(pr), "strict") == ({1: 0, 2: 0}, 16)  # each grader's own verdict field
    with open(pr / "items.jsonl", "a") as f:  # item 3 with 2 samples only: a run still going
        f.write(json.dumps({"dataset_name": "medqa", "dataset_index": 3, "run": 0, "sample": 0,
                            "correct_inference": True}) + "\n")
    with pytest.raises(SystemExit, match="different numbers of samples"):
        dp.pass_counts(str(pr))
    _pass_records(pr, {1: 3})
    with open(pr / "items.jsonl", "a") as f:
        f.write("{torn\n")
    with pytest.raises(SystemExit, match="1 unreadable line"):
        dp.pass_counts(str(pr))
    _pass_records(pr, {1: 3}, grader_field="correct_other")
    with pytest.raises(SystemExit, match="no 'correct_inference' field"):
        dp.pass_counts(str(pr))
    with pytest.raises(SystemExit, match="not found"):
        dp.pass_counts(str(tmp_path / "nowhere"))
    (pr / "config.json").write_text(json.dumps({"temperature": 0.0, "runs": 3}))  # a greedy eval is no pass count
    with pytest.raises(SystemExit, match="greedy evaluation"):
        dp.pass_counts(str(pr))


def test_filter_reads_every_grader_of_an_evaluate_output(tmp_path, sample_data):
    """filter --grader lenient once looked for `correct_lenient`, a field evaluate.py never writes (it writes `correct`):
    every grader must read the field evaluate.py's grade_record wrote."""
    import evaluate as ev
    data, pr = os.path.join(sample_data, "text"), tmp_path / "pr"
    idx = load_rows(data)["dataset_index"][:2]
    right, wrong = "<think>x</think><answer>{}</answer>", "<think>x</think><answer>Z</answer>"
    pr.mkdir()
    with open(pr / "items.jsonl", "w") as f:  # item idx[0]: 3 of 4 right, idx[1]: 1 of 4, under every grader
        for i, c in zip(idx, (3, 1)):
            for j in range(4):
                rec = {"dataset_name": "medqa", "dataset_index": i, "run": 0, "sample": j, "answer": "Yes",
                       "answer_label": "A", "response": (right.format("A") if j < c else wrong)}
                f.write(json.dumps(ev.grade_record(rec, {"A": "Yes", "B": "No"})) + "\n")
    for grader in ("lenient", "inference", "strict"):
        assert dp.pass_counts(str(pr), grader) == ({idx[0]: 3, idx[1]: 1}, 4)
    dp.filter_set(data=data, passrate=str(pr), grader="lenient", out=str(tmp_path / "f"), min_pass=2, max_pass=3)
    assert load_rows(str(tmp_path / "f"))["dataset_index"] == [idx[0]]
    assert manifest(tmp_path / "f")["grader"] == "lenient"


@pytest.mark.slow
def test_passrate_with_smollm2(tmp_path, smollm2, sample_data):
    pr = tmp_path / "pr"
    run_py("evaluate.py", "--data", os.path.join(sample_data, "text"), "--model", smollm2, "--runs", "1", "--samples", "4",
           "--temperature", "1.0", "--max_new_tokens", "48", "--limit", "4", "--dtype", "fp32", "--out", str(pr),
           "--batch_size", "4")
    counts, n = dp.pass_counts(str(pr))
    assert n == 4 and len(counts) >= 4 and all(0 <= c <= 4 for c in counts.values())


def test_decontaminate_finds_planted_duplicates(tmp_path, sample_data):
    ev = os.path.join(sample_data, "eval")
    rows = [dict(r) for r in load_rows(ev)]
    planted = [rows[0], rows[15]]  # one text, one image item copied into "training"
    planted[1] = {**planted[1], "question": planted[1]["question"].upper() + "  "}  # normalisation catches it
    (tmp_path / "train.jsonl").write_text("")
    import datasets

    train = datasets.concatenate_datasets([load_rows(os.path.join(sample_data, "text")).remove_columns("prompt_tokens"),
                                           datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "prompt_tokens"}
                                                                       for r in planted],
                                                                      features=load_rows(ev).remove_columns(
                                                                          "prompt_tokens").features)])
    train.to_parquet(str(tmp_path / "train.parquet"))
    dp.decontaminate(train=str(tmp_path / "train.parquet"), eval_data=ev, drop=True, out=str(tmp_path / "clean"))
    m = manifest(tmp_path / "clean")
    assert m["flagged"] == 2 and m["per_benchmark"] == {"sample_text": 1, "sample_image": 1}
    assert m["rows_out"] == len(train) - 2


def test_sft_attaches_first_correct_trace(tmp_path, sample_data):
    src = os.path.join(sample_data, "image")
    traces = tmp_path / "items.jsonl"
    traces.write_text(json.dumps({"dataset_index": 8, "correct": False, "response": "<think>wrong</think>"}) + "\n" +
                      json.dumps({"dataset_index": 8, "correct": True, "response": "<think> new why </think><answer>A"})
                      + "\n")
    dp.sft(data=src, out=str(tmp_path / "sft"), traces=str(traces))
    ds = load_rows(str(tmp_path / "sft"))
    row = next(r for r in ds if r["dataset_index"] == 8)
    assert row["reasoning"] == "new why"
    assert row["target"] == f"<think> new why </think>\n<answer> {row['answer_label']} </answer>"


def test_decontaminate_refuses_to_replace_an_input_folder(tmp_path, sample_data):
    text, ev = os.path.join(sample_data, "text"), os.path.join(sample_data, "eval")
    before = sorted(os.listdir(text))
    with pytest.raises(SystemExit, match="is an input folder"):
        dp.decontaminate(train=text, eval_data=ev, out=text)
    assert sorted(os.listdir(text)) == before


def test_decontaminate_reports_image_overlap_separately(tmp_path, sample_data):
    """Issue 11 §5: an eval image under another question (a different question, or a paraphrase on identical pixels,
    or a resized copy) is counted as image overlap, apart from question overlap, and kept unless asked."""
    import datasets

    ev = os.path.join(sample_data, "eval")
    feats = load_rows(ev).remove_columns("prompt_tokens").features
    rows = [{k: v for k, v in r.items() if k != "prompt_tokens"} for r in load_rows(ev)]
    img_rows = [r for r in rows if r["images"]]
    a, b, c = img_rows[0], img_rows[1], img_rows[2]
    planted = [
        {**a, "question": "Which region of this scan is brightest?"},  # same image, another question
        {**b, "question": "In this image, can a lesion be seen?"},  # a paraphrase on identical pixels
        {**c, "question": "Describe the scan.", "images": [c["images"][0].resize((224, 224))]},  # resized copy
        {**a, "question": "Unrelated picture?", "images": [Image.effect_noise((112, 112), 80).convert("RGB")]},
        dict(a),  # the same question and image: a question overlap, not counted twice
    ]
    train = datasets.concatenate_datasets([load_rows(os.path.join(sample_data, "text")).remove_columns("prompt_tokens"),
                                           datasets.Dataset.from_list(planted, features=feats)])
    train.to_parquet(str(tmp_path / "train.parquet"))
    n = len(train)
    dp.decontaminate(train=str(tmp_path / "train.parquet"), eval_data=ev, out=str(tmp_path / "report"))
    m = manifest(tmp_path / "report")
    assert m["flagged"] == 1 and m["per_benchmark"] == {"sample_image": 1}
    ov = m["image_overlap"]
    assert (ov["rows"], ov["exact"], ov["near"]) == (3, 2, 1) and ov["per_benchmark"] == {"sample_image": 3}
    assert sorted(r["train_row"] for r in ov["listed"]) == [n - 5, n - 4, n - 3]
    assert m["rows_out"] == n and not (tmp_path / "report" / "data.parquet").exists()  # report only
    # --drop removes the question overlap and keeps the image-only rows (benchmarks' own splits share images)
    dp.decontaminate(train=str(tmp_path / "train.parquet"), eval_data=ev, drop=True, out=str(tmp_path / "clean"))
    kept = load_rows(str(tmp_path / "clean"))
    assert len(kept) == n - 1 and "Which region of this scan is brightest?" in kept["question"]
    # ... and --drop_image_overlap opts in to dropping them too
    dp.decontaminate(train=str(tmp_path / "train.parquet"), eval_data=ev, drop=True, drop_image_overlap=True,
                     out=str(tmp_path / "strict"))
    assert len(load_rows(str(tmp_path / "strict"))) == n - 4 and manifest(tmp_path / "strict")["rows_out"] == n - 4


@pytest.mark.parametrize("bits", [0, 2, 4, 7])
def test_near_index_finds_exactly_the_hashes_within_the_distance(bits):
    import random

    rng = random.Random(bits)
    stored = [rng.getrandbits(64) for _ in range(300)]
    add, find = dp.near_index(bits)
    for k, h in enumerate(stored):
        add(h, k)
    for _ in range(300):
        h = rng.choice(stored) ^ sum(1 << i for i in rng.sample(range(64), rng.randint(0, bits + 2)))
        want = [k for k, s in enumerate(stored) if bin(h ^ s).count("1") <= bits]
        got = find(h)
        assert (got is None) == (not want) and (got is None or got in want)


def test_near_duplicate_hash_separates_real_scans_and_catches_copies(real):
    """Issue 20 §13 (bench/decontam_hash.py measures it): on the 177 distinct VQA-RAD scans the near-duplicate hash at
    decontaminate's default distance matches no pair of different scans, and still matches each scan's copies
    re-encoded as JPEG q=75, resized to half, and 10 % brighter."""
    import inspect
    import io

    from PIL import ImageEnhance

    folder = os.path.join(real, "vqa_rad", "VQA_RAD Image Folder")
    bits = inspect.signature(dp.decontaminate).parameters["phash_bits"].default
    images = [load_image(open(os.path.join(folder, f), "rb").read()) for f in sorted(os.listdir(folder))]
    assert len(images) == 177
    near = [dp.image_hashes(im)[1] for im in images]
    close = [(i, j) for i in range(len(near)) for j in range(i) if bin(near[i] ^ near[j]).count("1") <= bits]
    assert close == [], f"{len(close)} pairs of different scans called duplicates, e.g. {close[:3]}"
    missed = 0
    for im, h in zip(images, near):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=75)
        copies = [load_image(buf.getvalue()), im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
                  ImageEnhance.Brightness(im).enhance(1.1)]
        missed += sum(bin(dp.image_hashes(c)[1] ^ h).count("1") > bits for c in copies)
    assert missed == 0, f"{missed} of {3 * len(images)} copies not matched"


def test_gold_letters_reported_and_shuffle_options_rebalances_them(tmp_path, sample_data):
    """Issue 19 §4: every written set reports its gold-letter distribution (manifest + console); --shuffle_options
    permutes each row's options with a per-row seed, moving the answer letter with its text (the answer text is
    still the labelled option's), the same way on a rerun, and off by default (the recipe's order)."""
    import datasets

    src = os.path.join(sample_data, "text")
    outs = {}
    for name, extra in [("plain", []), ("shuf", ["--shuffle_options", "true"]), ("shuf2", ["--shuffle_options", "true"]),
                        ("seed1", ["--shuffle_options", "true", "--option_seed", "1"])]:
        p = run_py("data_prep.py", "text", "--source", src, "--out", str(tmp_path / name), *extra)
        assert "gold letters" in p.stdout
        outs[name] = datasets.load_dataset("parquet", data_files=str(tmp_path / name / "data.parquet"))["train"]
    m = json.load(open(tmp_path / "plain" / "manifest.json"))
    plain, shuf = outs["plain"], outs["shuf"]
    assert m["gold_letters"] == {n: dict(sorted(Counter(r["answer_label"] for r in plain
                                                        if r["dataset_name"] == n).items()))
                                 for n in sorted(set(plain["dataset_name"]))} and not m["options_shuffled"]
    assert json.load(open(tmp_path / "shuf" / "manifest.json"))["options_shuffled"]
    moved = 0
    for a, b in zip(plain, shuf):
        oa, ob = json.loads(a["options"]), json.loads(b["options"])
        assert sorted(oa.values()) == sorted(ob.values()) and sorted(oa) == sorted(ob)  # same texts, same letters
        assert ob[b["answer_label"]] == oa[a["answer_label"]] == b["answer"]  # the answer moved with its text
        moved += a["answer_label"] != b["answer_label"]
    assert moved > len(plain) // 3, moved
    assert outs["shuf2"]["options"] == shuf["options"] and outs["seed1"]["options"] != shuf["options"]
