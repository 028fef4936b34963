"""Packed rows with shared prompts give the model's own log-probs.   pytest -q tests/test_forward.py"""

import torch
from PIL import Image

from common import forward as fw, generate as G, prompts
from common.model import load_model, load_processor


def _segments(path, with_images):
    proc, tok = load_processor(path)
    model = load_model(path, dtype="fp32").eval()
    torch.manual_seed(0)
    shared, flat = [], []
    specs = [((100, 80), (200, 0, 0)), (None, None), ((60, 130), (0, 0, 200))]
    for k, (size, colour) in enumerate(specs):
        img = [Image.new("RGB", size, colour)] if (with_images and size) else []
        p = G.Prompt(prompts.render(proc or tok, prompts.messages(f"Q{k} " * (k + 1), {"A": "x", "B": "y"},
                                                                  len(img), proc is not None)), img)
        seg = G.encode(proc, tok, p)
        resps = [torch.randint(0, 200, (n,)) for n in (3, 6, 1)]
        shared.append(fw.Segment(seg.ids, seg.pixel_values, seg.image_grid_thw, branches=resps))
        for r in resps:
            mask = torch.cat([torch.zeros(len(seg.ids), dtype=torch.bool), torch.ones(len(r), dtype=torch.bool)])
            flat.append(fw.Segment(torch.cat([seg.ids, r]), seg.pixel_values, seg.image_grid_thw, target_mask=mask))
    return model, shared, flat


def _reference(model, segs):
    out = []
    for s in segs:
        kw = {}
        if s.pixel_values is not None:
            kw = dict(pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                      mm_token_type_ids=(s.ids == model.config.image_token_id).int()[None])
        logp = model(input_ids=s.ids[None], **kw).logits[0].float().log_softmax(-1)
        idx = torch.nonzero(s.target_mask)[:, 0]
        out.append(logp[idx - 1].gather(-1, s.ids[idx][:, None])[:, 0])
    return torch.cat(out)


def test_vl_shared_prefix_equals_model_forward(tiny_vl):
    model, shared, flat = _segments(tiny_vl, True)
    with torch.no_grad():
        a, ent = model.mvl_logprobs(fw.pack(shared, model))
        b, _ = model.mvl_logprobs(fw.pack(flat, model, rows="padded"))
        c, _ = model.mvl_logprobs(fw.pack(flat, model))
        ref = _reference(model, flat)
    assert a.shape == ref.shape == (3 * 10,)
    for x in (a, b, c):
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    assert (ent > 0).all()


def test_text_model_packed_equals_forward(tiny_text):
    model, shared, flat = _segments(tiny_text, False)
    with torch.no_grad():
        torch.testing.assert_close(model.mvl_logprobs(fw.pack(shared, model))[0], _reference(model, flat),
                                   atol=1e-5, rtol=0)


def test_spans_index_each_branch(tiny_text):
    model, shared, _ = _segments(tiny_text, False)
    packed = fw.pack(shared, model)
    assert [[e - s for s, e in seg] for seg in packed.spans] == [[0, 3, 6, 1]] * 3
    assert packed.input_ids.shape == (1, sum(len(s.ids) + 10 for s in shared))  # no padding at all


def test_mask_never_crosses_branches_or_segments():
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, -1]])
    br = torch.tensor([[0, 1, 2, 2, 0, 1, 0]])
    m = fw.attention_mask(doc, br)[0, 0]
    assert m[3].tolist() == [True, False, True, True, False, False, False]  # prompt + own branch
    assert m[5].tolist() == [False, False, False, False, True, True, False]
    assert not m[1, 2] and not m[2, 1]


def test_text_only_batch_still_runs_vision_tower(tiny_vl):
    model, _, flat = _segments(tiny_vl, False)
    lp, _ = model.mvl_logprobs(fw.pack(flat[3:6], model))
    lp.sum().backward()
    grads = [p.grad for p in model.model.visual.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0 for g in grads)


def test_padding_free_sdpa_matches_dense_mask(tiny_vl):
    """The mvl_sdpa attention (segment by segment, no L x L mask) equals transformers' sdpa with our dense mask."""
    from common import attention

    model, shared, flat = _segments(tiny_vl, True)
    text = fw.parts(model)[0]
    assert text.config._attn_implementation == attention.NAME
    with torch.no_grad():
        a, _ = model.mvl_logprobs(fw.pack(shared, model))
        text.config._attn_implementation = "sdpa"  # the dense-mask path
        try:
            b, _ = model.mvl_logprobs(fw.pack(shared, model))
        finally:
            text.config._attn_implementation = attention.NAME
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
