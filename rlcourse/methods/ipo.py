"""IPO (Azar et al. 2023, lesson 06): a squared distance to a target margin instead of DPO's log-sigmoid.

The loss lives in ``rlcourse.losses.dpo`` (``ipo_loss``). TRL 1.16 runs IPO as ``DPOTrainer`` with
``loss_type="ipo"``, so the batches and the two forwards are DPO's (``rlcourse.methods.dpo``); what differs is the
loss, on per-token *averaged* log-ratios with the target 1/(2β), which is why IPO also reads the completions' lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import PairBatch
from rlcourse.losses.dpo import ipo_loss
from rlcourse.methods.dpo import (batches, dpo_config_kwargs, pair_metrics,  # noqa: F401 (batches: the interface)
                                  policy_and_reference, trl_classes)


@dataclass(frozen=True)
class Settings:
    """IPO's one option; TRL's name in brackets (``DPOConfig`` with ``loss_type="ipo"``)."""

    beta: float = 0.1
    """β [``beta``]: the paper's τ; the loss is smallest at the per-token margin 1/(2β)."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")


def ipo_step(model, batch: PairBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One IPO step: the loss, and DPOTrainer's metrics with the per-token margin h the target is about."""
    p = policy_and_reference(model, batch)
    loss = ipo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.chosen_len, p.rejected_len, settings.beta)
    return loss, pair_metrics(p, settings.beta)


def step_fn(settings: Settings = Settings()):
    """``ipo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(ipo_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``DPOConfig`` options that make TRL's run match ours: ``loss_type="ipo"``, β, and DPO's (truncation, the
    reference recomputed every step, no weighting, dropout off)."""
    return dpo_config_kwargs(settings.beta, "ipo", 0.0, max_length)
