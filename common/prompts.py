"""The recipe's prompt, byte for byte (RECIPE §3): instruction, user text, chat messages and the SFT target.

The instruction is a Python *raw* string upstream, so its `\\n` is a literal backslash followed by `n` (181
characters in all), not a newline. Images come before the text in the single user turn and there is no system
message, so the Qwen chat template adds its default system turn.
"""

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
