"""GRPO (Shao et al. 2024, lesson 12): group-relative advantages and a clipped per-token loss, on rollouts.

The losses live in ``rlcourse.losses.grpo``; the batches are ``rlcourse.methods.rollouts.Rollouts`` (G completions per
prompt, scored). The step below is what TRL 1.16's ``GRPOTrainer`` computes with ``num_iterations=1``:

    logp   = log π_θ(completion tokens)  (N, C), with gradient
    ref    = log π_ref(...) with the adapters off, only when beta != 0
    A      = grpo_advantages(r)                           # (r − group mean) / (group std + 1e-4)
    loss   = grpo_loss(logp, logp.detach(), A, mask, ref, ...)   # plus β·k3 when beta != 0
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.batches import RolloutBatch
from rlcourse.kl import kl_k3
from rlcourse.logprobs import masked_token_mean, to_model_device
from rlcourse.losses.off_policy import SAMPLER_IS_MODES, sampler_importance_weights
from rlcourse.losses.grpo import LOSS_TYPES, SCALE_REWARDS, clip_fractions, grpo_advantages, grpo_loss, importance_ratio
from rlcourse.methods.rollouts import RolloutSettings, Rollouts, policy_logprobs, rollout_metrics  # noqa: F401


@dataclass(frozen=True)
class Settings:
    """GRPO's options; the TRL names are in brackets (``GRPOConfig`` fields)."""

    beta: float = 0.0
    """β [``beta``]: weight of the k3 KL term in the loss (TRL's default 0: no term, no reference forward)."""
    clip_eps: float = 0.2
    """ε [``epsilon``]: lower clip of the importance ratio."""
    clip_eps_high: float | None = None
    """ε_high [``epsilon_high``]: upper clip (None means ε). DAPO's clip-higher uses 0.28."""
    loss_type: str = "dapo"
    """[``loss_type``]: "grpo", "bnpo", "dr_grpo" or "dapo" (TRL's default), see ``losses.grpo.aggregate_loss``."""
    importance_sampling_level: str = "token"
    """[``importance_sampling_level``]: "token" (GRPO) or "sequence" (GSPO)."""
    scale_rewards: str = "group"
    """[``scale_rewards``]: divide the centred rewards by the group's std ("group"), the batch's ("batch") or not
    ("none")."""
    kl_bias_correction: bool = True
    """[``use_bias_correction_kl``]: multiply the k3 term by the importance ratio (TRL's default True)."""
    sampler_correction: str | None = None
    """[``vllm_importance_sampling_mode``, on when set]: weight each token's loss by π_θ_old / π_sampler, truncated
    or masked (``losses.off_policy``): "token_truncate", "token_mask", "sequence_truncate", "sequence_mask" (TRL's
    default with vLLM). None: no correction, the gap is only logged (the course's sampler is the policy merged, so
    the gap is rounding; TRL's own trainer without vLLM samples from the policy itself)."""
    sampler_clip_min: float | None = None
    """[``vllm_importance_sampling_clip_min``]: lower bound of the sampler weights (None: none)."""
    sampler_clip_max: float | None = 3.0
    """[``vllm_importance_sampling_clip_max``]: upper bound of the sampler weights (TRL's default 3)."""

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; choose one of {SCALE_REWARDS}")
        if self.sampler_correction is not None and self.sampler_correction not in SAMPLER_IS_MODES:
            raise ValueError(f"sampler_correction={self.sampler_correction!r}; choose None or one of "
                             f"{SAMPLER_IS_MODES}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}; choose 'token' or "
                             "'sequence'")


def trl_classes():
    from trl import GRPOConfig, GRPOTrainer

    return GRPOTrainer, GRPOConfig


batches = Rollouts
"""The online methods' batches: sampled and scored by ``rlcourse.methods.rollouts.Rollouts``."""


def advantages(batch: RolloutBatch, settings: Settings, rollout: RolloutSettings) -> torch.Tensor:
    """GRPO's group-relative advantages of a scored batch, (N,)."""
    return grpo_advantages(batch.rewards, rollout.num_generations, settings.scale_rewards)


def grpo_step(model, batch: RolloutBatch, settings: Settings, rollout: RolloutSettings) -> tuple[torch.Tensor, dict]:
    """One GRPO step's loss on a scored batch, and the metrics TRL logs under the same names."""
    batch = to_model_device(model, batch)
    mask = batch.completion_mask.float()  # (N, C)
    logps, entropy, ref_logps, ref_seconds = policy_logprobs(model, batch, rollout.sampling.temperature,
                                                             settings.beta, rollout.num_generations)
    old_logps = logps.detach()  # one update per batch: π_θ_old = π_θ
    adv = advantages(batch, settings, rollout)
    weights = None
    if settings.sampler_correction is not None and batch.sampler_logps is not None:
        weights = sampler_importance_weights(old_logps, batch.sampler_logps, mask, settings.sampler_correction,
                                             settings.sampler_clip_min, settings.sampler_clip_max)
    loss = grpo_loss(logps, old_logps, adv, mask, ref_logps, settings.beta, settings.clip_eps, settings.clip_eps_high,
                     settings.importance_sampling_level, settings.loss_type, rollout.sampling.max_new_tokens,
                     kl_bias_correction=settings.kl_bias_correction, sampler_weights=weights)
    ratio = importance_ratio(logps.detach(), old_logps, mask, settings.importance_sampling_level)
    clip = clip_fractions(ratio, adv, mask, settings.clip_eps, settings.clip_eps_high)
    metrics = {f"clip_ratio/{k}": v for k, v in clip.items()}
    if settings.beta != 0.0:
        metrics["kl_token"] = masked_token_mean(kl_k3(old_logps, ref_logps), mask)
    return loss, metrics | rollout_metrics(batch, rollout.num_generations, adv, entropy, old_logps, weights,
                                           ref_seconds)


def step_fn(settings: Settings, rollout: RolloutSettings):
    """``grpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(grpo_step, settings=settings, rollout=rollout)


def trl_kwargs(settings: Settings) -> dict:
    """The ``GRPOConfig`` options of the loss, set explicitly whatever TRL's defaults (the rollouts' options are
    ``rollouts.trl_kwargs``; ``rollouts.trl_online_config`` joins the two)."""
    return dict(beta=settings.beta, epsilon=settings.clip_eps, epsilon_high=settings.clip_eps_high,
                loss_type=settings.loss_type, importance_sampling_level=settings.importance_sampling_level,
                scale_rewards=settings.scale_rewards, use_bias_correction_kl=settings.kl_bias_correction,
                # read only when TRL samples with vLLM (use_vllm=True), as ours is read only with the engine's samples
                vllm_importance_sampling_correction=settings.sampler_correction is not None,
                vllm_importance_sampling_mode=settings.sampler_correction or "sequence_mask",
                vllm_importance_sampling_clip_min=settings.sampler_clip_min,
                vllm_importance_sampling_clip_max=settings.sampler_clip_max)
