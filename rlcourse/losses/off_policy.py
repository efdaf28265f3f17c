"""The sampler/policy gap: rollouts drawn by one copy of the weights (vLLM, or the course's merged sampler,
``rlcourse.rollout_engine``) and trained on by another (the 4-bit + LoRA policy) are slightly off-policy.

TRL's GRPO weights each token's loss by how much more (or less) likely the trained policy finds it than the sampler
did, truncated or masked so a rare large ratio cannot blow a step up (``vllm_importance_sampling_correction``):

    w = π_θ_old(y) / π_sampler(y),  per token ("token_*") or per sequence (product over its tokens, "sequence_*")
    *_truncate: w clipped to [clip_min, clip_max];  *_mask: w set to 0 outside [clip_min, clip_max]

TRL's default is "sequence_mask" with clip_max 3 (GRPOConfig ``vllm_importance_sampling_mode``,
``vllm_importance_sampling_clip_max``, ``vllm_importance_sampling_clip_min``).
"""

from __future__ import annotations

import math

import torch

SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_importance_weights(policy_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                               mode: str = "sequence_mask", clip_min: float | None = None,
                               clip_max: float | None = 3.0) -> torch.Tensor:
    """TRL's truncated (or masked) importance weights of sampled tokens: (N, C) for "token_*" modes, (N, 1) for
    "sequence_*". policy_logps: (N, C) log π_θ_old, no gradient; sampler_logps: (N, C) the sampler's log-probs of
    the same tokens; mask: (N, C). A token with no sampler log-prob (NaN) gets weight 1, as in TRL."""
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {SAMPLER_IS_MODES}")
    diff = torch.nan_to_num((policy_logps - sampler_logps) * mask, nan=0.0)  # (N, C)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # (N, 1): log of the product of the token ratios
    weights = diff.exp()
    if mode.endswith("truncate"):
        return weights.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return weights.masked_fill((weights < low) | (weights > high), 0.0)


def sampler_gap_metrics(policy_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                        weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """|log π_policy − log π_sampler| per completion token (mean, max), under TRL's names; and the importance
    weights' min / mean / max when a correction applies (over tokens, or sequences for a (N, 1) weight)."""
    gap = (policy_logps - sampler_logps).abs()[mask.bool()]
    gap = gap[~torch.isnan(gap)]
    zero = policy_logps.new_zeros(())
    metrics = {"sampling/sampling_logp_difference/mean": gap.mean() if gap.numel() else zero,
               "sampling/sampling_logp_difference/max": gap.max() if gap.numel() else zero}
    if weights is not None:
        flat = weights.flatten() if weights.size(-1) == 1 else weights[mask.bool()]
        for name, fn in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
            metrics[f"sampling/importance_sampling_ratio/{name}"] = fn(flat) if flat.numel() else zero
    return metrics
