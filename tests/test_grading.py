"""The one grader: strict reward (RECIPE §4) and lenient eval extractor (§7.2).   pytest -q tests/test_grading.py"""

import random
import re
import time

import pytest

from common import grading as g

OPTS = {"A": "Cap Stage.", "B": "Liver", "C": "Liver cirrhosis", "D": "Kidney"}


def R(body, label="A", answer=None):
    return g.strict_reward(body, answer if answer is not None else OPTS[label], label)


@pytest.mark.parametrize("resp,label,want", [
    ("<think>r</think><answer>A</answer>", "A", 1.0),
    ("<think>r</think>\n<answer> A </answer>", "A", 1.0),
    ("<think>r</think><answer>a</answer>", "A", 1.0),
    ("<think>r</think><answer>A. Cap Stage.</answer>", "A", 1.0),
    ("<think>r</think><answer>cap stage.</answer>", "A", 1.0),
    ("<think>\nmulti\nline\n</think>\n\n<answer>B</answer>", "B", 1.0),
    ("<think>r</think><answer>(A)</answer>", "A", 0.0),
    ("<think>r</think><answer>A.</answer>", "A", 0.0),
    ("<think>r</think><answer>Option A</answer>", "A", 0.0),
    ("<think>r</think><answer>A</answer>\n", "A", 0.0),       # trailing newline fails the fullmatch
    (" <think>r</think><answer>A</answer>", "A", 0.0),        # leading space too
    ("<think>r</think>x<answer>A</answer>", "A", 0.0),        # text between the blocks
    ("<think>r</think><answer>\nA\n</answer>", "A", 0.0),     # multi-line answer: no single-line match -> whole text
    ("<answer>A</answer>", "A", 0.0),                         # no think block
])
def test_strict_table(resp, label, want):
    assert R(resp, label) == want


def test_first_block_is_graded_by_reward_last_by_eval():
    resp = "<think>r</think><answer>B</answer> then <answer>D</answer>"
    assert g.format_ok(resp)  # the lazy .*? spans both blocks
    assert R(resp, "B") == 1.0 and R(resp, "D") == 0.0
    assert g.lenient_correct(resp, OPTS["D"], "D") and not g.lenient_correct(resp, OPTS["B"], "B")


ADVERSARIAL = [  # (completion, label): all must score 0 under the strict reward
    ("<think>x</think><answer></answer> A", "A"),                            # answer outside the tags
    ("A <think>x</think><answer>B</answer>", "A"),
    ("<think>x</think><answer>A or B</answer>", "A"),
    ("<think>x</think><answer>A B C D</answer>", "A"),
    ("<think>x</think><answer>A, B, C, D</answer>", "B"),
    ("<think>x</think><answer>A</answer><answer>B</answer><answer>C</answer><answer>D</answer>", "C"),  # every letter
    ("<think>x</think><answer>Liver cirrhosis</answer>", "B"),              # wrong option containing the right one
    ("<think>x</think><answer>C. Liver cirrhosis</answer>", "B"),
    ("<think>x</think><answer>\u0410</answer>", "A"),                       # Cyrillic A
    ("<think>x</think><answer>\uff21</answer>", "A"),                       # full-width A
    ("<think>x</think><answer>\u212a</answer>", "K"),                       # KELVIN SIGN (Python lowercases it to k)
    ("<think>x</think><answer></answer>", "A"),
    ("<think>x</think><answer>   </answer>", "A"),
    ("<THINK>x</THINK><ANSWER>A</ANSWER>", "A"),                            # other letter cases
    ("<Think>x</Think><Answer>A</Answer>", "A"),
    ("Question: q\n\nOptions:\n\nA. Cap Stage.\n\nB. Liver", "A"),           # echo of the prompt
    ("<think>" + "A" * 100 + "</think>", "A"),
]


@pytest.mark.parametrize("resp,label", ADVERSARIAL)
def test_adversarial_scores_zero(resp, label):
    answer = OPTS.get(label, "Kelvin")
    assert g.strict_reward(resp, answer, label) == 0.0


def test_empty_target_never_matches():
    assert not g.grade_answer("", "", "")
    assert not g.grade_answer("  ", "x", "A")


@pytest.mark.parametrize("resp,label,want", [
    ("blah <answer> B\nextra </answer>", "B", True),           # last block, first non-empty line
    ("<answer>\n\n  B  \n</answer>", "B", True),
    ("The answer: B", "B", True),
    ("the ANSWER IS: b", "B", True),
    ("so the answer is B", "B", True),
    ("x is: B", "B", True),
    ("answer: A\nlater answer: B", "B", True),                 # last match of the first phrase that hits
    ("Liver", "B", True),                                        # whole text
    ("<think>B</think>", "B", True),                             # tags removed, whole text
    ("answer: B because", "B", False),
    ("<answer></answer>", "B", False),
])
def test_lenient_table(resp, label, want):
    assert g.lenient_correct(resp, OPTS[label], label) == want


def test_option_letter():
    assert g.option_letter("b. liver", OPTS) == "B"
    assert g.option_letter("Liver cirrhosis", OPTS) == "C"
    assert g.option_letter("nothing", OPTS) is None


# --- the linear-time scans agree with the upstream regexes -------------------------------------------------------

UP_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
UP_FIRST = re.compile(r"<answer>(.*?)</answer>")
UP_ALL = re.compile(r"<answer>(.*?)</answer>", re.S)
PHRASES = [r"answer:\s*(.*)\s*", r"answer is:\s*(.*)\s*", r"answer is\s*(.*)\s*", r"is:\s*(.*)\s*"]


def upstream_lenient(text):
    m = UP_ALL.findall(text)
    if m:
        line = re.search(r"\s*([^\n\r]+)", m[-1])
        pred = line.group(1) if line else ""
    else:
        pred = text
        for p in PHRASES:
            hits = re.findall(p, text, re.IGNORECASE)
            if hits:
                pred = hits[-1]
                break
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        pred = pred.replace(t, "")
    return pred.strip()


def test_scans_equal_regexes_on_random_strings():
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<answer>", "</answer>", "A", "b", " ", "\n", "x", "answer:", "is ", "\t"]
    for _ in range(20000):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        assert g.format_ok(s) == bool(UP_FORMAT.fullmatch(s)), s
        m = UP_FIRST.search(s)
        assert g.first_answer_block(s) == (m.group(1) if m else None), s
        assert g.extract_lenient(s) == upstream_lenient(s), s


def test_megabyte_completions_are_graded_fast():
    # patterns that make the upstream regexes backtrack quadratically; budget is generous (measured in bench/faults.py)
    for s in ["<think>" + "</think><answer></answer>x" * 40000, "<answer>" * 130000, "<think>" + "<answer>" * 120000 + "\n",
              "<answer>" * 60000 + "\n" + "</answer>" * 60000]:
        t = time.perf_counter()
        g.strict_reward(s, "x", "A")
        g.lenient_correct(s, "x", "A")
        assert time.perf_counter() - t < 2.0


def test_inference_grader_is_upstreams_first_block_dotall():
    """RECIPE §7.2 inference grader: first <answer>(.*?)</answer> with re.S, else the whole text; no format check."""
    ic = g.inference_correct
    assert ic("no tags, just A", "x", "A") is False and ic(" A \n", "x", "A")  # whole text, stripped
    assert ic("<answer>\nA\n</answer>", "x", "A")  # DOTALL: a block over lines counts (the reward's does not)
    assert not ic("<answer>B</answer><answer>A</answer>", "x", "A")  # the first block
    assert ic("junk before <answer>A</answer> junk after", "x", "A")  # format not required
    assert not ic("<answer>A", "x", "A")  # unclosed: whole text "<answer>A" is graded
    for r in ["<answer>A</answer>", "<think>\n</think>\n<answer> a </answer>", "<answer>A\nB</answer>"]:
        m = re.search(r"<answer>(.*?)</answer>", r, re.S)
        assert ic(r, "x", "A") == g.grade_answer((m.group(1) if m else r).strip(), "x", "A")


def test_verdict_field_is_the_one_evaluate_writes_and_refuses_unknown_graders():
    assert {name: g.verdict_field(name) for name in g.GRADERS} == {
        "lenient": "correct", "inference": "correct_inference", "strict": "correct_strict"}
    with pytest.raises(KeyError, match="unknown grader 'lenien'"):
        g.verdict_field("lenien")


def test_item_score_is_the_mean_over_runs_of_the_mean_over_samples():
    assert g.item_score({0: [True], 1: [True, False, False]}) == pytest.approx(2 / 3)
    assert g.item_score({0: [1.0, 0.0]}) == 0.5
    with pytest.raises(ZeroDivisionError):
        g.item_score({0: []})
