"""Load Qwen2.5-VL or a plain causal LM (hub id, preset or local folder) with its processor/tokenizer; count FLOPs.

Presets map a size to the Qwen2.5-VL-Instruct hub id. A local folder is used as is, so HF_HUB_OFFLINE=1 works with
folders (our own exports included). Weights load from safetensors only, and `trust_remote_code` stays off unless a
flag asks. Attention is flash_attention_2 when the package imports on a GPU, else PyTorch sdpa.
"""

import json
import os
from typing import Literal

import torch

from common import forward
from common.grading import FORMAT_TAGS

PRESETS = {
    "3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "72b": "Qwen/Qwen2.5-VL-72B-Instruct",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# Choice-flag types shared by the scripts (common/cli.py checks Literal flags before any work).
Dtype = Literal["bf16", "fp16", "fp32"]  # the keys of DTYPES
# auto = flash_attention_2 on a GPU where it imports, else sdpa; the rest are transformers' built-in names
Attn = Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# FORMAT_TAGS (common.grading, their one home): some reasoning tokenizers register them as special tokens; they must
# survive decoding all the same.


def resolve(name: str) -> str:
    """Preset name -> hub id; anything else (hub id or folder) unchanged."""
    return PRESETS.get(name.lower(), name)


def attn_implementation(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)


def model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM


def load_processor(name: str, trust_remote_code: bool = False):
    """(processor or None, tokenizer). Multimodal models get their processor; text LMs only a tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    path = resolve(name)
    config = load_config(path, trust_remote_code)
    if hasattr(config, "vision_config"):
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        return processor, processor.tokenizer
    return None, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(name: str, dtype: str = "bf16", device="cpu", attn: str = "auto", trust_remote_code: bool = False):
    """A full model on `device`, our forward entry points attached."""
    path = resolve(name)
    config = load_config(path, trust_remote_code)
    if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise ValueError(f"{path}: no .safetensors weights (pickled .bin/.pt weights are not loaded)")
    model, info = model_class(config).from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation(attn), trust_remote_code=trust_remote_code,
        use_safetensors=True, output_loading_info=True)
    missing, mismatched = info.get("missing_keys", []), info.get("mismatched_keys", [])
    if missing or mismatched:  # transformers would fill these with random values and only log a warning
        raise ValueError(f"{path}: the weights do not match its config: {len(missing)} missing (e.g. "
                         f"{sorted(missing)[:3]}), {len(mismatched)} of another shape (e.g. {list(mismatched)[:2]})")
    return forward.attach(model.to(device))


def build_meta(name: str, dtype: str = "fp32", attn: str = "auto", trust_remote_code: bool = False):
    """The architecture on the meta device (no memory), to be sharded and then filled from rank 0."""
    config = load_config(name, trust_remote_code)
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=DTYPES[dtype], attn_implementation=attn_implementation(attn),
                                                trust_remote_code=trust_remote_code)
    return forward.attach(model)


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Ids that end a response: the tokenizer's eos, the generation config's, and ChatML's <|im_end|>."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(model_config, "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def banned_token_ids(tokenizer) -> list[int]:
    """Vision special tokens the policy must never emit (a sampled <|image_pad|> breaks the re-forward)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)


def special_token_ids(tokenizer) -> set[int]:
    """Ids that `decode(..., skip_special_tokens=True)` would drop: every added token marked special (the Rust
    tokenizer's own test, which also covers tokens added with `add_tokens(..., special_tokens=True)` that
    `all_special_ids` does not list) plus `all_special_ids` (eos, pad, ...)."""
    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    return ids | set(tokenizer.all_special_ids)


def response_drop_ids(tokenizer) -> frozenset[int]:
    """The special ids a response loses on decode: all of special_token_ids except the format tags, which the
    graders must see even when the tokenizer made them special tokens."""
    vocab = tokenizer.get_vocab()
    keep = {vocab[t] for t in FORMAT_TAGS if t in vocab}
    return frozenset(special_token_ids(tokenizer) - keep)


def control_strings(tokenizer) -> frozenset[str]:
    """The text of every special token of `tokenizer` (special_token_ids) that is not a format tag (`<|im_start|>`,
    `<|image_pad|>`, `<|endoftext|>`, ...): strings that data text must not contain, because the tokenizer turns
    them into control tokens (fake turns, image slots without an image). Added tokens that are not special (plain
    vocabulary such as whitespace runs) and blank strings are left out."""
    texts = {tokenizer.convert_ids_to_tokens(i) for i in special_token_ids(tokenizer)}
    return frozenset(t for t in texts if isinstance(t, str) and t.strip() and t not in FORMAT_TAGS)


def decode_response(tokenizer, token_ids, drop_ids: frozenset[int] | None = None, prefill: str = "") -> str:
    """A response's text as graded: `prefill` (the chat template's generation-prompt prefill, see
    prompts.generation_prefill) followed by the decoded `token_ids` with the special tokens in `drop_ids`
    (default: response_drop_ids(tokenizer): eos, pad, <|im_end|>, ...) removed and every other token kept, the
    format tags included. Both engines decode through this function."""
    drop = response_drop_ids(tokenizer) if drop_ids is None else drop_ids
    return prefill + tokenizer.decode([t for t in token_ids if t not in drop], skip_special_tokens=False)


def num_params(model, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        text, _, _ = forward.parts(model)
        n -= text.embed_tokens.weight.numel()
    return n


def _flop_terms(model) -> tuple[int, int, int]:
    """(weights of the decoder blocks, weights of lm_head, L x d of the attention term) for model_flops."""
    text, _, head = forward.parts(model)
    cfg = text.config
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return sum(p.numel() for p in text.layers.parameters()), head.weight.numel(), cfg.num_hidden_layers * d_attn


def flops_per_token(model, seq_len: float, passes: int = 3) -> float:
    """Matmul FLOPs for one text token that also computes logits, over `passes` forward-pass equivalents:
    passes * (2 N + 4 L d S). Units: FLOPs (not FLOP/s) per token. A step's total, where only some positions compute
    logits, is model_flops (what sft.py, grpo.py and bench/gpu_mfu.py use).

    passes: 3 = forward + backward (the backward costs two forwards), 1 = a no-grad scoring pass. Activation recompute
    is not counted: MFU counts model FLOPs, not hardware FLOPs (PaLM's definition).
    N: the weights every text token is multiplied by, i.e. the decoder blocks plus lm_head (counted even when tied to
    the embedding table, whose lookup is free). The vision tower runs on patches, not text tokens, and is left out,
    so MFU on image rows is a lower bound. 2 N = one multiply-add per weight.
    4 L d S: QK^T and AV against S attended positions in each of L layers, d = heads x head_dim, counted in full as
    PaLM does (a causal mask needs about half). seq_len S: the attended length (for packed rows, the token-weighted
    mean segment length). Norms, rotary, softmax and the loss are not counted.
    With passes=3 this is 6 N + 12 L d S. Sources: Kaplan et al. 2020, "Scaling Laws for Neural Language Models"
    (arXiv 2001.08361) sec. 2.1 for 6 N; Chowdhery et al. 2022, "PaLM" (arXiv 2204.02311) appendix B for the
    attention term and the MFU definition."""
    blocks, head, ld = _flop_terms(model)
    return passes * (2 * (blocks + head) + 4 * ld * seq_len)


def model_flops(model, tokens: int, seq_len: float, logit_rows: int, passes: int = 3) -> float:
    """Matmul FLOPs of `passes` forward-pass equivalents over `tokens` text tokens of which only `logit_rows` go
    through lm_head: passes * (tokens * (2 N_blocks + 4 L d S) + logit_rows * 2 N_head), terms as in flops_per_token.
    Our forward computes logits only at the positions that predict a target (common.forward.token_logprobs: SFT's
    loss tokens, GRPO's response tokens), so counting the head for every token over-counts MFU (about 10-15 % for
    SmolLM2-135M, whose 28 M-weight head is a fifth of N). Raises ValueError unless 0 <= logit_rows <= tokens."""
    if not 0 <= logit_rows <= tokens:
        raise ValueError(f"logit_rows {logit_rows} is not within 0..tokens ({tokens})")
    blocks, head, ld = _flop_terms(model)
    return passes * (tokens * (2 * blocks + 4 * ld * seq_len) + logit_rows * 2 * head)


def read_meta(folder: str) -> dict:
    """meta.json written next to our exports (stage, step, user_config); {} for foreign folders."""
    path = os.path.join(resolve(folder), "meta.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}
