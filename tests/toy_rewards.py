"""Rewards for the learning tests (loaded by grpo.py through --reward tests.toy_rewards:NAME)."""


def image_parity(item, token_ids):
    """Fraction of response tokens whose id parity matches the answer's letter (A -> even, B -> odd).

    On the dark/bright toy set the answer depends only on the image, and a random policy scores 0.5: climbing
    above that is only possible by looking at the image."""
    if not token_ids:
        return 0.0
    want = "ABCDEFGH".index(item.answer_label) % 2
    return sum(t % 2 == want for t in token_ids) / len(token_ids)


_calls = [0]


def unscorable(item, token_ids):
    """Cycles None, NaN, 1.0, 0.0 over calls: a reward function that cannot score half the samples (grpo.py must
    leave those out of the loss and of their groups' statistics, and count them)."""
    _calls[0] += 1
    return [None, float("nan"), 1.0, 0.0][(_calls[0] - 1) % 4]


def flat_unless_index_mod3(item, token_ids):
    """image_parity on rows whose dataset_index is a multiple of 3, a constant 0.5 on the others: two of three groups
    carry no gradient, so a dynamic-sampling step needs refills to fill its batch with informative groups."""
    return image_parity(item, token_ids) if item.dataset_index % 3 == 0 else 0.5
