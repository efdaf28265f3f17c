"""GRPO's losses (lesson 12): the rungs the policy-gradient ladder of ``rlcourse.losses.rloo`` adds.

6. ``grpo_advantages``: GRPO's group-relative advantage, (r − mean_group) / (std_group + 1e-4), with the
   scale options ``"group"`` (GRPO), ``"batch"`` and ``"none"`` (Dr. GRPO).
7. ``grpo_loss``: GRPO's clipped *per-token* surrogate with a k3 KL term (Shao et al. 2024, Eq. 3), plus
   the variants TRL exposes: clip-higher (``clip_eps_high``, DAPO), GSPO's sequence-level importance ratio
   (``importance_ratio``), and the four loss aggregations ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo``
   (``aggregate_loss``). ``clip_fractions`` measures how often the clip switched a token off.

Shapes (course/notation.md): N = B·G completions in a step, laid out prompt by prompt (row iG + k is prompt
i's k-th sample); C completion tokens after right padding. Per-token tensors here are (N, C) and cover
completion tokens only, as TRL's are.

Departures from the papers, all of them TRL 1.16's choices (so the parity tests can hold us to TRL):
- the group std is the unbiased one (Bessel's correction) and gets +1e-4, not a tiny ε;
- GRPO's KL term is k3 (lesson 10's ``rlcourse.kl.kl_loss_term``) and, by default, is multiplied by the
  importance ratio (``kl_bias_correction``, DeepSeek-V3.2), which changes its gradient even at ratio 1;
- GSPO's ratio is over the *mean* token log-ratio of a sequence;
- ``dapo`` divides by the tokens of the whole generation batch (``num_items``); with one generation
  batch per optimizer step and no accumulation, as in this course, that equals ``bnpo``.
"""

from __future__ import annotations

import torch

from rlcourse.kl import kl_loss_term

SCALE_REWARDS = ("group", "batch", "none")
"""What GRPO divides the centred rewards by: the group's std, the whole batch's std, or nothing."""

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""How GRPO aggregates per-token losses into one number (see ``aggregate_loss``)."""


def grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-relative advantage: Â_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4).

    Shao et al. 2024 (DeepSeekMath), Sec. 4.1.2 (outcome supervision). rewards: (B·G,) prompt by prompt;
    num_generations: G. scale_rewards: "group" divides by each group's std (GRPO), "batch" by the std of all
    B·G rewards, "none" not at all (Dr. GRPO, Liu et al. 2025, Sec. 3.1). Returns (B·G,). Every group's
    advantages have zero mean; a group whose rewards are all equal gets zero advantages (no signal).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; choose one of {SCALE_REWARDS}")
    grouped = rewards.view(-1, num_generations)  # (B, G)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)  # (B·G,)
    if scale_rewards == "group":
        std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)  # (B·G,)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)  # (B·G,)
    else:
        return centred
    return centred / (std + 1e-4)


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """ρ = π_θ / π_θ_old per token (GRPO, "token": (N, C)) or per sequence (GSPO, "sequence": (N, 1)).

    GSPO (Zheng et al. 2025, Eq. 7) uses the length-normalised sequence ratio
    s_i = exp((1/|y_i|) Σ_t (log π_θ − log π_θ_old)), the same for every token of y_i.
    logps: (N, C) with gradient; old_logps: (N, C); mask: (N, C).
    """
    log_ratio = logps - old_logps  # (N, C)
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        mean = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (N,)
        return torch.exp(mean).unsqueeze(-1)  # (N, 1)
    raise ValueError(f"importance_sampling_level={level!r}; choose 'token' or 'sequence'")


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
                   max_completion_length: int | None = None, num_items: torch.Tensor | float | None = None
                   ) -> torch.Tensor:
    """Reduce per-token losses (N, C) to a scalar, the four ways TRL's ``loss_type`` names.

    - "grpo": mean over sequences of each sequence's token mean (Shao et al. 2024, Eq. 3): a token of a short
      completion weighs more, the length bias Dr. GRPO points out;
    - "bnpo": mean over all completion tokens of the batch;
    - "dr_grpo": sum over tokens / (N · max_completion_length): a constant, so the length does not rescale
      any sequence (Liu et al. 2025, Eq. 4);
    - "dapo": sum over tokens / tokens of the whole generation batch (``num_items``; default: this batch's),
      DAPO's token-level loss (Yu et al. 2025, Eq. 8).
    """
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' divides by max_completion_length: pass it")
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        return (per_token_loss * mask).sum() / n.clamp(min=1.0)
    raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, importance_sampling_level: str = "token",
              loss_type: str = "dapo", max_completion_length: int | None = None,
              num_items: torch.Tensor | float | None = None, kl_bias_correction: bool = True,
              sampler_weights: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's objective as a loss (Shao et al. 2024, Eq. 3), with TRL's variants:

        ℓ_{i,t} = −min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε_high) Â_i) + β·D_{i,t},
        D_{i,t} = k3(π_θ, π_ref) at token t (× ρ_{i,t} when ``kl_bias_correction``),

    then reduced by ``aggregate_loss(loss_type)``. ρ is per token, or GSPO's per-sequence ratio
    (``importance_sampling_level="sequence"``). TRL's defaults are beta=0 (no KL term, no reference
    forward) and loss_type="dapo"; the GRPO paper has β=0.04 and the "grpo" aggregation.

    logps: (N, C) per-token log π_θ with gradient; old_logps: (N, C) log π_θ_old (= logps.detach() with one
    update per batch); advantages: (N,) Â; mask: (N, C) m; ref_logps: (N, C) log π_ref, needed when beta ≠ 0;
    beta: β; clip_eps: ε (TRL ``epsilon``); clip_eps_high: ε_high (TRL ``epsilon_high``, None: ε);
    importance_sampling_level: "token" | "sequence"; loss_type: see ``aggregate_loss``;
    max_completion_length: for "dr_grpo"; num_items: for "dapo"; sampler_weights: (N, C) or (N, 1) importance
    weights of the rollouts' sampler (``losses.off_policy.sampler_importance_weights``), multiplying the policy
    term as TRL's ``vllm_importance_sampling_correction`` does (None: no correction). Returns a scalar.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = importance_ratio(logps, old_logps, mask, importance_sampling_level)  # (N, C) or (N, 1)
    adv = advantages.unsqueeze(-1)  # (N, 1)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (N, C) or (N, 1)
    if sampler_weights is not None:
        per_token = per_token * sampler_weights  # (N, C) or (N, 1)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps, the reference policy's per-token log-probs")
        kl = kl_loss_term(logps, ref_logps, beta, ratio=ratio if kl_bias_correction else None)  # (N, C), lesson 10
        per_token = per_token + kl
    per_token = per_token.expand_as(mask)  # (N, C): a sequence-level term applies to each of its tokens
    return aggregate_loss(per_token, mask, loss_type, max_completion_length, num_items)


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
                   clip_eps_high: float | None = None) -> dict[str, torch.Tensor]:
    """Share of completion tokens whose term the clip switched off, as TRL logs them (``clip_ratio/*``).

    low: ρ < 1−ε with Â < 0; high: ρ > 1+ε_high with Â > 0; region: either. ratio: (N, C) or (N, 1);
    advantages: (N,); mask: (N, C). Token means over the mask (sequence means for a (N, 1) ratio); 0 at ρ = 1.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages.unsqueeze(-1)  # (N, 1)
    low = ((ratio < 1 - clip_eps) & (adv < 0)).float()  # (N, C) or (N, 1)
    high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    if ratio.size(-1) == 1:  # one ratio per sequence (GSPO): a mean over sequences, as TRL logs it
        return {"low_mean": low.mean(), "high_mean": high.mean(), "region_mean": torch.maximum(low, high).mean()}
    n = mask.sum().clamp(min=1.0)
    return {"low_mean": (low * mask).sum() / n, "high_mean": (high * mask).sum() / n,
            "region_mean": (torch.maximum(low, high) * mask).sum() / n}
