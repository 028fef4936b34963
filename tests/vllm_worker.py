"""Engine-level vLLM checks, run by tests/test_vllm.py in a subprocess (vLLM pins threads and NUMA memory policy in
the process that starts it, so it never starts inside the pytest process). Not a test module itself.

    python tests/vllm_worker.py parity SMOLLM2 TINY_VL_VLLM OUT.json
Prints nothing useful; writes its measurements to OUT.json and raises on the first failed check.
"""

import json
import sys
from types import SimpleNamespace

import torch
from PIL import Image

from common import dist, forward, generate as G, prompts
from common.model import banned_token_ids, load_model, load_processor
from common.vllm_engine import VLLMEngine

QUESTIONS = ["Which organ produces insulin?", "Which vitamin deficiency causes scurvy?",
             "Which cells carry oxygen in the blood?", "Where is bile stored?"]
OPTIONS = {"A": "Liver", "B": "Pancreas", "C": "Kidney", "D": "Gallbladder"}


def _Item(question, options, images=()):
    return SimpleNamespace(question=question, options=options, images=list(images))


def text_prompts(tok):
    return [G.Prompt(prompts.prompt_text(None, tok, _Item(q, OPTIONS))) for q in QUESTIONS]


def image_prompts(proc):
    out = []
    for i, q in enumerate(QUESTIONS[:3]):
        imgs = [Image.new("RGB", (84 + 14 * i, 70), (60 * i, 120, 200 - 50 * i))] if i != 1 else []
        out.append(G.Prompt(prompts.prompt_text(proc, None, _Item(q, OPTIONS, imgs)), imgs))
    return out


def trainer_logprobs(model, ids: list, start: int) -> torch.Tensor:
    """(len(ids) - start,) log-probs of ids[start:] under the HF model (teacher forcing), fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def engine_logprobs(eng, ids: list, start: int) -> torch.Tensor:
    """The same log-probs from the vLLM engine (prompt_logprobs of the whole sequence)."""
    from vllm import SamplingParams

    eng._ready()
    out = eng.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                      detokenize=False), use_tqdm=False)[0]
    return torch.tensor([out.prompt_logprobs[k][ids[k]].logprob for k in range(start, len(ids))])


def vl_trainer_logprobs(model, seg, response: list) -> torch.Tensor:
    """(len(response),) log-probs of `response` after the encoded image prompt `seg` under the HF Qwen2.5-VL model:
    the trainer's own path (forward.pack: mRoPE positions, image features in the <|image_pad|> slots). Keeps the
    graph when grad is enabled."""
    packed = forward.pack([forward.Segment(seg.ids, seg.pixel_values, seg.image_grid_thw,
                                           branches=[torch.tensor(response)])], model)
    return forward.token_logprobs(model, packed)[0]


def vl_engine_logprobs(eng, prompt, response: list) -> torch.Tensor:
    """The same log-probs from the vLLM engine: prompt_logprobs of prompt + response, the image through
    multi_modal_data (vLLM expands the image pads). No cache is reset here: a push must drop what it invalidates."""
    from vllm import SamplingParams

    eng._ready()
    head = eng.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    req = {"prompt_token_ids": head + list(response), "multi_modal_data": {"image": prompt.images}}
    out = eng.llm.generate([req], SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                           use_tqdm=False)[0]
    ids, n = list(out.prompt_token_ids), len(response)
    assert ids[-n:] == list(response)
    return torch.tensor([out.prompt_logprobs[k][ids[k]].logprob for k in range(len(ids) - n, len(ids))])


# one parameter of each family of the vLLM Qwen2.5-VL model (vLLM name -> the trainer's, transformers 5). Both are
# plain tensors in vLLM (its CPU linear weights are oneDNN-packed, shape (0,)); vLLM pads the vocabulary (512 rows
# for the trainer's 511), so the embedding is compared on the trainer's rows
VL_PROBES = {"visual.patch_embed.proj.weight": "model.visual.patch_embed.proj.weight",
             "language_model.model.embed_tokens.weight": "model.language_model.embed_tokens.weight"}


def engine_params(worker, names):
    """Copies of the named parameters of the vLLM model (runs inside the worker, in-process)."""
    params = dict(worker.model_runner.get_model().named_parameters())
    return {n: params[n].detach().clone() for n in names}


def with_bos_tokenizer(folder: str, dest: str) -> str:
    """A copy of `folder` whose tokenizer prepends <|endoftext|> (id 0) as BOS when special tokens are added."""
    import os
    import shutil

    shutil.copytree(folder, dest, dirs_exist_ok=True)
    path = os.path.join(dest, "tokenizer.json")
    with open(path) as f:
        t = json.load(f)
    t["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                 "tokens": ["<|endoftext|>"]}}}
    with open(path, "w") as f:
        json.dump(t, f)
    return dest


def zero_engine_weights(worker):
    """What sleep(level=2) leaves behind, made physical on a platform without sleep mode: weights that are gone."""
    with torch.no_grad():
        for p in worker.model_runner.get_model().parameters():
            p.zero_()
    from common.vllm_engine import _refresh_lm_heads

    _refresh_lm_heads(worker)


def parity(smollm2: str, tiny_vl: str, out: str):
    dist.init(seed=0)
    report = {}

    # 1. SmolLM2: dummy start + push from the trainer = the checkpoint's greedy tokens, token for token
    _, tok = load_processor(smollm2)
    model = load_model(smollm2, dtype="fp32").eval()
    hf = G.HFEngine(model, None, tok, batch_size=4)
    ps = text_prompts(tok)
    ref = hf.generate(ps, max_new_tokens=24)
    eng = VLLMEngine(smollm2, tok, dtype="fp32", is_vl=False, dummy_weights=True, max_model_len=1024,
                       weight_source=lambda: model.named_parameters())
    assert eng.weights == "stale", eng.weights
    got = eng.generate(ps, max_new_tokens=24, logprobs=True)
    assert eng.pushes == 1 and eng.weights == "current"
    for r, g in zip(ref, got):
        assert r[0].token_ids == g[0].token_ids, (r[0].text, g[0].text)
        assert r[0].text == g[0].text and r[0].finish_reason == g[0].finish_reason
    report["greedy_text_equal"] = len(ref)

    # 2. sampled tokens: the engine's log-probs equal the trainer's (teacher forcing on the same tokens)
    sampled = eng.generate(ps, n=2, temperature=1.0, max_new_tokens=16, seeds=[1, 2, 3, 4], logprobs=True)
    diffs = []
    for p, group in zip(ps, sampled):
        head = tok(p.text, add_special_tokens=False)["input_ids"]
        for s in group:
            t = trainer_logprobs(model, head + s.token_ids, len(head))
            diffs.append(float((t - torch.tensor(s.logprobs)).abs().max()))
    report["sampled_logprob_maxdiff"] = max(diffs)
    assert max(diffs) < 1e-3, diffs

    # 2b. seeded sampling over prompts that together exceed one step's token budget (chunked prefill split them and
    #     crashed vLLM-CPU: "CPU Generator does not use offset")
    long_ps = [G.Prompt(prompts.prompt_text(None, tok, _Item(q + " Think of the anatomy first." * 80, OPTIONS)))
               for q in QUESTIONS * 3]
    n_tok = sum(len(tok(p.text, add_special_tokens=False)["input_ids"]) for p in long_ps)
    got = eng.generate(long_ps, n=2, temperature=1.0, max_new_tokens=4, seeds=list(range(len(long_ps))))
    assert all(len(g) == 2 for g in got)
    report["long_seeded_prompt_tokens"] = n_tok

    # 3. a weight change reaches the engine: one SGD step with a non-zero gradient, push, compare
    probe_head = tok(ps[0].text, add_special_tokens=False)["input_ids"]
    probe = probe_head + sampled[0][0].token_ids
    before_engine = engine_logprobs(eng, probe, len(probe_head))
    model.train()
    logits = model(torch.tensor([probe])).logits[0, len(probe_head) - 1 : -1]
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(probe[len(probe_head):]))
    loss.backward()
    grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    assert grad_norm > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad.sign()
    model.eval()
    after_trainer = trainer_logprobs(model, probe, len(probe_head))
    eng.mark_stale()
    after_engine = engine_logprobs(eng, probe, len(probe_head))  # _ready() pushes first
    moved = float((after_engine - before_engine).abs().max())
    match = float((after_engine - after_trainer).abs().max())
    report.update(weight_change_engine_moved=moved, weight_change_engine_vs_trainer=match, pushes=eng.pushes)
    assert moved > 0.05 and match < 1e-3, (moved, match)

    # 4. the sequence sync -> rollout -> validate -> (weights discarded, as sleep(level=2) leaves them) -> rollout
    #    -> update -> sync -> rollout: every rollout runs on the trainer's current weights
    seq = []
    for phase in ["rollout", "validate", "discard", "rollout", "update", "rollout"]:
        if phase == "discard":
            eng.llm.collective_rpc(zero_engine_weights)
            eng.weights = "discarded"  # the engine's record after sleep(level=2) on a GPU
            continue
        if phase == "update":
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0 + 1e-3)
            eng.mark_stale()
            eng.push_weights()
            continue
        outs = eng.generate(ps[:2], n=1, temperature=1.0 if phase == "rollout" else 0.0, max_new_tokens=12,
                            seeds=[7, 8], logprobs=True)
        worst = 0.0
        for p, group in zip(ps[:2], outs):
            head = tok(p.text, add_special_tokens=False)["input_ids"]
            t = trainer_logprobs(model, head + group[0].token_ids, len(head))
            worst = max(worst, float((t - torch.tensor(group[0].logprobs)).abs().max()))
        seq.append((phase, worst))
    report["sequence"] = seq
    assert all(w < 1e-3 for _, w in seq), seq
    eng.shutdown()

    # 4b. a tokenizer that adds its own BOS (post-processor), under a chat template that writes its own start: both
    #     engines must see the trainer's ids (vLLM given text added a second BOS, vllm#27486)
    bos_dir = with_bos_tokenizer(smollm2, out + ".bos")
    btok = load_processor(bos_dir)[1]
    bp = text_prompts(btok)[:1]
    want = G.encode(None, btok, bp[0]).ids.tolist()
    assert btok(bp[0].text)["input_ids"][0] == 0 != want[0]  # the tokenizer does add one; our encoding does not
    beng = VLLMEngine(bos_dir, btok, dtype="fp32", is_vl=False, max_model_len=1024)
    beng.generate(bp, max_new_tokens=2)
    report.update(bos_ids_trainer=len(want), bos_ids_vllm=len(beng.last_prompt_ids[0]))
    assert beng.last_prompt_ids[0] == want, (len(want), len(beng.last_prompt_ids[0]))
    beng.shutdown()

    # 5. tiny Qwen2.5-VL: image prompts through multi_modal_data give the HF engine's greedy tokens; vision special
    #    tokens are never sampled (and would be without the ban: the check can fail)
    proc, vtok = load_processor(tiny_vl)
    vmodel = load_model(tiny_vl, dtype="fp32").eval()
    vps = image_prompts(proc)
    vref = G.HFEngine(vmodel, proc, vtok, batch_size=3).generate(vps, max_new_tokens=16)
    veng = VLLMEngine(tiny_vl, vtok, dtype="fp32", is_vl=True, max_model_len=1024)
    vgot = veng.generate(vps, max_new_tokens=16)
    for p, seen in zip(vps, veng.last_prompt_ids):  # the same ids as the HF engine's, image pads expanded
        assert seen == G.encode(proc, vtok, p).ids.tolist(), (len(seen), len(G.encode(proc, vtok, p).ids))
    for r, g in zip(vref, vgot):
        assert r[0].token_ids == g[0].token_ids, (r[0].token_ids, g[0].token_ids)
    report["vl_greedy_equal"] = len(vref)
    banned = set(banned_token_ids(vtok))
    draws = veng.generate(vps, n=16, temperature=1.5, max_new_tokens=32, seeds=[3, 4, 5])
    report["vl_banned_sampled"] = sum(t in banned for o in draws for s in o for t in s.token_ids)
    veng.banned = []
    free = veng.generate(vps, n=16, temperature=1.5, max_new_tokens=32, seeds=[3, 4, 5])
    report["vl_banned_sampled_without_ban"] = sum(t in banned for o in free for s in o for t in s.token_ids)
    assert report["vl_banned_sampled"] == 0 and report["vl_banned_sampled_without_ban"] > 0, report
    veng.shutdown()

    # 5b. tiny Qwen2.5-VL from dummy weights + a push from the trainer: the push reaches both the vision tower and the
    #     language model (HF `model.visual.*` / `model.language_model.*` map onto vLLM's `visual.*` /
    #     `language_model.model.*`), greedy image answers equal the HF engine's, and a weight change (one SGD step
    #     through the image) moves the engine to the trainer's new log-probs
    pushed = {}

    def vl_source():
        for name, p in vmodel.named_parameters():
            family = name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
            pushed[family] = pushed.get(family, 0) + 1
            yield name, p

    veng = VLLMEngine(tiny_vl, vtok, dtype="fp32", is_vl=True, dummy_weights=True, max_model_len=1024,
                      processor=proc, weight_source=vl_source)
    assert veng.weights == "stale", veng.weights
    dummy = veng.llm.collective_rpc(engine_params, args=(list(VL_PROBES),))[0]
    vgot = veng.generate(vps, max_new_tokens=16)
    assert veng.pushes == 1 and veng.weights == "current"
    landed = veng.llm.collective_rpc(engine_params, args=(list(VL_PROBES),))[0]
    hf_params = dict(vmodel.named_parameters())
    report["vl_push_names"] = dict(pushed)
    report["vl_push_checksums"] = {n: [float(dummy[n][: len(hf_params[h])].double().sum()),
                                       float(landed[n][: len(hf_params[h])].double().sum()),
                                       float(hf_params[h].detach().double().sum())] for n, h in VL_PROBES.items()}
    for n, hf_name in VL_PROBES.items():
        want = hf_params[hf_name].detach()
        was, got = dummy[n][: len(want)], landed[n][: len(want)]
        assert not torch.equal(was, got), f"{n}: unchanged by the push"
        assert torch.equal(got, want), (n, float((got - want).abs().max()))
    for r, g in zip(vref, vgot):
        assert r[0].token_ids == g[0].token_ids, (r[0].token_ids, g[0].token_ids)
    report["vl_pushed_greedy_equal"] = len(vref)

    vp = vps[0]  # an image prompt
    assert vp.images
    vseg = G.encode(proc, vtok, vp)
    vresp = veng.generate([vp], n=1, temperature=1.0, max_new_tokens=16, seeds=[11])[0][0].token_ids
    before_engine = vl_engine_logprobs(veng, vp, vresp)  # fills vLLM's encoder cache with this image's features
    before_trainer = vl_trainer_logprobs(vmodel, vseg, vresp).detach()
    report["vl_logprob_vs_trainer_before"] = float((before_engine - before_trainer).abs().max())
    assert report["vl_logprob_vs_trainer_before"] < 1e-3, report["vl_logprob_vs_trainer_before"]
    vmodel.train()
    loss = -vl_trainer_logprobs(vmodel, vseg, vresp).mean()  # = cross-entropy on the sampled response
    loss.backward()
    for family, module in (("visual", vmodel.model.visual), ("language_model", vmodel.model.language_model)):
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))
        assert norm > 0, (family, norm)
    with torch.no_grad():
        for p in vmodel.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad.sign()
    vmodel.eval()
    with torch.no_grad():
        after_trainer = vl_trainer_logprobs(vmodel, vseg, vresp)
    veng.mark_stale()
    after_engine = vl_engine_logprobs(veng, vp, vresp)  # _ready() pushes first
    moved = float((after_engine - before_engine).abs().max())
    match = float((after_engine - after_trainer).abs().max())
    report.update(vl_weight_change_engine_moved=moved, vl_weight_change_engine_vs_trainer=match,
                  vl_pushes=veng.pushes)
    assert veng.pushes == 2 and moved > 0.05 and match < 1e-3, (moved, match)
    veng.shutdown()
    dist.cleanup()
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print("OK", json.dumps(report), flush=True)


if __name__ == "__main__":
    {"parity": parity}[sys.argv[1]](*sys.argv[2:])
