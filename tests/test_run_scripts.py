"""Every run/ launcher, in every variant, names only flags its script has, with values of the right type.

The launchers are the recipe written down; a renamed flag would otherwise surface only on a GPU cluster, after the
queue. DRY_RUN=1 makes them print the command instead of running it, and cli.parse checks it the way the script will.
The scripts themselves: every flag has a default and a comment, and --help shows both.
"""

import os
import shlex
import subprocess
import sys

import pytest

import data_prep
import evaluate
import grpo
import sft
from common import cli

from conftest import ROOT

SCRIPTS = {"sft.py": sft.main, "grpo.py": grpo.main, "evaluate.py": evaluate.COMMANDS, "data_prep.py": data_prep.COMMANDS}

CASES = [("sft_3b.sh", {}), ("sft_3b.sh", {"DATA": "image"}), ("sft_7b.sh", {}), ("sft_32b.sh", {"DATA": "image"})]
CASES += [(f"grpo_{s}.sh", {"RUN": r}) for s in ("3b", "7b") for r in ("m23k", "pmc", "sft_rl", "rl_rl")]
CASES += [("grpo_32b.sh", {"NODE_RANK": "0", "MASTER_ADDR": "node0"}), ("eval.sh", {"TP": "4"})]
CASES += [("data_prep.sh", {})]


def commands(script: str, env: dict, args=()) -> list[list[str]]:
    """The python commands a launcher would run, as argv lists starting at the script name."""
    e = {**os.environ, "DRY_RUN": "1", **env}
    p = subprocess.run(["bash", f"run/{script}", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = []
    for line in p.stdout.splitlines():
        words = shlex.split(line.removeprefix("+ "))
        start = [i for i, w in enumerate(words) if w in SCRIPTS]
        if start:
            out.append(words[start[0]:])
    return out


def check(argv: list[str]):
    target = SCRIPTS[argv[0]]
    rest = argv[1:]
    if isinstance(target, dict):
        fn, rest = (target[rest[0]], rest[1:]) if rest and rest[0] in target else (target[""], rest)
    else:
        fn = target
    return cli.parse(fn, rest)


@pytest.mark.parametrize("script,env", CASES, ids=[f"{s}:{'-'.join(e.values()) or 'default'}" for s, e in CASES])
def test_launcher_flags_exist(script, env):
    args = ("7b",) if script == "eval.sh" else ()
    cmds = commands(script, env, args)
    assert cmds, f"run/{script} printed no command"
    for argv in cmds:
        kwargs = check(argv)
        assert kwargs, argv


def test_launcher_values_follow_recipe():
    """Spot checks against RECIPE §5/§6: the settings that decide the paper's numbers."""
    (g,) = commands("grpo_7b.sh", {"RUN": "m23k"})
    kw = check(g)
    assert (kw["lr"], kw["kl_coef"], kw["group_size"], kw["train_batch"], kw["epochs"]) == (1e-6, 0.01, 8, 256, 5)
    assert (kw["temperature"], kw["max_new_tokens"], kw["data"]) == (1.0, 4096, "text")
    (s,) = commands("sft_7b.sh", {})
    kw = check(s)
    assert (kw["lr"], kw["global_batch"], kw["beta2"], kw["weight_decay"]) == (1e-5, 16, 0.95, 1e-4)


def test_launcher_forwards_extra_flags_and_rejects_typos():
    (g,) = commands("grpo_3b.sh", {}, ("--max_steps", "3"))
    assert check(g)["max_steps"] == 3
    (g,) = commands("grpo_3b.sh", {}, ("--max_stepz", "3"))
    with pytest.raises(ValueError, match="unknown flag --max_stepz"):
        check(g)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_flag_has_a_default_and_a_comment(script):
    target = SCRIPTS[script]
    for name, fn in (target.items() if isinstance(target, dict) else [("", target)]):
        for flag, default, comment in cli.flags(fn):
            assert comment, f"{script} {name}: --{flag} has no comment on its line"
            assert default != "(required)" or name in ("compare", "regrade"), f"{script} --{flag}"  # positional


def test_help_lists_every_flag():
    p = subprocess.run([sys.executable, "data_prep.py", "passrate", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120, check=True)
    for flag, default, comment in cli.flags(data_prep.passrate):
        assert f"--{flag} {default}" in p.stdout and comment in p.stdout
    p = subprocess.run([sys.executable, "data_prep.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120, check=True)
    assert all(name in p.stdout for name in data_prep.COMMANDS)
