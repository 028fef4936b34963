"""Report pages (common/report.py): pure parts, then the pages in a real browser (Debian's chromium, driven by
Playwright; run/test.sh installs both).

    pytest -q tests/test_report.py                  # all; the browser tests skip when chromium/playwright are missing
    pytest -q -m browser tests/test_report.py -s    # only the browser tests, printing the 10,000-item timings
    MEDVL_SCREENSHOT=docs/report.png pytest -q tests/test_report.py -k from_evaluate   # refresh the README's picture
"""

import json
import os
import shutil
import time

import pytest
from PIL import Image, ImageDraw

import evaluate
from common import report
from conftest import run_py

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INJECT = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=1">', "</textarea>", "</script>"]

# -----------------------------------------------------------------------------------------------------------------
# Records as evaluate.py writes them: a response graded by evaluate.grade_record (both graders, format flag)


def picture(i: int) -> Image.Image:
    """A small grey 'scan' with a bright disc whose place depends on i."""
    img = Image.new("RGB", (256, 256), (20, 20, 24))
    d = ImageDraw.Draw(img)
    d.ellipse((30 + 7 * (i % 20), 40 + 5 * (i % 25), 130 + 7 * (i % 20), 140 + 5 * (i % 25)), fill=(200, 200, 190))
    return img


def record(bench: str, index: int, run: int, response: str, question: str = "", label: str = "A") -> dict:
    options = {"A": "yes", "B": "no"}
    rec = {"dataset_name": bench, "dataset_index": index, "run": run, "sample": 0,
           "question": question or f"Is there an effusion in image {index}?", "answer": options[label],
           "answer_label": label, "options": options, "response": response, "finish_reason": "stop",
           "tokens": len(response.split())}
    return evaluate.grade_record(rec, options)


def responses(i: int) -> str:
    """Right, wrong, and right without the format (lenient only), in turn: the expected filter counts are known."""
    think = f"<think>Looking at the image: the costophrenic angle of case {i} is " + "sharp and clear. " * 3
    think += "</think>"
    return [think + "<answer>A</answer>", think + "<answer>B</answer>", "Answer: A"][i % 3]


def eval_records(n_items: int, runs: int = 1) -> list:
    return [record("vqa_rad_closed" if i % 2 else "slake_closed", i, run, responses(i + run))
            for i in range(n_items) for run in range(runs)]


def write_eval(path, records, thumbs=None, title="synthetic") -> None:
    summary = evaluate.summarise(records, n_boot=50)
    report.write_eval(str(path), records, summary, title, thumbs)


# -----------------------------------------------------------------------------------------------------------------
# Pure parts


def test_pages_name_the_grader_their_numbers_come_from(tmp_path):
    recs = eval_records(6)
    summary = evaluate.summarise(recs, n_boot=20, grader="strict")
    report.write_eval(str(tmp_path / "r.html"), recs, summary, "t")
    page = (tmp_path / "r.html").read_text()
    assert "accuracy is the strict grader's" in page and "lenient grader's (the paper's)" not in page
    assert '"graders":["correct_strict",' in page  # the run's grader is the filter's first choice
    report.write_compare(str(tmp_path / "c.html"), "A", "B", [], recs, recs, key="correct_inference",
                         grader="inference")
    assert "(inference grader, percentage points)" in (tmp_path / "c.html").read_text()


@pytest.mark.parametrize("text,kinds", [
    ("<think>a</think><answer>B</answer>", ["think", "answer"]),
    ("<think>a</think>\n<answer>B</answer>\n", ["think", "text", "answer", "text"]),
    ("plain words", ["text"]),
    ("<answer>B", ["answer"]),  # unclosed: the rest of the response is the answer part
    ("x <THINK>y</THINK>", ["text", "think"]),
    ("", []),
])
def test_split_response_keeps_every_character(text, kinds):
    parts = report.split_response(text)
    assert "".join(p[1] for p in parts) == text and [p[0] for p in parts] == kinds


def test_flips_use_the_majority_verdict():
    a = [record("b", 0, r, responses(1)) for r in range(3)] + [record("b", 1, r, responses(0)) for r in range(3)]
    # item 0: wrong in A, right in 2 of 3 runs in B; item 1: right in A, right in 1 of 3 in B
    b = [record("b", 0, r, responses(0 if r else 1)) for r in range(3)] + \
        [record("b", 1, r, responses(0 if r == 0 else 1)) for r in range(3)]
    got = {f["k"]: (f["dir"], round(f["a"][0], 2), round(f["b"][0], 2)) for f in report.flips(a, b)}
    assert got == {("b", 0): ("wr", 0.0, 0.67), ("b", 1): ("rw", 1.0, 0.33)}


def test_flips_score_an_item_as_the_tables_do_with_unbalanced_runs():
    """report.item_scores once took the flat mean over runs x samples, evaluate.py the mean over runs of the mean over
    samples: with run 0 = [right], run 1 = [right, wrong, wrong] the table said 0.67 and the flips page 0.5."""
    from common import grading
    b = [record("b", 0, 0, responses(0))] + [{**record("b", 0, 1, responses(0 if s == 0 else 1)), "sample": s}
                                             for s in range(3)]
    a = [record("b", 0, r, responses(1)) for r in range(2)]
    table = grading.item_score(evaluate.item_scores(b)[("b", 0)])
    assert table == pytest.approx(2 / 3) and report.item_scores(b)[("b", 0)][0] == table
    assert [(f["k"], f["dir"]) for f in report.flips(a, b)] == [(("b", 0), "wr")]


def test_read_rollouts_keeps_the_last_line_of_a_step(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    lines = [{"step": 2, "group": 0, "v": "old"}, {"step": 1, "group": 0, "v": "a"},
             {"step": 2, "group": 0, "v": "new"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3, "gro')  # torn last line
    assert [(r["step"], r["v"]) for r in report.read_rollouts(str(path))] == [(1, "a"), (2, "new")]


def test_data_block_cannot_close_its_script_tag(tmp_path):
    recs = [record("b", 0, 0, "</script><script>window.__pwned=1</script>", question="</script>")]
    write_eval(tmp_path / "r.html", recs)
    html = (tmp_path / "r.html").read_text()
    block = html.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    assert json.loads(block)["items"][0]["q"] == "</script>"  # the whole data survived inside its block
    assert "<script>window.__pwned" not in html


# -----------------------------------------------------------------------------------------------------------------
# In the browser


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright. run/test.sh installs both and sets MEDVL_REQUIRE_BROWSER=1, so there a
    missing browser fails these tests; a bare pytest without them skips."""
    try:
        from playwright.sync_api import sync_playwright

        if not os.path.exists(CHROMIUM):
            raise FileNotFoundError(CHROMIUM)
    except (ImportError, FileNotFoundError) as e:
        if os.environ.get("MEDVL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no browser for the report tests ({e}); run bash run/test.sh")
        pytest.skip(f"no browser for the report tests: {e}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A report opened from disk, with every console error and uncaught page error collected."""

    def __init__(self, browser, path, width: int = 1280, height: int = 900):
        self.errors = []
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        t0 = time.perf_counter()
        self.page.goto(f"file://{os.path.abspath(path)}")
        self.page.wait_for_function("window.__ready !== undefined")
        self.load_ms = (time.perf_counter() - t0) * 1000

    def count(self) -> tuple[int, int]:
        """(rows matching the filters, all rows) as the page says it."""
        shown, _, total, _ = self.page.text_content("#count").split()
        return int(shown), int(total)

    def set(self, selector: str, value: str) -> float:
        """Pick a select's value or type into the search box; the page's filter time in ms."""
        if self.page.get_attribute(selector, "type") == "search":
            self.page.fill(selector, value)
        else:
            self.page.select_option(selector, value)
        return self.page.evaluate("window.__lastFilterMs")

    def cards(self) -> int:
        return self.page.locator(".card").count()


@pytest.mark.browser
def test_eval_report_filters(tmp_path, browser):
    recs = eval_records(90, runs=2)
    thumbs = {(r["dataset_name"], r["dataset_index"]): [report.thumbnail(picture(r["dataset_index"]))] for r in recs}
    write_eval(tmp_path / "report.html", recs, thumbs)
    p = Page(browser, tmp_path / "report.html")
    assert p.count() == (180, 180) and p.cards() == 50  # one page
    assert p.page.locator(".card img.thumb").count() == 50
    p.set("#f-bench", "slake_closed")
    assert p.count()[0] == sum(r["dataset_name"] == "slake_closed" for r in recs) == 90
    p.set("#f-bench", "")
    p.set("#f-verdict", "wrong")
    assert p.count()[0] == sum(not r["correct"] for r in recs)
    p.set("#f-grader", "correct_strict")
    assert p.count()[0] == sum(not r["correct_strict"] for r in recs) > sum(not r["correct"] for r in recs)
    p.set("#f-verdict", "")
    p.set("#f-format", "fail")
    assert p.count()[0] == sum(not r["format"] for r in recs) == 60
    p.set("#f-run", "1")
    assert p.count()[0] == sum(not r["format"] and r["run"] == 1 for r in recs) == 30
    p.set("#f-format", "")
    p.set("#f-run", "")
    p.set("#f-search", "effusion in image 17?")
    assert p.count()[0] == 2 and p.cards() == 2  # item 17, runs 0 and 1
    p.set("#f-search", "no such text anywhere")
    assert p.count()[0] == 0 and p.cards() == 0
    p.set("#f-search", "")
    p.page.click("#next")
    assert p.page.text_content("#page") == "page 2 of 4"
    # the think and answer parts are set apart, verdicts of both graders shown
    assert p.page.locator(".part.think").count() > 0 and p.page.locator(".part.answer").count() > 0
    assert "correct_strict" in p.page.text_content(".card .head")
    assert p.errors == []


@pytest.mark.browser
def test_untrusted_text_renders_as_text(tmp_path, browser):
    """Every injection string in the question, options, response, benchmark name and title shows up as text on all
    three pages, and no script of theirs runs."""
    bad = "\n".join(INJECT)
    recs = []
    for i, s in enumerate(INJECT):
        r = record("bench" + s, i, 0, f"<think>{bad}</think><answer>{s}</answer>", question=f"{s} question")
        r["options"] = {"A": s, "B": "no"}
        recs.append(r)
    write_eval(tmp_path / "report.html", recs, title="title " + bad)
    other = [record(r["dataset_name"], r["dataset_index"], 0, responses(0), question=r["question"]) for r in recs]
    table = [{"benchmark": "x" + INJECT[0], "name": None, "n": 4, "a": None, "b": None, "diff": 1.0, "lo": 0.0,
              "hi": 2.0, "p_le0": 0.5}]
    report.write_compare(str(tmp_path / "compare.html"), "A" + INJECT[1], "B", table, recs, other)
    groups = [{"step": 1, "group": 0, "dataset_name": INJECT[3], "dataset_index": 0, "prompt": bad, "thumbs": [],
               "answer": INJECT[0], "answer_label": INJECT[2],
               "responses": [{"text": bad, "reward": 1.0, "advantage": 0.5, "tokens": 3, "finish_reason": "stop"}]}]
    report.write_grpo(str(tmp_path / "grpo.html"), "grpo " + bad, [{"step": 1, "reward": 1.0}], groups)
    for name in ["report.html", "compare.html", "grpo.html"]:
        p = Page(browser, tmp_path / name)
        p.page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        text = p.page.inner_text("body")
        assert p.page.evaluate("window.__pwned") is None, name
        for s in INJECT:
            assert s in text, (name, s)
        assert p.cards() >= 1 and p.page.locator("img:not(.thumb):not(.chart)").count() == 0, name
        assert p.errors == [], (name, p.errors)


@pytest.mark.browser
def test_10k_items_load_and_filter_within_budget(tmp_path, browser):
    """10,000 items with thumbnails and ~300-character responses (a 21 MB page). Measured here (2 shared CPU cores):
    400-460 ms from navigation to the first page, 9-30 ms per filter change (the first search, which lower-cases
    every row's text, the slowest). The asserts allow 30x (load) and 60x (filter) that, so they cannot flake."""
    n = 10_000
    pics = [report.thumbnail(picture(i)) for i in range(50)]
    recs = eval_records(n)
    thumbs = {(r["dataset_name"], r["dataset_index"]): [pics[r["dataset_index"] % 50]] for r in recs}
    t0 = time.perf_counter()
    write_eval(tmp_path / "report.html", recs, thumbs)
    write_s = time.perf_counter() - t0
    size_mb = (tmp_path / "report.html").stat().st_size / 2**20
    p = Page(browser, tmp_path / "report.html")
    assert p.count() == (n, n) and p.errors == []
    # the first search lower-cases every row's text (built once, on demand): the slowest filter
    times = {"first search": p.set("#f-search", "case 17"), "search": p.set("#f-search", "case 1"),
             "benchmark": p.set("#f-bench", "vqa_rad_closed"), "verdict": p.set("#f-verdict", "wrong"),
             "format": p.set("#f-format", "ok")}
    assert p.count()[0] == sum(r["dataset_name"] == "vqa_rad_closed" and not r["correct"] and r["format"] and
                               "case 1" in r["response"] for r in recs)
    p.set("#f-search", "")
    times["all filters off"] = p.set("#f-bench", "")
    print(f"\n10,000-item report: {size_mb:.1f} MB written in {write_s:.1f} s; load to first page {p.load_ms:.0f} ms "
          f"(in-page {p.page.evaluate('window.__ready'):.0f} ms); filter " +
          ", ".join(f"{k} {v:.0f} ms" for k, v in times.items()))
    assert p.load_ms < 15_000 and max(times.values()) < 2_000, (p.load_ms, times)


@pytest.mark.browser
def test_reports_from_evaluate_compare_and_grpo(tmp_path, browser, tiny_vl, sample_data):
    """The three pages as the scripts write them (tiny VL model, bundled sample data with images), and a screenshot."""
    data = os.path.join(sample_data, "eval")
    base = tmp_path / "base"
    run_py("evaluate.py", "--model", tiny_vl, "--data", data, "--dtype", "fp32", "--limit", "4", "--max_new_tokens",
           "8", "--runs", "2", "--batch_size", "8", "--n_boot", "100", "--out", str(base))
    # a second "model": the same responses with the first two items answered right, regraded without a model
    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    recs = [json.loads(x) for x in open(edited / "items.jsonl")]
    assert all(r["question"] for r in recs) and len(report.read_thumbs(str(edited))) == 4  # the 4 image items
    for r in recs[:4]:  # items 0 and 1, runs 0 and 1
        r["response"] = f"<think>the tiny model, edited</think><answer>{r['answer_label']}</answer>"
    (edited / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (edited / "report.html").unlink()
    run_py("evaluate.py", "regrade", str(edited))
    out = run_py("evaluate.py", "compare", str(base), str(edited), "--n_boot", "100").stdout
    assert f"wrote {edited / 'compare.html'}" in out
    # GRPO: two steps on four dark/bright images, two groups logged per step
    toy = tmp_path / "toy"
    (toy / "img").mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (56, 56), (235,) * 3 if i % 2 else (15,) * 3).save(toy / "img" / f"{i}.png")
        rows.append({"question": "Is the image dark or bright?", "options": {"A": "Dark", "B": "Bright"},
                     "answer_label": "AB"[i % 2], "answer": ["Dark", "Bright"][i % 2], "dataset_name": "toy",
                     "dataset_index": i, "images": [f"img/{i}.png"]})
    (toy / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_py("grpo.py", "--model", tiny_vl, "--data", str(toy / "toy.jsonl"), "--engine", "hf", "--dtype", "fp32",
           "--group_size", "4", "--train_batch", "4", "--mini_batch", "4", "--max_new_tokens", "4", "--kl_coef", "0",
           "--max_steps", "2", "--epochs", "10", "--activation_checkpointing", "false", "--save_every", "0",
           "--out", str(tmp_path / "grpo"))
    logged = report.read_rollouts(str(tmp_path / "grpo" / "rollouts.jsonl"))
    assert [(g["step"], g["group"]) for g in logged] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(len(g["responses"]) == 4 and len(g["thumbs"]) == 1 for g in logged)

    p = Page(browser, edited / "report.html")
    assert p.count() == (16, 16) and p.errors == []  # 4 text + 4 image items, 2 runs
    assert p.page.locator("img.thumb").count() == 8 and p.page.locator("img.chart").count() == 1
    assert "the tiny model, edited" in p.page.inner_text("#list")
    p.page.screenshot(path=str(tmp_path / "report.png"))
    p.page.set_viewport_size({"width": 1280, "height": 1100})
    p.set("#f-bench", "sample_image")
    p.page.evaluate("window.scrollTo(0, document.querySelector('.controls').offsetTop - 60)")
    p.page.screenshot(path=str(tmp_path / "report_images.png"))
    if os.environ.get("MEDVL_SCREENSHOT"):
        shutil.copy(tmp_path / "report_images.png", os.environ["MEDVL_SCREENSHOT"])

    p = Page(browser, edited / "compare.html")
    before = report.item_scores(evaluate.read_records(str(base)))
    flipped = sum(before[report.item_key(r)][0] <= 0.5 for r in recs[:4] if r["run"] == 0)  # wrong before the edit
    assert flipped >= 1  # the tiny random model gets few right
    assert p.count()[0] == flipped and p.errors == []
    assert p.page.locator(".side").count() == flipped and "wrong \u2192 right" in p.page.inner_text("#list")
    p.page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

    p = Page(browser, tmp_path / "grpo" / "report.html")
    assert p.count() == (4, 4) and p.page.locator("img.chart").count() == 1 and p.errors == []
    p.page.click("#step-next")  # 'all' -> step 1
    assert p.count()[0] == 2 and p.page.input_value("#f-step") == "1"
    p.page.click("#step-next")
    assert p.count()[0] == 2 and p.page.input_value("#f-step") == "2"
    assert p.page.locator(".card img.thumb").count() == 2
    p.page.screenshot(path=str(tmp_path / "grpo.png"))
    print(f"\nscreenshots: {tmp_path}/report.png report_images.png compare.png grpo.png")


def test_metric_rows_of_one_step_are_merged(tmp_path):
    """A GRPO step that validates writes two lines (training metrics, then val/*): the curves and the page read one
    row per step with both (before, the validation line replaced the training one, so the last step's training
    point was never drawn); a resumed run's rewritten step wins."""
    from common.log import Logger

    lines = [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}, {"step": 2, "val/acc": 0.5},
             {"step": 2, "reward": 0.25}]  # the last: step 2 again, from a run resumed at step 1
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = Logger(str(tmp_path), {}, is_main=False).read()
    assert rows == [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.25, "val/acc": 0.5}]
