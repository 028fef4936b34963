"""Every run/ launcher, in every variant, names only flags its script has, with values of the right type.

The launchers are the recipe written down; a renamed flag would otherwise surface only on a GPU cluster, after the
queue. DRY_RUN=1 makes them print the command instead of running it, and cli.parse checks it the way the script will
(torchrun's own flags: torchrun's parser). The SLURM launchers run here without SLURM: the test sets the variables
sbatch would, from the file's #SBATCH lines, and each node's command is printed in turn.
The scripts themselves: every flag has a default and a comment, and --help shows both.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest
from torch.distributed.run import parse_args as torchrun_parse

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


def slurm_env(script: str) -> dict:
    """The variables sbatch would set for run/<script> (node count and GPUs from its #SBATCH lines), no SLURM needed."""
    head = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", open(os.path.join(ROOT, "run", script)).read(), re.M))
    nodes = int(head["nodes"])
    assert head["ntasks-per-node"] == "1", "one torchrun per node"
    return {"SLURM_JOB_NUM_NODES": str(nodes), "SLURM_GPUS_ON_NODE": head["gpus-per-node"],
            "SLURM_JOB_NODELIST": ",".join(f"gpu-{i}" for i in range(nodes))}


SBATCH = ["sft_32b.sbatch", "grpo_32b.sbatch"]
CASES += [(s, slurm_env(s)) for s in SBATCH]
CASES += [("sft_32b.sbatch", {**slurm_env("sft_32b.sbatch"), "DATA": "image"})]


def launch_lines(script: str, env: dict, args=()) -> list[list[str]]:
    """Every command line a launcher prints under DRY_RUN=1, as words (the launcher first: torchrun, python...)."""
    e = {**os.environ, "DRY_RUN": "1", **env}
    p = subprocess.run(["bash", f"run/{script}", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = []
    for line in p.stdout.splitlines():
        words = shlex.split(line.removeprefix("+ "))
        if any(w in SCRIPTS for w in words):
            out.append(words)
    return out


def split(words: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's words, the argv from the script name on)."""
    i = next(i for i, w in enumerate(words) if w in SCRIPTS)
    return words[:i], words[i:]


def commands(script: str, env: dict, args=()) -> list[list[str]]:
    """The python commands a launcher would run, as argv lists starting at the script name."""
    return [split(w)[1] for w in launch_lines(script, env, args)]


def torchrun_args(words: list[str]):
    """torchrun's parse of a printed torchrun line: an unknown or ill-typed torchrun flag fails here."""
    assert words[0] == "torchrun", words[:3]
    try:
        return torchrun_parse(words[1:])
    except SystemExit:
        raise AssertionError(f"torchrun rejects: {' '.join(split(words)[0])}") from None


def check(argv: list[str]):
    target = SCRIPTS[argv[0]]
    rest = argv[1:]
    if isinstance(target, dict):
        fn, rest = (target[rest[0]], rest[1:]) if rest and rest[0] in target else (target[""], rest)
    else:
        fn = target
    return cli.parse(fn, rest)


def _id(script, env):
    return f"{script}:{'-'.join(v for k, v in env.items() if not k.startswith('SLURM_')) or 'default'}"


@pytest.mark.parametrize("script,env", CASES, ids=[_id(s, e) for s, e in CASES])
def test_launcher_flags_exist(script, env):
    args = ("7b",) if script == "eval.sh" else ()
    lines = launch_lines(script, env, args)
    assert lines, f"run/{script} printed no command"
    for words in lines:
        launcher, argv = split(words)
        kwargs = check(argv)
        assert kwargs, argv
        if launcher[:1] == ["torchrun"]:
            assert torchrun_args(words).training_script == argv[0]


@pytest.mark.parametrize("script", SBATCH)
def test_sbatch_runs_the_recipe_once_per_node_with_the_first_node_as_rendezvous(script):
    env = slurm_env(script)
    nodes, gpus = int(env["SLURM_JOB_NUM_NODES"]), int(env["SLURM_GPUS_ON_NODE"])
    lines = launch_lines(script, env, ("--max_steps", "3"))
    assert len(lines) == nodes
    recipe = script.replace(".sbatch", ".sh")  # the one copy of the flags, forwarded with the extra ones
    (one_node,) = commands(recipe, {"NNODES": "1"}, ("--max_steps", "3"))
    for node, words in enumerate(lines):
        a = torchrun_args(words)
        assert (a.nnodes, a.node_rank, a.nproc_per_node) == (str(nodes), node, str(gpus))
        assert (a.rdzv_backend, a.rdzv_endpoint.split(":")[0], a.standalone) == ("c10d", "gpu-0", False)
        assert split(words)[1] == one_node
    kw, world = check(one_node), nodes * gpus  # the batch divides over every rank of the job
    if script.startswith("sft"):
        sft.batch_plan(kw["global_batch"], kw["micro_batch"], world)
    else:
        assert kw["train_batch"] % world == kw["mini_batch"] % world == kw["train_batch"] % kw["mini_batch"] == 0


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
    p = subprocess.run([sys.executable, "data_prep.py", "filter", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120, check=True)
    for flag, default, comment in cli.flags(data_prep.filter_set):
        assert f"--{flag} {default}" in p.stdout and comment in p.stdout
    p = subprocess.run([sys.executable, "data_prep.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120, check=True)
    assert all(name in p.stdout for name in data_prep.COMMANDS)
