"""The prompt the model sees, byte for byte (RECIPE §3), and its length in tokens: the one place that builds it.

    text = prompts.prompt_text(processor, tokenizer, item)           # generation prompt (rollouts, eval, pass counts)
    full = prompts.prompt_text(processor, tokenizer, item, target)   # closed conversation (SFT)
    n = prompts.prompt_tokens(processor, tokenizer, item)            # its length, image tokens included

The instruction is a Python *raw* string upstream, so its `\\n` is a literal backslash followed by `n` (181
characters in all), not a newline. Images come before the text in the single user turn and there is no system
message, so the Qwen chat template adds its default system turn. `processor` is None for a text-only model; an
item is anything with `question`, `options` and `images` (common.data.Item).
"""

import os

INSTRUCTION = (
    r"You will solve a problem/request. You should provide your thoughts within <think> </think> tags before "
    r"providing the answer.\nWrite your final answer within <answer> </answer> tags."
)


def user_text(question: str, options: dict[str, str]) -> str:
    """The user turn's text: instruction, question, then each option as `\\n\\n{L}. {text}` in dict order."""
    text = f"{INSTRUCTION}\n\nQuestion: {question}\n\nOptions:"
    return text + "".join(f"\n\n{letter}. {option}" for letter, option in options.items())


def sft_target(reasoning: str, answer_label: str) -> str:
    """The assistant turn SFT trains on (RECIPE §3.3): spaces inside the tags, the letter only in <answer>."""
    return f"<think> {reasoning.strip()} </think>\n<answer> {answer_label.strip()} </answer>"


def messages(question: str, options: dict[str, str], n_images: int, multimodal: bool) -> list[dict]:
    """One user turn. Multimodal templates (Qwen2.5-VL) take a list of parts, images first; text-only ones a string."""
    text = user_text(question, options)
    if not multimodal:
        if n_images:
            raise ValueError(f"a text-only model cannot take {n_images} image(s)")
        return [{"role": "user", "content": text}]
    parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def render(template_owner, msgs: list[dict], assistant: str | None = None) -> str:
    """Chat-template text: with the generation prompt when `assistant` is None, else the closed conversation."""
    if assistant is None:
        return template_owner.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    content = assistant if isinstance(msgs[0]["content"], str) else [{"type": "text", "text": assistant}]
    full = msgs + [{"role": "assistant", "content": content}]
    return template_owner.apply_chat_template(full, tokenize=False, add_generation_prompt=False)


def prompt_text(processor, tokenizer, item, target: str | None = None) -> str:
    """The exact text the model is given for `item`: the single user turn (one image placeholder per image) through
    the chat template of the processor (vision-language) or the tokenizer (text-only), generation prompt included.
    With `target` (the assistant turn, see sft_target) the closed conversation instead. Raises ValueError for an
    item with images when `processor` is None."""
    multimodal = processor is not None
    owner = processor if multimodal else tokenizer
    return render(owner, messages(item.question, item.options, len(item.images), multimodal), target)


def generation_prefill(template_owner) -> str:
    """What the chat template's generation prompt adds after the assistant header, i.e. text the model continues
    from but did not write: '' for Qwen2.5-VL (RECIPE §3.2: "There is no `<think>` prefill"), '<think>\\n' for a
    template whose generation prompt is `<|im_start|>assistant\\n<think>\\n`. The engines prepend it to each
    response, so the graders see `<think>...` as the model's turn reads.

    Found by rendering one dummy user turn twice, with the generation prompt and closed by an assistant turn holding
    a sentinel: the header is what the two have in common, the prefill the rest of the generation prompt. A template
    that writes the same prefill into every assistant turn it renders reads as a header, so such a prefill is not
    found (and that template would also put it into SFT targets). An owner without a chat template gives ''."""
    if not getattr(template_owner, "chat_template", None):
        return ""
    multimodal = hasattr(template_owner, "image_processor")
    msgs = messages("2+2?", {"A": "4", "B": "5"}, 0, multimodal)
    gen = render(template_owner, msgs)
    full = render(template_owner, msgs, "\u2603sentinel")
    n = len(os.path.commonprefix([gen, full]))
    return gen[n:]


def image_tokens(processor, images) -> int:
    """`<|image_pad|>` tokens the processor expands `images` (PIL) into, all together: per image, its grid of 14-pixel
    patches after the processor's own resize (sides to multiples of 28, min/max_pixels) over merge_size**2 (2x2
    patches make one token; at Qwen2.5-VL's defaults a 1024x1024 image gives 1,369). 0 without images."""
    if not images:
        return 0
    ip = processor.image_processor
    return sum(ip.get_number_of_image_patches(im.height, im.width, {}) // ip.merge_size**2 for im in images)


def prompt_tokens(processor, tokenizer, item, target: str | None = None) -> int:
    """Length in tokens of prompt_text(processor, tokenizer, item, target) as the model receives it: the text's
    tokens (no special tokens added) with each image's one placeholder expanded to image_tokens. Only the images'
    sizes are read."""
    text = prompt_text(processor, tokenizer, item, target)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return n + image_tokens(processor, item.images) - len(item.images)
