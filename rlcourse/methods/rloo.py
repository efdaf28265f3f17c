"""RLOO (Ahmadian et al. 2024, lesson 11): REINFORCE with a leave-one-out baseline, on rollouts.

The losses live in ``rlcourse.losses.rloo``; the batches are ``rlcourse.methods.rollouts.Rollouts`` (G completions per
prompt, scored). The step below is what TRL 1.16's ``RLOOTrainer`` computes with ``num_iterations=1``:

    logp   = log π_θ(completion tokens)  (N, C), with gradient
    ref    = log π_ref(...) with the adapters off, only when beta != 0
    R      = r − β·Σ_t (logp − ref)                 # k1 in the reward (lesson 10), when beta != 0
    A      = rloo_advantages(R)                     # R − mean of the other G−1; REINFORCE++-normalised if asked
    loss   = rloo_loss(logp, logp.detach(), A, mask)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import RolloutBatch
from rlcourse.kl import kl_k1, kl_penalized_rewards
from rlcourse.logprobs import masked_token_mean, to_model_device
from rlcourse.losses.rloo import reinforce_pp_advantages, rloo_advantages, rloo_loss
from rlcourse.methods.rollouts import RolloutSettings, Rollouts, policy_logprobs, rollout_metrics  # noqa: F401


@dataclass(frozen=True)
class Settings:
    """RLOO's options; the TRL names are in brackets (``RLOOConfig`` fields)."""

    beta: float = 0.05
    """β [``beta``]: the k1 KL penalty taken off each completion's reward (TRL's default 0.05)."""
    clip_eps: float = 0.2
    """ε [``epsilon``]: lower clip of the sequence importance ratio."""
    clip_eps_high: float | None = None
    """ε_high [``epsilon_high``]: upper clip (None means ε)."""
    normalize_advantages: bool = False
    """[``normalize_advantages``]: REINFORCE++'s global normalisation of the advantages (TRL's default False)."""

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: a KL penalty needs beta >= 0")


def trl_classes():
    from trl import RLOOConfig, RLOOTrainer

    return RLOOTrainer, RLOOConfig


batches = Rollouts
"""The online methods' batches: sampled and scored by ``rlcourse.methods.rollouts.Rollouts``."""


def advantages(batch: RolloutBatch, settings: Settings, rollout: RolloutSettings, logps: torch.Tensor | None = None,
               ref_logps: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO's leave-one-out advantages of a scored batch, (N,): on the KL-penalised reward when beta ≠ 0 (then
    ``logps`` and ``ref_logps``, (N, C), are needed), then REINFORCE++-normalised if asked."""
    rewards = batch.rewards
    if settings.beta != 0.0:
        rewards = kl_penalized_rewards(rewards, logps, ref_logps, batch.completion_mask.float(), settings.beta,
                                       estimator="k1")
    adv = rloo_advantages(rewards, rollout.num_generations)
    return reinforce_pp_advantages(adv) if settings.normalize_advantages else adv


def rloo_step(model, batch: RolloutBatch, settings: Settings, rollout: RolloutSettings) -> tuple[torch.Tensor, dict]:
    """One RLOO step's loss on a scored batch, and the metrics TRL logs under the same names."""
    batch = to_model_device(model, batch)
    mask = batch.completion_mask.float()  # (N, C)
    logps, entropy, ref_logps, ref_seconds = policy_logprobs(model, batch, rollout.sampling.temperature,
                                                             settings.beta, rollout.num_generations)
    old_logps = logps.detach()  # one update per batch: π_θ_old = π_θ
    adv = advantages(batch, settings, rollout, old_logps, ref_logps)
    loss = rloo_loss(logps, old_logps, adv, mask, settings.clip_eps, settings.clip_eps_high)
    metrics = {}
    if settings.beta != 0.0:
        metrics["kl_token"] = masked_token_mean(kl_k1(old_logps, ref_logps), mask)
    return loss, metrics | rollout_metrics(batch, rollout.num_generations, adv, entropy, old_logps,
                                           reference_seconds=ref_seconds)


def step_fn(settings: Settings, rollout: RolloutSettings):
    """``rloo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(rloo_step, settings=settings, rollout=rollout)


def trl_kwargs(settings: Settings) -> dict:
    """The ``RLOOConfig`` options of the loss, set explicitly whatever TRL's defaults (the rollouts' options are
    ``rollouts.trl_kwargs``; ``rollouts.trl_online_config`` joins the two)."""
    return dict(beta=settings.beta, epsilon=settings.clip_eps, epsilon_high=settings.clip_eps_high,
                normalize_advantages=settings.normalize_advantages)
