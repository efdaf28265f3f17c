"""How well a reward model ranks held-out pairs: its scores beside the gold scores (lesson 04).

``heldout_eval`` scores the chosen and the rejected completion of each held-out pair with the reward model
(``rlcourse.methods.reward_model.sequence_rewards`` on the pairs as ``RewardTrainer`` builds them) and reports the
share of pairs ranked as the data ranks them (accuracy) and the rank correlation with the task's gold scores
(Spearman ρ over all 2n completions). ``make_probe`` turns it into a probe for our loop and TRL's runs;
``show_pairs`` prints a few pairs with every model's scores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from rlcourse.evaluate import spearman
from rlcourse.batches import collate_reward_pairs
from rlcourse.methods.reward_model import backbone_and_head, sequence_rewards
from rlcourse.tokenization import tokenize_reward_pair


def _autocast(model):
    """bf16 autocast in this machine's bf16 mode (``rlcourse.precision``), and wherever the score head is bf16 (a
    model trained in bf16 mode: TRL or our loop cast the head, README pitfall 2, and it then needs bf16 inputs);
    otherwise fp32, as the model was trained."""
    from rlcourse.precision import current

    _, head = backbone_and_head(model)
    if current().bf16 or any(p.dtype == torch.bfloat16 for p in head.parameters()):
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_pairs(model, tokenizer, rows, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The reward model's scores of the chosen and of the rejected completion of each row: two (n,) arrays."""
    tokenized = [tokenize_reward_pair(tokenizer, row) for row in rows]
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(tokenized), batch_size):
        batch = collate_reward_pairs(tokenized[start:start + batch_size], tokenizer.pad_token_id)
        with _autocast(model):
            r = sequence_rewards(model, batch.input_ids.to(device), batch.attention_mask.to(device)).float()
        c, j = r.cpu().chunk(2)
        chosen.append(c)
        rejected.append(j)
    return torch.cat(chosen).numpy(), torch.cat(rejected).numpy()


@dataclass
class HeldOut:
    """A reward model's scores on held-out pairs, beside their gold scores."""

    chosen: np.ndarray
    """RM score of each pair's chosen completion, (n,)."""
    rejected: np.ndarray
    """RM score of each pair's rejected completion, (n,)."""
    gold_chosen: np.ndarray
    """Gold score of each chosen completion, (n,)."""
    gold_rejected: np.ndarray
    """Gold score of each rejected completion, (n,)."""

    @property
    def accuracy(self) -> float:
        """Share of pairs where the RM scores the chosen completion above the rejected one."""
        return float(np.mean(self.chosen > self.rejected))

    @property
    def spearman(self) -> float:
        """Rank correlation between RM score and gold score over all 2n held-out completions."""
        return spearman(np.concatenate([self.chosen, self.rejected]),
                        np.concatenate([self.gold_chosen, self.gold_rejected]))

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "spearman": self.spearman, "n_pairs": len(self.chosen),
                "mean_margin": float(np.mean(self.chosen - self.rejected))}

    def __str__(self) -> str:
        return (f"held-out accuracy {self.accuracy:.3f}, Spearman ρ(RM, gold) {self.spearman:+.3f} "
                f"on {len(self.chosen)} pairs")


def heldout_eval(model, tokenizer, rows, batch_size: int = 16) -> HeldOut:
    """Score the chosen and rejected completions of ``rows`` (with ``score_chosen``/``score_rejected``)."""
    rows = list(rows)
    chosen, rejected = score_pairs(model, tokenizer, rows, batch_size)
    return HeldOut(chosen, rejected, np.array([r["score_chosen"] for r in rows], dtype=float),
                   np.array([r["score_rejected"] for r in rows], dtype=float))


def make_probe(tokenizer, rows, batch_size: int = 16):
    """model -> {"eval_accuracy", "eval_spearman"} on held-out pairs: for ``train``'s and TRL's probes."""
    rows = list(rows)

    def probe(model) -> dict:
        res = heldout_eval(model, tokenizer, rows, batch_size)
        return {"eval_accuracy": res.accuracy, "eval_spearman": res.spearman}

    return probe


def show_pairs(rows, results: dict[str, HeldOut], k: int = 3, width: int = 160) -> None:
    """Print the first ``k`` held-out pairs: each completion with its gold score and every model's RM score."""
    import textwrap

    from rlcourse.tasks.base import message_text

    rows = list(rows)
    for i in range(min(k, len(rows))):
        print(f"── prompt: {message_text(rows[i]['prompt'])}")
        for side in ("chosen", "rejected"):
            scores = "  ".join(f"{name} {getattr(res, side)[i]:+.2f}" for name, res in results.items())
            gold = rows[i][f"score_{side}"]
            text = textwrap.shorten(message_text(rows[i][side]).replace("\n", " "), width=width, placeholder=" …")
            print(f"   {side:>8} gold {gold:.2f} | RM: {scores}\n            {text}")
