"""Reward models: a scalar head on the 4-bit LoRA transformer, trained on preference pairs.

The losses live in ``rlcourse.losses.reward``; this module prepares the pairs the way TRL 1.16's
``RewardTrainer`` does and turns a batch into (loss, metrics) for ``rlcourse.train.train``. Scoring held-out
pairs is ``rlcourse.reward_eval``; the saved model later lessons load is ``rlcourse.reward_artifact``.

What ``RewardTrainer`` does, and so what we do:
- a pair becomes two sequences, prompt + chosen and prompt + rejected, each through the chat template
  (no completion mask: the reward model reads the whole conversation);
- pairs where either sequence is longer than ``max_length`` are *dropped*, not truncated;
- a batch of B pairs is one forward pass over 2B sequences, the B chosen ones first, right-padded;
- a sequence's reward is the score head applied to the hidden state of its last token.

Where we depart from TRL: we read that last token from the attention mask and apply the head to it alone
(``sequence_rewards``); transformers applies the head at every position and then picks the last position
whose token is not the pad token. The two agree on conversational data (SmolLM2's template ends every
conversation with "<|im_end|>\\n", and "\\n" is not the pad token). On plain-text pairs they part: TRL appends
the EOS token, which for SmolLM2 is also the pad token, so transformers reads the token before it, and we read
the EOS itself. Tests check both. We also compute the loss in fp32 on the bf16 rewards, where TRL computes it
in the rewards' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import RewardPairBatch, RewardPairBatches
from rlcourse.logprobs import to_model_device
from rlcourse.losses.reward import reward_model_loss
from rlcourse.tokenization import tokenize_reward_pairs


@dataclass(frozen=True)
class Settings:
    """How the reward model is trained, beyond the profile's steps, batch size and learning rate; TRL's names in
    brackets (``RewardConfig`` fields)."""

    margin_scale: float = 0.0
    """Llama 2's margin: m = margin_scale · (gold score of chosen − gold score of rejected), TRL's ``margin``
    column. 0 means no margin column at all (plain Bradley–Terry)."""
    center_rewards_coefficient: float | None = 0.01
    """η of the centering term η·mean((r_w + r_l)²), TRL's ``center_rewards_coefficient`` (its recommended
    value is 0.01). None switches it off."""
    max_length: int = 1024
    """Pairs with a sequence longer than this many tokens are dropped (TRL's ``max_length``, also 1024)."""


# ── data ─────────────────────────────────────────────────────────────────────────────────────────────


def add_margin(dataset, margin_scale: float):
    """The preference dataset with TRL's ``margin`` column, m = margin_scale · (score_chosen − score_rejected).

    Returns the dataset unchanged when ``margin_scale`` is 0. Raises a ValueError naming the row when a
    gold score is missing or not a number.
    """
    if not margin_scale:
        return dataset
    for i, row in enumerate(dataset):
        for field in ("score_chosen", "score_rejected"):
            if not isinstance(row.get(field), (int, float)):
                raise ValueError(f"row {i}: field {field!r} is {row.get(field)!r}, but a margin needs both gold "
                                 f"scores as numbers. Fix: add them, or set margin_scale=0 (no margin).")
    return dataset.map(lambda r: {"margin": margin_scale * (r["score_chosen"] - r["score_rejected"])})


def trl_classes():
    from trl import RewardConfig, RewardTrainer

    return RewardTrainer, RewardConfig


def batches(rows, tokenizer, batch_size: int, max_length: int | None) -> RewardPairBatches:
    """step -> the ``RewardPairBatch`` of that step's pairs, in order (TRL's sequential sampler); pairs longer than
    ``max_length`` are dropped first, as TRL drops them (``Settings.max_length``: TRL's 1024)."""
    return RewardPairBatches(tokenize_reward_pairs(rows, tokenizer, max_length), batch_size, tokenizer.pad_token_id)


def training_pairs(task, n: int, batch_size: int, seed: int = 0):
    """The pairs both runs train on: the task's train preferences, shuffled with ``seed``, the first
    ``min(n, all)`` rounded down to a multiple of ``batch_size`` (so that both runs wrap round to the same
    pair when a run is longer than an epoch)."""
    rows = task.preferences("train").shuffle(seed=seed)
    n = min(n, len(rows)) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(rows)} training pairs")
    return rows.select(range(n))


# ── the model's scores and the training step ─────────────────────────────────────────────────────────


def backbone_and_head(model):
    """The transformer and the score head of a sequence-classification model (plain or wrapped by peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.score


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) of each right-padded sequence: the score head on the hidden state of its last real token.

    input_ids, attention_mask: (N, T). Returns (N,), in the head's compute dtype (bf16 under autocast).
    """
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
    last = attention_mask.sum(-1) - 1  # (N,): position of the last real token (right padding)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
    return head(last_hidden).squeeze(-1)  # (N, 1) -> (N,)


def reward_step(model, batch: RewardPairBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One step's loss and the metrics ``RewardTrainer`` logs (accuracy, margin, min/mean/max reward)."""
    batch = to_model_device(model, batch)
    rewards = sequence_rewards(model, batch.input_ids, batch.attention_mask).float()  # (2B,)
    chosen, rejected = rewards.chunk(2)  # (B,), (B,)
    loss = reward_model_loss(chosen, rejected, batch.margin, settings.center_rewards_coefficient)
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "mean_reward": rewards.mean(),
            "min_reward": rewards.min(),
            "max_reward": rewards.max(),
        }
    return loss, metrics


def step_fn(settings: Settings = Settings()):
    """``reward_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(reward_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``RewardConfig`` options that make TRL's run match ours: the same drop length and centering term (the
    margin is a dataset column, ``add_margin``)."""
    return dict(max_length=max_length, center_rewards_coefficient=settings.center_rewards_coefficient)
