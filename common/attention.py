"""Padding-free attention for PyTorch sdpa: each segment of a packed row attends on its own, no L x L mask.

transformers builds a dense (L, L) mask for packed rows under sdpa, and the masked kernel then computes every score
of the row: quadratic in the *row* length, not in the sample length. This registers `mvl_sdpa`, an attention
function that, when the forward carries a row layout (`mvl_layout`, made by forward.pack), runs

    each prompt / sample:       sdpa(q, k, v, is_causal=True)                      (the fused causal kernel)
    each branch of a prompt:    sdpa(q_branch, [k_prompt; k_branch], mask=[1 | causal])

and otherwise (KV-cache decoding, plain calls) defers to transformers' own sdpa function, so the model behaves as
with `sdpa` everywhere else. The masks the model builds for `mvl_sdpa` are sdpa's.
"""

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "mvl_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D), None."""
    layout = kwargs.pop("mvl_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rep = query.shape[1] // key.shape[1]
    if rep > 1:  # grouped-query attention: share each key/value head across its query heads
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    L = query.shape[2]
    rows = []
    for b, segments in enumerate(layout):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        pieces, pos = [], 0
        for start, plen, branches in segments:
            if start > pos:  # padding between segments (never attended to, never a target)
                pieces.append(q.new_zeros(1, q.shape[1], start - pos, q.shape[3]))
            end = start + plen
            pieces.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                         is_causal=True, scale=scaling))
            pos = end
            for bs, be in branches:
                r = be - bs
                mask = torch.ones(r, plen + r, dtype=torch.bool, device=q.device)
                mask[:, plen:] = torch.ones(r, r, dtype=torch.bool, device=q.device).tril()
                kb = torch.cat([k[:, :, start:end], k[:, :, bs:be]], dim=2)
                vb = torch.cat([v[:, :, start:end], v[:, :, bs:be]], dim=2)
                pieces.append(F.scaled_dot_product_attention(q[:, :, bs:be], kb, vb, attn_mask=mask, scale=scaling))
                pos = be
        if pos < L:
            pieces.append(q.new_zeros(1, q.shape[1], L - pos, q.shape[3]))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `mvl_sdpa` known to transformers (idempotent)."""
    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, varlen_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
