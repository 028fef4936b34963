"""The HF engine: greedy equals transformers' generate, per-row seeds, banned vision tokens, FSDP2 sync.

    pytest -q tests/test_generate.py"""

import pytest
import torch
from PIL import Image

from common import generate as G, prompts
from common.model import banned_token_ids, load_model, load_processor
from conftest import torchrun


def _prompts(proc, tok, k=3, images=True):
    vl = proc is not None
    out = []
    for i in range(k):
        img = [Image.new("RGB", (90, 70), (i * 80, 0, 0))] if vl and images and i != 1 else []
        msgs = prompts.messages(f"Which organ produces insulin? {i}" * (i + 1), {"A": "Liver", "B": "Pancreas"},
                                len(img), vl)
        out.append(G.Prompt(prompts.render(proc or tok, msgs), img))
    return out


def test_greedy_matches_transformers_generate(smollm2):
    proc, tok = load_processor(smollm2)
    model = load_model(smollm2, dtype="fp32").eval()
    ps = _prompts(proc, tok)
    ours = G.HFEngine(model, proc, tok, batch_size=2).generate(ps, max_new_tokens=24)
    for p, o in zip(ps, ours):
        enc = tok(p.text, return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        assert o[0].token_ids == ref[: len(o[0].token_ids)]
        assert o[0].finish_reason == ("stop" if o[0].token_ids[-1] == tok.eos_token_id else "length")


def test_vl_greedy_matches_generate_without_bans(tiny_vl):
    proc, tok = load_processor(tiny_vl)
    model = load_model(tiny_vl, dtype="fp32").eval()
    eng = G.HFEngine(model, proc, tok, batch_size=3)
    eng.banned = []  # transformers does not ban vision tokens; compare like with like
    ps = _prompts(proc, tok)
    for p, o in zip(ps, eng.generate(ps, max_new_tokens=12)):
        enc = proc(text=[p.text], images=p.images or None, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        assert o[0].token_ids == ref


def test_sampling_is_seeded_per_row_and_never_emits_vision_tokens(tiny_vl):
    proc, tok = load_processor(tiny_vl)
    model = load_model(tiny_vl, dtype="fp32").eval()
    ps = _prompts(proc, tok)
    eng = G.HFEngine(model, proc, tok, batch_size=2)
    a = eng.generate(ps, n=4, temperature=1.0, max_new_tokens=16, seeds=[1, 2, 3])
    b = eng.generate(ps, n=4, temperature=1.0, max_new_tokens=16, seeds=[1, 2, 3])
    c = eng.generate(ps, n=4, temperature=1.0, max_new_tokens=16, seeds=[1, 2, 4])
    ids = lambda r: [s.token_ids for x in r for s in x]  # noqa: E731
    assert ids(a) == ids(b) and ids(a)[:8] == ids(c)[:8] and ids(a)[8:] != ids(c)[8:]
    assert len({tuple(s.token_ids) for s in a[0]}) > 1  # the n samples differ
    banned = set(banned_token_ids(tok))
    assert banned and not banned & {t for x in ids(a) for t in x}


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    got = {int(G.sample_next(logits, 1.0, 0.7, [g])[0]) for g in gens}
    assert got == {0, 1}
    assert int(G.sample_next(logits, 0.0, 1.0, [])[0]) == 0


def test_fsdp_synced_generation_and_backward(tiny_vl, tmp_path):
    # rank 0 has image prompts, rank 1 text-only ones and more of them: collectives must still line up
    p = torchrun("tests/fsdp_worker.py", "generate", tiny_vl, str(tmp_path), timeout=300)
    assert p.stdout.count("OK rank") == 2, p.stdout[-3000:]


def test_decode_keeps_format_tags_that_are_special_tokens(smollm2):
    """Issue 11 §1 on SmolLM2's real tokenizer with the four tags registered as special tokens: the old decode
    (skip_special_tokens=True) deletes them and a perfect response scores 0; decode_response keeps them and drops
    only the other special tokens (here <|im_end|>, the stop token)."""
    from transformers import AutoTokenizer

    from common import grading
    from common.model import FORMAT_TAGS, control_strings, decode_response, response_drop_ids, special_token_ids

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.add_tokens(list(FORMAT_TAGS), special_tokens=True)
    perfect = "<think> the pancreas makes insulin </think>\n<answer> B </answer>"
    ids = tok(perfect + "<|im_end|>", add_special_tokens=False)["input_ids"]
    tag_ids = set(tok.convert_tokens_to_ids(list(FORMAT_TAGS)))
    assert tag_ids <= set(ids) and tag_ids <= special_token_ids(tok)
    old = tok.decode(ids, skip_special_tokens=True)
    assert grading.strict_reward(old, "Pancreas", "B") == 0.0 and "<answer>" not in old
    new = decode_response(tok, ids)
    assert new == perfect and grading.strict_reward(new, "Pancreas", "B") == 1.0
    assert grading.lenient_correct(new, "Pancreas", "B")
    assert not tag_ids & response_drop_ids(tok) and tok.convert_tokens_to_ids("<|im_end|>") in response_drop_ids(tok)
    assert decode_response(tok, ids, prefill="<think>\n").startswith("<think>\n<think> the")
    assert "<|im_start|>" in control_strings(tok) and not set(FORMAT_TAGS) & control_strings(tok)


def test_engine_output_is_graded_with_tags_and_prefill(tiny_vl_tags):
    """Issue 11 §1 through the HF engine's real decode: the scripted model (conftest.tiny_vl_tags) writes
    `x</think><answer>A</answer>` after its template's `<think>\\n` prefill, with the tags as special token ids.
    What the graders see must be the whole assistant turn, and score 1 / be correct."""
    from common import grading
    from conftest import SCRIPTED

    proc, tok = load_processor(tiny_vl_tags)
    model = load_model(tiny_vl_tags, dtype="fp32").eval()
    ps = _prompts(proc, tok)  # with and without an image, different lengths
    outs = G.HFEngine(model, proc, tok, batch_size=2).generate(ps, max_new_tokens=16)
    for o in outs:
        s = o[0]
        assert s.finish_reason == "stop" and s.text == "<think>\n" + SCRIPTED
        assert grading.strict_reward(s.text, "Liver", "A") == 1.0 and grading.lenient_correct(s.text, "Liver", "A")
        # the old decode: tags deleted and no prefill -> a perfect response scored 0
        assert grading.strict_reward(tok.decode(s.token_ids, skip_special_tokens=True), "Liver", "A") == 0.0
    # a prompt that does not end with the prefill (written by hand) gets nothing put in front
    bare = G.Prompt(ps[1].text[: -len("<think>\n")] + "</answer>\n")  # same last token, no prefill
    assert G.HFEngine(model, proc, tok).generate([bare], max_new_tokens=16)[0][0].text == SCRIPTED


def test_one_bad_prompt_costs_only_itself(tiny_vl):
    """Issue 11 §3: a prompt with one image whose text holds a second, pasted
    `<|vision_start|><|image_pad|><|vision_end|>` (what a control string in a question did before validation
    rejected it) makes the real processor raise (two image slots, one image), and with it the whole batch. generate_each retries item by item: the bad prompt gets its exception, the others the very
    samples they get without it (per-row seeds)."""
    import pytest

    proc, tok = load_processor(tiny_vl)
    model = load_model(tiny_vl, dtype="fp32").eval()
    good = _prompts(proc, tok)
    bad = _prompts(proc, tok, k=1)[0]
    bad = G.Prompt(bad.text.replace("Options:", "<|vision_start|><|image_pad|><|vision_end|> Options:"), bad.images)
    eng = G.HFEngine(model, proc, tok, batch_size=4)
    sampling = dict(n=2, temperature=1.0, max_new_tokens=6)
    with pytest.raises(Exception):  # the old fate of the batch (StopIteration inside the processor)
        eng.generate([good[0], bad, good[1], good[2]], seeds=[1, 2, 3, 4], **sampling)
    got = G.generate_each(eng, [good[0], bad, good[1], good[2]], [1, 2, 3, 4], **sampling)
    assert isinstance(got[1], Exception) and not any(isinstance(g, Exception) for g in got[:1] + got[2:])
    alone = eng.generate(good, seeds=[1, 3, 4], **sampling)
    assert [[s.token_ids for s in g] for g in got[:1] + got[2:]] == [[s.token_ids for s in g] for g in alone]


def test_tensor_parallel_groups_exchange_prompts_only_within_themselves(tmp_path):
    """Issue 20 item 11: with --tp 2 on 4 ranks, each rank receives the prompts (and PIL images) of its own group's
    2 ranks, not every rank's (before: an all-gather over the world, 10 prompts and images on every rank), and finds
    its own back at `start`. gloo, no vLLM: the gather is common/vllm_engine.py's."""
    import json

    torchrun("tests/fsdp_worker.py", "tp_feed", str(tmp_path), nproc=4, timeout=300)
    for r in range(4):
        rec = json.load(open(tmp_path / f"tp_feed.rank{r}.json"))
        peers = [r - r % 2, r - r % 2 + 1]
        assert rec["dp_size"] == 2 and rec["dp_rank"] == r // 2
        assert rec["senders"] == [p for p in peers for _ in range(p + 1)], rec  # only the group's ranks, in order
        assert rec["images"] == sum(p + 1 for p in peers) < 10
        assert rec["seeds"] == [100 * p + k for p in peers for k in range(p + 1)]
        assert rec["own"] == rec["own_expected"] and rec["start"] == (0 if r % 2 == 0 else r)


def test_tp_must_divide_the_ranks():
    from common.vllm_engine import tp_groups

    assert tp_groups(2, 8, 5) == (4, 2) and tp_groups(1, 3, 2) == (3, 2)
    with pytest.raises(SystemExit, match="--tp 3 must divide the 4 ranks"):
        tp_groups(3, 4, 0)
