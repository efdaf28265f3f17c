"""SimPO (Meng et al. 2024, lesson 07): a reference-free margin on length-averaged log-probs.

The loss lives in ``rlcourse.losses.cpo``. TRL 1.16 runs SimPO as ``CPOTrainer`` with ``loss_type="simpo"``, so the
data and the forward are CPO's (``rlcourse.methods.cpo``: EOS appended, one policy forward); what differs is the
loss, on per-token *averaged* log-probs with a target margin γ, and the NLL term, off in the paper (α = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import PairBatch
from rlcourse.logprobs import masked_sum, to_model_device
from rlcourse.losses.cpo import simpo_loss
from rlcourse.methods.cpo import (batches, chosen_nll, pair_forward,  # noqa: F401 (batches: the interface)
                                  reference_free_metrics, trl_classes)


@dataclass(frozen=True)
class Settings:
    """SimPO's options; the TRL names are in brackets (``CPOConfig`` fields, with ``loss_type="simpo"``)."""

    beta: float = 0.1
    """β [``beta``]: scales the averaged log-prob margin (the paper uses 2.0–10)."""
    gamma: float = 0.5
    """γ [``simpo_gamma``]: the target reward margin."""
    cpo_alpha: float = 0.0
    """α [``cpo_alpha``]: weight of an NLL term on the chosen completions; 0 is the paper's SimPO (TRL's default 1)."""
    label_smoothing: float = 0.0
    """ε [``label_smoothing``]: conservative smoothing of the preference term (TRL's addition; 0: the paper)."""

    def __post_init__(self):
        if self.beta <= 0 or self.cpo_alpha < 0:
            raise ValueError(f"beta={self.beta} must be positive and cpo_alpha={self.cpo_alpha} non-negative")


def simpo_step(model, batch: PairBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One SimPO step: the loss and the metrics CPOTrainer logs, on per-token averages of the log-probs."""
    out = pair_forward(model, to_model_device(model, batch.sequences))
    chosen, rejected = masked_sum(out["logps"], out["mask"]).chunk(2)  # (B,), (B,) summed log π_θ(y|x)
    len_w, len_l = out["mask"].sum(-1).chunk(2)  # (B,), (B,) completion tokens
    nll = chosen_nll(out, settings.cpo_alpha)
    loss = simpo_loss(chosen, rejected, len_w, len_l, settings.beta, settings.gamma,
                      settings.label_smoothing) + settings.cpo_alpha * nll
    metrics = reference_free_metrics(chosen / len_w, rejected / len_l, settings.beta, out)  # per-token averages
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def step_fn(settings: Settings = Settings()):
    """``simpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(simpo_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``CPOConfig`` options that make TRL's run match ours: ``loss_type="simpo"``, β, γ, α, ε; AlphaPO's reward
    shaping off (``alpha=0``); the same ``max_length``; dropout off."""
    return dict(loss_type="simpo", beta=settings.beta, simpo_gamma=settings.gamma, cpo_alpha=settings.cpo_alpha,
                label_smoothing=settings.label_smoothing, alpha=0.0, max_length=max_length, disable_dropout=True)
