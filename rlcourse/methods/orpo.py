"""ORPO (Hong et al. 2024, lesson 08): SFT's NLL plus an odds-ratio preference term, no reference model.

The loss lives in ``rlcourse.losses.orpo``. Data and forward are CPO's (``rlcourse.methods.cpo``: TRL's ORPOTrainer
tokenises as CPOTrainer, EOS appended). As TRL's, the NLL term covers prompt *and* completion tokens of the chosen
sequence (the paper's covers the completion only; see ``rlcourse.losses.orpo``), and the odds ratio uses per-token
averages of the log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import PairBatch
from rlcourse.logprobs import masked_mean, to_model_device
from rlcourse.losses.orpo import log_odds, odds_ratio_loss, orpo_loss
from rlcourse.losses.sft import sft_loss
from rlcourse.methods.cpo import batches, pair_forward, reference_free_metrics  # noqa: F401 (batches: the interface)


@dataclass(frozen=True)
class Settings:
    """ORPO's one option; TRL calls λ ``beta`` (``ORPOConfig.beta``, default 0.1)."""

    lambda_: float = 0.1
    """λ: weight of the odds-ratio term against the NLL term (the paper's λ, TRL's ``beta``)."""

    def __post_init__(self):
        if self.lambda_ <= 0:
            raise ValueError(f"lambda_={self.lambda_} must be positive (0 is plain SFT: use rlcourse.methods.sft)")


def trl_classes():
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer, ORPOConfig


def orpo_step(model, batch: PairBatch, settings: Settings = Settings()) -> tuple[torch.Tensor, dict]:
    """One ORPO step: L = NLL + λ·L_OR, and the metrics ORPOTrainer logs.

    ``log_odds_ratio`` is TRL's name for mean log σ(log odds_w − log odds_l) (= −L_OR, a log-*sigmoid*, not the
    log odds ratio); ``log_odds_chosen`` is the mean log odds ratio itself. ``or_loss`` is L_OR (ours, added).
    """
    out = pair_forward(model, to_model_device(model, batch.sequences), prompt_tokens=True)
    chosen, rejected = masked_mean(out["logps"], out["mask"]).chunk(2)  # (B,) per-token average log π_θ(y|x)
    nll = sft_loss(torch.cat([out["prompt_logps"], out["logps"].chunk(2)[0]], dim=1),  # prompt + completion
                   torch.cat([out["prompt_mask"], out["mask"].chunk(2)[0]], dim=1))  # tokens, as TRL
    loss = orpo_loss(chosen, rejected, nll, settings.lambda_)
    with torch.no_grad():
        or_loss = odds_ratio_loss(chosen, rejected)  # (B,)
        metrics = reference_free_metrics(chosen, rejected, settings.lambda_, out)
        metrics |= {"nll_loss": nll.detach(), "or_loss": or_loss.mean(), "log_odds_ratio": -or_loss.mean(),
                    "log_odds_chosen": (log_odds(chosen.float()) - log_odds(rejected.float())).mean()}
    return loss, metrics


def step_fn(settings: Settings = Settings()):
    """``orpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(orpo_step, settings=settings)


def trl_kwargs(settings: Settings, max_length: int | None) -> dict:
    """The ``ORPOConfig`` options that make TRL's run match ours: λ (TRL's ``beta``), ``max_length``, no dropout."""
    return dict(beta=settings.lambda_, max_length=max_length, disable_dropout=True)
