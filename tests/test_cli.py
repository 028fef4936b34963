"""The strict CLI: unknown flags and bad values fail before work.   pytest -q tests/test_cli.py"""

import os
import typing

import pytest

from common import cli, grading
from conftest import run_py


def f(model="3b", lr=1e-5, steps=10, flag=False, name=None, tag="001"):
    return (model, lr, steps, flag, name, tag)


def test_coercion():
    assert cli.parse(f, ["--lr", "2e-5", "--steps=1e3", "--flag", "--tag", "007"]) == \
        {"lr": 2e-5, "steps": 1000, "flag": True, "tag": "007"}
    assert cli.parse(f, ["--flag", "false", "--name", "x"]) == {"flag": False, "name": "x"}
    assert cli.parse(f, ["--flag=0", "--name=None"]) == {"flag": False, "name": None}


@pytest.mark.parametrize("argv,msg", [(["--lerning_rate", "1"], "unknown flag --lerning_rate"),
                                      (["--steps", "1.5"], "expects an integer"),
                                      (["--flag", "maybe"], "expects true/false"),
                                      (["--lr", "fast"], "expects a number"),
                                      (["--steps"], "needs a value"),
                                      (["stray"], "unexpected positional")])
def test_rejects(argv, msg):
    with pytest.raises(ValueError, match=msg):
        cli.parse(f, argv)


def test_script_fails_before_work(tmp_path):
    # evaluate.py with a typo: exits non-zero with the message, and never creates its output folder
    p = run_py("evaluate.py", "--model", "nowhere", "--out", str(tmp_path / "o"), "--lmit", "3", check=False)
    assert p.returncode != 0 and "unknown flag --lmit" in p.stdout
    assert not (tmp_path / "o").exists()


def g(
    a: int = 1,  # the first
    b=2,
):
    b = 3  # a comment in the body is not b's
    return a, b


def test_flags_read_comments_from_the_signature_only():
    assert cli.flags(g) == [("a", "(default 1)", "the first"), ("b", "(default 2)", "")]
    text = cli.help_text(g, "prog")
    assert "--a (default 1)" in text and "the first" in text and "body" not in text


# ---- Choice flags (issue 11 §4): the table is read from the scripts' own signatures, not written out here
import inspect  # noqa: E402

import data_prep  # noqa: E402
import evaluate  # noqa: E402
import grpo  # noqa: E402
import sft  # noqa: E402

SCRIPTS = {"sft.py": sft.main, "grpo.py": grpo.main, "evaluate.py": evaluate.COMMANDS,
           "data_prep.py": data_prep.COMMANDS}
COMMANDS = [(s, c, f) for s, t in SCRIPTS.items() for c, f in (t.items() if isinstance(t, dict) else [("", t)])]
CHOICES = [(s, c, f, n, allowed) for s, c, f in COMMANDS for n, allowed in cli.choices(f).items()]
# Flags whose comment lists alternatives but that take an open set (a preset OR a path / module:function).
OPEN = {("sft.py", "", "data"), ("sft.py", "", "resume"), ("grpo.py", "", "data"), ("grpo.py", "", "reward"),
        ("grpo.py", "", "resume")}
BAD = "no-such-choice"


def test_grader_choices_are_the_graders():
    assert set(typing.get_args(grading.Grader)) == set(grading.GRADERS)


def test_every_script_has_choice_flags():
    assert {s for s, *_ in CHOICES} >= {"sft.py", "grpo.py", "evaluate.py"}
    names = {(s, n) for s, _, _, n, _ in CHOICES}
    assert {("grpo.py", "engine"), ("grpo.py", "kl_type"), ("grpo.py", "loss_agg"), ("sft.py", "schedule"),
            ("sft.py", "dtype"), ("evaluate.py", "engine")} <= names


def test_flags_that_list_alternatives_are_choices_or_open_sets():
    # a flag documented as `a | b | c` must be a Literal (checked) or be named an open set above
    for s, c, f in COMMANDS:
        for name, _, comment in cli.flags(f):
            if " | " in comment and name not in cli.choices(f):
                assert (s, c, name) in OPEN, f"{s} {c} --{name} lists choices but is not Literal: {comment}"


@pytest.mark.parametrize("script,cmd,fn,name,allowed", CHOICES,
                         ids=[f"{s}:{c or 'main'}:{n}" for s, c, _, n, _ in CHOICES])
def test_choice_flag_checked_before_work(script, cmd, fn, name, allowed, tmp_path, monkeypatch, capsys):
    assert inspect.signature(fn).parameters[name].default in allowed
    monkeypatch.chdir(tmp_path)  # if a check were missing, whatever ran would write here, not into the repo
    # positional arguments (regrade FOLDER, compare A B) point at a folder that does not exist: no work can start
    required = {p: str(tmp_path / "x") for p, v in inspect.signature(fn).parameters.items() if v.default is v.empty}
    # command line: exits before work, message lists every allowed value
    with pytest.raises(SystemExit) as e:
        cli.run(SCRIPTS[script], ([cmd] if cmd else []) + list(required.values()) + [f"--{name}", BAD])
    msg = str(e.value.code)
    assert f"--{name} must be one of" in msg and BAD in msg and all(str(a) in msg for a in allowed if a is not None)
    # Python call: the same check is the command's first line
    with pytest.raises(ValueError, match=f"--{name} must be one of"):
        fn(**required, **{name: BAD})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("raw,value", [("True", True), ("1", True), ("yes", True), ("on", True), ("false", False),
                                       ("0", False), ("off", False), ("auto", None), ("none", None)])
def test_activation_checkpointing_is_a_bool(raw, value):
    # it was a string: "True", "1", "yes" and "on" all turned checkpointing off
    assert cli.parse(sft.main, ["--activation_checkpointing", raw]) == {"activation_checkpointing": value}
    assert cli.parse(sft.main, ["--activation_checkpointing"]) == {"activation_checkpointing": True}
    with pytest.raises(ValueError, match="expects true/false/auto"):
        cli.parse(sft.main, ["--activation_checkpointing", "maybe"])


def test_bools_are_bools_everywhere():
    # every flag that is a switch is typed bool (or bool | None = auto); no string default spells a bool
    for s, c, f in COMMANDS:
        for name, p in inspect.signature(f).parameters.items():
            assert not (isinstance(p.default, str) and p.default.lower() in cli.TRUE | cli.FALSE | {"auto"}
                        and name not in cli.choices(f) and (s, c, name) not in OPEN), f"{s} {c} --{name}"
