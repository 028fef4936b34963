"""The strict CLI: unknown flags and bad values fail before work.   pytest -q tests/test_cli.py"""

import pytest

from common import cli
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
