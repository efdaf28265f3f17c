"""A preference dataset whose labels never vary (lesson 06): the case where IPO's analysis says DPO over-fits."""

from __future__ import annotations

DETERMINISTIC_PAIRS = [
    ("Is the sky blue on a clear day? Answer yes or no.", "Yes.", "No."),
    ("Is fire cold? Answer yes or no.", "No.", "Yes."),
    ("What is 2 + 2? Reply with the number only.", "4", "5"),
    ("What is 3 + 4? Reply with the number only.", "7", "8"),
    ("Name the colour of grass in one word.", "Green.", "Purple."),
    ("Name the largest planet in one word.", "Jupiter.", "Mercury."),
    ("What is the opposite of hot? One word.", "Cold.", "Loud."),
    ("How many legs does a cat have? Reply with the number only.", "4", "3"),
]
"""(question, chosen, rejected): every pair is labelled the same way every time it is seen, so the preference
probability is 1, the case where IPO's analysis says DPO over-fits."""


def deterministic_preferences(n_pairs: int = 8):
    """A conversational preference dataset of ``n_pairs`` short pairs whose label never varies (lesson 06).

    Short completions (one to three tokens) make the per-token margin IPO targets easy to read and the steps fast.
    Training walks it in order and wraps around, so each pair is seen again every ``n_pairs / batch_size`` steps.
    """
    from datasets import Dataset

    if not 1 <= n_pairs <= len(DETERMINISTIC_PAIRS):
        raise ValueError(f"n_pairs={n_pairs}: choose 1..{len(DETERMINISTIC_PAIRS)}")
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for q, c, r in DETERMINISTIC_PAIRS[:n_pairs]
    ])
