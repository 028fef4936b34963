"""Forward passes every stage shares: packed rows with shared prefixes, the Qwen2.5-VL image merge, chunked log-probs.

A *segment* is one prompt (for SFT: one whole conversation) plus optional *branches*, continuations that all see
the prompt but not each other (GRPO's G responses to one prompt). Segments are packed into rows:

    row:    [ prompt_1 | resp_1,1 | resp_1,2 | prompt_2 | resp_2,1 | ... ]
    attend: token i sees token j iff j <= i, same segment, and j is in the prompt or in i's own branch

so each prompt is computed once per group and no padding is computed. Positions restart per segment; a branch
continues from the end of its prompt. For Qwen2.5-VL the prompt's 3-D mRoPE positions come from the model's own
`get_rope_index`, and the position tensor carries a leading 1-D text row as transformers expects for packed input.
With flash-attention the mask cannot express branches, so callers pack without them (prompts repeated) and the
varlen boundaries come from the positions.

Both entry points run inside one call to the root module (`attach` registers them as FSDP forward methods), so
every rank issues the same collectives: a text-only batch still runs the vision tower once on a dummy image,
weighted by zero (it also keeps the vision optimizer state in existence).
"""

import inspect
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import attention


@dataclass
class Segment:
    ids: torch.Tensor  # (P,) prompt token ids (SFT: the whole conversation)
    pixel_values: torch.Tensor | None = None  # (patches, C*T*p*p) from the processor
    image_grid_thw: torch.Tensor | None = None  # (images, 3)
    target_mask: torch.Tensor | None = None  # (P,) bool: tokens of `ids` that are targets (SFT loss tokens)
    branches: list = field(default_factory=list)  # [(R_k,) int64]: continuations sharing the prompt


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L) text models; (4, B, L) Qwen2.5-VL: text row + t/h/w rows
    doc: torch.Tensor  # (B, L) segment id, -1 on padding
    branch: torch.Tensor  # (B, L) 0 = prompt, k = k-th branch
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pred_pos: torch.Tensor  # (M,) flat index (into B*L) of the position whose logits predict each target
    tgt_ids: torch.Tensor  # (M,) target token ids
    spans: list  # per segment: [prompt-target (start, end)] + [branch k (start, end)] ranges into M
    layout: list  # per row: [(start, prompt length, [(branch start, branch end), ...])] for padding-free sdpa

    def to(self, device):
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Packed(**{k: move(v) for k, v in self.__dict__.items()})


def rope_index(model, ids: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """(3, P) mRoPE positions of one unpadded prompt, from the model's own get_rope_index (None for text LMs)."""
    inner = model.model
    if grid is None:
        return torch.arange(len(ids)).expand(3, -1)
    fn = inner.get_rope_index
    kw = {}
    if "mm_token_type_ids" in inspect.signature(fn).parameters:  # transformers >= 5.18 wants the modality map
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()[None]
    pos, _ = fn(ids[None].cpu(), image_grid_thw=grid.cpu(), **kw)
    return pos[:, 0]


def pack(segments: list[Segment], model, rows: str = "packed") -> Packed:
    """Lay segments out as one packed row (rows='packed') or one right-padded row each (rows='padded')."""
    vl = is_vl(model)
    laid = []  # per segment: ids, text positions, mRoPE positions, branch ids, predictor positions, targets, spans
    pixel, grids = [], []
    for seg in segments:
        P = len(seg.ids)
        pos3 = rope_index(model, seg.ids, seg.image_grid_thw) if vl else None
        ids, text_pos, rope, branch = [seg.ids], [torch.arange(P)], [pos3], [torch.zeros(P, dtype=torch.long)]
        pred, tgt, counts, offsets = [], [], [], []
        if seg.target_mask is not None:  # prompt targets: token t is predicted by position t - 1
            idx = torch.nonzero(seg.target_mask[1:], as_tuple=True)[0] + 1
            pred.append(idx - 1)
            tgt.append(seg.ids[idx])
        counts.append(sum(len(x) for x in tgt))
        offset, top = P, (int(pos3.max()) + 1 if vl else P)
        for b_i, resp in enumerate(seg.branches, start=1):  # a branch continues the prompt's positions
            R = len(resp)
            ids.append(resp)
            text_pos.append(torch.arange(P, P + R))
            if vl:
                rope.append(torch.arange(top, top + R).expand(3, -1))
            branch.append(torch.full((R,), b_i, dtype=torch.long))
            # its first token is predicted by the prompt's last position, the rest by their predecessors
            pred.append(torch.cat([torch.tensor([P - 1]), torch.arange(offset, offset + R - 1)]))
            tgt.append(resp)
            counts.append(R)
            offsets.append((offset, offset + R))
            offset += R
        empty = torch.zeros(0, dtype=torch.long)
        laid.append((torch.cat(ids), torch.cat(text_pos), torch.cat(rope, dim=1) if vl else None, torch.cat(branch),
                     torch.cat(pred) if pred else empty, torch.cat(tgt) if tgt else empty, counts, P, offsets))
        if seg.pixel_values is not None:
            pixel.append(seg.pixel_values)
            grids.append(seg.image_grid_thw)

    lengths = [len(x[0]) for x in laid]
    if rows == "packed":
        B, L = 1, sum(lengths)
        starts = [(0, sum(lengths[:i])) for i in range(len(laid))]
    else:
        B, L = len(laid), max(lengths)
        starts = [(i, 0) for i in range(len(laid))]
    input_ids, text_pos = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    pos3 = torch.zeros(3, B, L, dtype=torch.long) if vl else None
    doc, branch = torch.full((B, L), -1, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    tgt_pos, tgt_ids, spans, layout, m = [], [], [], [[] for _ in range(B)], 0
    for s_i, ((r, c), (ids, tp, p3, br, pred, tgt, counts, P, offsets)) in enumerate(zip(starts, laid)):
        n = len(ids)
        input_ids[r, c : c + n], text_pos[r, c : c + n], branch[r, c : c + n], doc[r, c : c + n] = ids, tp, br, s_i
        if vl:
            pos3[:, r, c : c + n] = p3
        layout[r].append((c, P, [(c + a, c + b) for a, b in offsets]))
        tgt_pos.append(pred + r * L + c)
        tgt_ids.append(tgt)
        spans.append([(m + sum(counts[:k]), m + sum(counts[: k + 1])) for k in range(len(counts))])
        m += sum(counts)
    position_ids = torch.cat([text_pos[None], pos3], dim=0) if vl else text_pos
    return Packed(input_ids, position_ids, doc, branch, torch.cat(pixel) if pixel else None,
                  torch.cat(grids) if grids else None, torch.cat(tgt_pos), torch.cat(tgt_ids), spans, layout)


def attention_mask(doc: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: causal, within a segment, never across branches. Padding rows see only themselves."""
    L = doc.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    same = doc[:, :, None] == doc[:, None, :]
    shared = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    mask = causal & same & shared
    mask |= torch.eye(L, dtype=torch.bool, device=doc.device)  # a padded query must see something (no NaN rows)
    return mask[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Model anatomy (transformers 5.x names)


def is_vl(model) -> bool:
    return hasattr(model.config, "vision_config")


def parts(model):
    """(text backbone, vision tower or None, lm_head) for Qwen2.5-VL and plain causal LMs."""
    if is_vl(model):
        return model.model.language_model, model.model.visual, model.lm_head
    return model.model, None, model.lm_head


def _vision(visual, pixel_values, grid):
    out = visual(pixel_values.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers >= 5.18 returns an output object


def embed(model, input_ids, pixel_values=None, image_grid_thw=None, vision: bool = True):
    """Token embeddings with image features scattered into the <|image_pad|> slots, or a zero-weighted dummy pass
    of the vision tower when there are no images (vision=False skips the tower: decoding steps on every rank)."""
    text, visual, _ = parts(model)
    embeds = text.embed_tokens(input_ids)
    if visual is None or not vision:
        return embeds
    if pixel_values is not None:
        feats = _vision(visual, pixel_values, image_grid_thw)
        slots = input_ids == model.config.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"image tokens ({int(slots.sum())}) and image features ({feats.shape[0]}) differ: "
                             "a prompt was truncated or the policy emitted <|image_pad|>")
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
    patch = visual.config.in_channels * visual.config.temporal_patch_size * visual.config.patch_size**2
    m = visual.config.spatial_merge_size
    dummy = torch.zeros(m * m, patch, device=input_ids.device)
    feats = _vision(visual, dummy, torch.tensor([[1, m, m]], device=input_ids.device))
    return embeds + 0.0 * feats.sum().to(embeds.dtype)


def hidden_states(model, packed: Packed) -> torch.Tensor:
    """(B, L, H) last hidden states of a packed or padded batch (no cache)."""
    text, _, _ = parts(model)
    embeds = embed(model, packed.input_ids, packed.pixel_values, packed.image_grid_thw)
    impl = text.config._attn_implementation
    extra = {}
    if impl == "flash_attention_2":  # varlen boundaries come from positions restarting at 0
        mask = None
    elif impl == attention.NAME:  # segment by segment inside the attention function; a stub mask skips the L x L one
        mask, extra = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=embeds.device), {"mvl_layout": packed.layout}
    else:
        mask = attention_mask(packed.doc, packed.branch)
        if impl == "eager":
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min)
    return text(inputs_embeds=embeds, attention_mask=mask, position_ids=packed.position_ids, use_cache=False,
                **extra).last_hidden_state


def _logp_chunk(h, w, tgt, temperature: float):
    logits = F.linear(h, w).float() / temperature  # (m, V) fp32
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tgt[:, None])[:, 0] - lse
    ent = lse - (logits.softmax(-1) * logits).sum(-1)
    return logp, ent


def _token_logprobs(self, packed: Packed, temperature: float = 1.0, chunk: int = 1024):
    """(M,) log p(target) and (M,) entropy at the target positions, logits computed `chunk` rows at a time.

    Each chunk is checkpointed, so peak memory holds one (chunk, vocab) fp32 block, not (tokens, vocab)."""
    h = hidden_states(self, packed)
    h = h.reshape(-1, h.shape[-1])[packed.pred_pos]
    w = parts(self)[2].weight
    out_lp, out_ent = [], []
    for i in range(0, h.shape[0], chunk):
        args = (h[i : i + chunk], w, packed.tgt_ids[i : i + chunk], temperature)
        lp, ent = checkpoint(_logp_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _logp_chunk(*args)
        out_lp.append(lp)
        out_ent.append(ent)
    if not out_lp:
        z = h.sum() * 0.0
        return z.reshape(0).float(), z.reshape(0).float()
    return torch.cat(out_lp), torch.cat(out_ent)


def _decode_step(self, input_ids, position_ids, attn_2d, cache, pixel_values=None, image_grid_thw=None,
                 prefill: bool = False):
    """One KV-cache step: (B, V) fp32 logits of the last position, and the updated cache. The vision tower runs on
    prefill calls only (every rank makes the same calls, so collectives stay in step)."""
    text, _, lm_head = parts(self)
    embeds = embed(self, input_ids, pixel_values, image_grid_thw, vision=prefill)
    out = text(inputs_embeds=embeds, attention_mask=attn_2d, position_ids=position_ids, past_key_values=cache,
               use_cache=True)
    return lm_head(out.last_hidden_state[:, -1]).float(), out.past_key_values


FORWARD_METHODS = ("mvl_logprobs", "mvl_decode")


def token_logprobs(model, packed: Packed, temperature: float = 1.0):
    """(M,) log-probs of the packed targets under logits / temperature and (M,) entropies (_token_logprobs has
    the formula). Runs through the method `attach` gave the model: under FSDP2 the root's unshard, reshard and gradient
    hooks fire only for module calls and registered forward methods (fsdp.shard registers it)."""
    return model.mvl_logprobs(packed, temperature)


def decode_step(model, input_ids, position_ids, attn_2d, cache, pixel_values=None, image_grid_thw=None,
                prefill: bool = False):
    """One KV-cache step, (B, V) fp32 logits and the cache (_decode_step), through the method `attach` gave the
    model so FSDP2's hooks fire (see token_logprobs)."""
    return model.mvl_decode(input_ids, position_ids, attn_2d, cache, pixel_values, image_grid_thw, prefill=prefill)


def attach(model):
    """Give the model our two entry points as methods (so FSDP can register them as forward methods), and switch
    the language model's sdpa attention to the padding-free variant (common/attention.py)."""
    text = parts(model)[0]
    if text.config._attn_implementation == "sdpa":
        attention.register()
        text.config._attn_implementation = attention.NAME
    model.mvl_logprobs = types.MethodType(_token_logprobs, model)
    model.mvl_decode = types.MethodType(_decode_step, model)
    return model
