"""Lesson 09's unpaired data: preference pairs turned into labelled single completions, and label noise.

- ``unpaired_rows``: preference pairs → (prompt, completion, label, score) rows, shuffled with a seed. TRL's
  ``unpair`` puts every chosen row before every rejected one; walked in order, a run would see only desirable
  rows for half an epoch, so both our run and TRL's get the same shuffled rows (TRL keeps an unpaired dataset as it
  is). ``score`` is the gold score of the row's completion (the pair's ``score_chosen`` or ``score_rejected``):
  DRO's scalar reward.
- ``flip_pairs``: swap chosen and rejected in a seeded fraction of the pairs (the label-noise experiment). Unpairing
  a swapped pair flips both of its labels, so DPO and KTO see the same noise.
"""

from __future__ import annotations

import random

from .convert import unpair


def flip_pairs(pairs, fraction: float, seed: int = 0) -> list[dict]:
    """The preference rows with chosen and rejected swapped in ``round(fraction·n)`` rows chosen with ``seed``.

    Scores travel with their completions, so a flipped row's ``score_chosen`` is the lower one: the gold metric
    still knows which completion is better; only the label is wrong. Each row gets ``flipped`` (bool).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: the share of labels to flip must lie in [0, 1]")
    rows = [dict(r) for r in pairs]
    flipped = set(random.Random(seed).sample(range(len(rows)), round(fraction * len(rows))))
    for i, row in enumerate(rows):
        row["flipped"] = i in flipped
        if i in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            if "score_chosen" in row and "score_rejected" in row:
                row["score_chosen"], row["score_rejected"] = row["score_rejected"], row["score_chosen"]
    return rows


def unpaired_rows(pairs, seed: int = 0) -> list[dict]:
    """Preference rows → shuffled (prompt, completion, label[, score]) rows, two per pair (see the module docstring)."""
    rows = unpair(pairs)
    for row in rows:
        if "score_chosen" in row and "score_rejected" in row:
            row["score"] = row["score_chosen"] if row["label"] else row["score_rejected"]
        for key in ("score_chosen", "score_rejected"):
            row.pop(key, None)
    random.Random(seed).shuffle(rows)
    return rows
