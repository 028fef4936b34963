"""One grader for training and evaluation: the strict RL reward (RECIPE §4) and the lenient eval extractor (§7.2).

strict_reward(response, answer, answer_label) -> 0.0 | 1.0, the recipe's `compute_score`:
  1. format: the whole response must fullmatch `<think>.*?</think>\\s*<answer>.*?</answer>` (DOTALL). No text and
     no whitespace may stand before `<think>` or after the last `</answer>`: a trailing newline scores 0.
  2. answer: the FIRST `<answer>(.*?)</answer>` *without* DOTALL, i.e. the first answer block that opens and
     closes on one line; if there is none the whole response is graded (and so scores 0).
  3. grade_answer: case-insensitive exact equality, after strip, with the letter, the option text or "L. text".
inference_correct(response, answer, answer_label) -> bool, upstream's grader at inference time (RECIPE §7.2), which
  also counted the pass rates (§2.1) and the pass@k curves (§7.3): the FIRST `<answer>(.*?)</answer>` block (DOTALL),
  else the whole text; no format check.
lenient_correct(response, answer, answer_label) -> bool, the regrader behind the paper's tables:
  the LAST `<answer>...</answer>` block (DOTALL), its first non-empty line; else the last "answer:", "answer is:",
  "answer is", "is:" phrase (case-insensitive, rest of its line); else the whole text. Tags are then removed.

Surprises that are the recipe's semantics and are pinned by tests: with several answer blocks the reward grades the
*first* and the evaluation the *last*; "a" passes for "A"; "(A)", "A." and "Option A" fail.

Two deliberate tightenings, neither of which changes a verdict on honest text:
  * an empty prediction never matches (upstream would accept it if a row had an empty answer or label);
  * case folding skips Unicode compatibility look-alikes (KELVIN SIGN 'K' lowercases to ASCII 'k' in Python, so
    upstream would accept it for option K; full-width letters never matched anyway).
Everything is linear-time: the regexes whose backtracking grows quadratically on adversarial 1 MB completions are
replaced by str.find scans with the same match semantics.
"""

import re
import unicodedata
from typing import Literal

import numpy as np

_ANSWER_PHRASES = [re.compile(p, re.IGNORECASE) for p in (r"answer:\s*(.*)", r"answer is:\s*(.*)",
                                                           r"answer is\s*(.*)", r"is:\s*(.*)")]
_FIRST_LINE = re.compile(r"\s*([^\n\r]+)")
_FORMAT_MIDDLE = re.compile(r"</think>\s*<answer>")
# What the reward and both graders read (RECIPE §4, §7.2); common.model keeps them through decoding.
FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _fold(s: str) -> str:
    """Lower-case, except characters that are compatibility variants (KELVIN SIGN, full-width letters...)."""
    return "".join(c.lower() if c.isascii() or unicodedata.normalize("NFKC", c) == c else c for c in s)


def grade_answer(pred: str, answer: str, answer_label: str) -> bool:
    """Exact match (case-insensitive, stripped) with the letter, the option text, or 'L. text'."""
    p = _fold(pred.strip())
    if not p:
        return False
    targets = {answer_label.strip(), answer.strip(), f"{answer_label.strip()}. {answer.strip()}"}
    return p in {_fold(t) for t in targets if t}


def format_ok(response: str) -> bool:
    """`re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", response, re.DOTALL)`, in linear time.

    The fullmatch holds iff the text starts with <think>, ends with </answer>, and some `</think>\\s*<answer>`
    lies wholly between those two (the lazy groups may be empty)."""
    if not (response.startswith("<think>") and response.endswith("</answer>")):
        return False
    return _FORMAT_MIDDLE.search(response, 7, len(response) - 9) is not None


def first_answer_block(response: str) -> str | None:
    """`re.search(r"<answer>(.*?)</answer>", response).group(1)` (no DOTALL), in linear time."""
    i = response.find("<answer>")
    close = newline = -2  # cached next '</answer>' / next '\n' at or after the current start
    while i != -1:
        start = i + 8
        if close < start:
            close = response.find("</answer>", start)
            if close == -1:
                return None  # no closing tag anywhere further on: no later opening can match either
        if newline < start and newline != -1:
            newline = response.find("\n", start)
        if newline == -1 or close < newline:
            return response[start:close]
        i = response.find("<answer>", i + 1)
    return None


def strict_reward(response: str, answer: str, answer_label: str) -> float:
    """The training reward: format fullmatch x exact answer, in {0.0, 1.0}."""
    if not format_ok(response):
        return 0.0
    block = first_answer_block(response)
    pred = block.strip() if block is not None else response.strip()
    return 1.0 if grade_answer(pred, answer, answer_label) else 0.0


def inference_correct(response: str, answer: str, answer_label: str) -> bool:
    """`m = re.search(r"<answer>(.*?)</answer>", text, re.S)`; grade `m.group(1)` if found, else the whole text.

    RECIPE §7.2 (run_offline_inference.py), used for pass counts (§2.1) and pass@k (§7.3); linear time."""
    i = response.find("<answer>")
    j = response.find("</answer>", i + 8) if i != -1 else -1
    pred = response[i + 8 : j] if j != -1 else response
    return grade_answer(pred.strip(), answer, answer_label)


def _last_answer_block(response: str) -> str | None:
    """Last match of `re.findall(r"<answer>(.*?)</answer>", response, re.S)`, in linear time."""
    last, pos = None, 0
    while (i := response.find("<answer>", pos)) != -1:
        j = response.find("</answer>", i + 8)
        if j == -1:
            break
        last, pos = response[i + 8 : j], j + 9
    return last


def extract_lenient(response: str) -> str:
    """The evaluation regrader's prediction string (RECIPE §7.2)."""
    block = _last_answer_block(response)
    if block is not None:
        m = _FIRST_LINE.match(block)
        pred = m.group(1) if m else ""
    else:
        pred = response
        for pattern in _ANSWER_PHRASES:
            hits = pattern.findall(response)
            if hits:
                pred = hits[-1]
                break
    for tag in FORMAT_TAGS:
        pred = pred.replace(tag, "")
    return pred.strip()


def lenient_correct(response: str, answer: str, answer_label: str) -> bool:
    """The evaluation grader: lenient extraction, then the same exact match as the reward."""
    return grade_answer(extract_lenient(response), answer, answer_label)


def option_letter(pred: str, options: dict[str, str]) -> str | None:
    """The first option whose letter, text or 'L. text' the prediction equals (for majority voting)."""
    for letter, text in options.items():
        if grade_answer(pred, text, letter):
            return letter
    return None


Grader = Literal["lenient", "inference", "strict"]  # the names of GRADERS, for choice flags
GRADERS = {"lenient": lenient_correct, "inference": inference_correct,
           "strict": lambda response, answer, answer_label: strict_reward(response, answer, answer_label) == 1.0}
"""Every grader by name: response, answer, answer_label -> bool. evaluate.py's --grader and data_prep.py filter's
--grader pick from these; records store each verdict in the field verdict_field(name)."""


def verdict_field(grader: str) -> str:
    """The record field holding a grader's verdict: `correct` for the lenient regrader (the paper's tables), else
    `correct_<grader>`. evaluate.py writes these fields; report.py and data_prep.py filter read them. KeyError for a
    name that is not in GRADERS."""
    if grader not in GRADERS:
        raise KeyError(f"unknown grader {grader!r}; choose from {sorted(GRADERS)}")
    return "correct" if grader == "lenient" else f"correct_{grader}"


def item_score(runs: dict) -> float:
    """An item's score in [0, 1]: the mean over runs of the mean over that run's samples of the verdicts,
    `mean_r mean_s correct[r][s]`; runs: {run: [verdict per sample]} (bools or 0/1), none of them empty.

    Runs weigh equally whatever their sample counts (an unbalanced folder, e.g. a resumed run, is not weighted by
    samples). It is the per-item statistic of the paper's tables (RECIPE §7.1: accuracy per run, mean over runs),
    which evaluate.py summarise and compare and report.py's flips all use.
    ZeroDivisionError for no runs or an empty run."""
    if any(len(v) == 0 for v in runs.values()) or not runs:
        raise ZeroDivisionError("an item score needs at least one run and one sample in each run")
    return float(np.mean([np.mean(np.asarray(v, dtype=float)) for v in runs.values()]))
