"""Rewards for the learning tests (loaded by grpo.py through --reward tests.toy_rewards:NAME)."""


def image_parity(item, token_ids):
    """Fraction of response tokens whose id parity matches the answer's letter (A -> even, B -> odd).

    On the dark/bright toy set the answer depends only on the image, and a random policy scores 0.5: climbing
    above that is only possible by looking at the image."""
    if not token_ids:
        return 0.0
    want = "ABCDEFGH".index(item.answer_label) % 2
    return sum(t % 2 == want for t in token_ids) / len(token_ids)
