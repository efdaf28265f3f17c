"""RLOO's losses (lesson 11), as a ladder: each function adds one idea to the one before.

1. ``reinforce_loss``: REINFORCE (Williams 1992): push up log π(y|x) in proportion to an advantage A.
2. ``rloo_advantages``: RLOO's baseline, the mean reward of the *other* G-1 samples of the same prompt
   (Kool et al. 2019; Ahmadian et al. 2024).
3. RLOO's KL brake, a sequence-level penalty β·Σ_t (log π_θ − log π_ref) taken off the reward before the
   baseline (k1 summed over tokens): ``rlcourse.kl.kl_penalized_rewards`` (lesson 10), used as is.
4. ``reinforce_pp_advantages``: REINFORCE++'s global normalisation of the advantages over the whole batch
   (Hu 2025), TRL's ``normalize_advantages=True``.
5. ``rloo_loss``: the loss TRL's RLOOTrainer minimises: REINFORCE with a PPO-style clipped *sequence* ratio.
   With one update per batch (old log-probs = current ones, detached) its gradient is REINFORCE's.

GRPO's rungs (group-relative advantages, a per-token clipped loss) are in ``rlcourse.losses.grpo``.

Shapes (course/notation.md): N = B·G completions in a step, laid out prompt by prompt (row iG + k is prompt
i's k-th sample); C completion tokens after right padding. Per-token tensors here are (N, C) and cover
completion tokens only, as TRL's are.

Departures from the papers, TRL 1.16's choices (so the parity tests can hold us to TRL): RLOO's importance
ratio is over the *summed* sequence log-prob; REINFORCE++'s std is the unbiased one and gets +1e-4.
"""

from __future__ import annotations

import torch


def reinforce_loss(seq_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE: L = −(1/N) Σ_i A_i log π_θ(y_i | x_i)   (Williams 1992, Eq. 11, as a loss to minimise).

    seq_logps: (N,) summed completion log-probs log π_θ(y_i|x_i), with gradient; advantages: (N,) A_i,
    treated as constants. Returns a scalar whose gradient is the policy-gradient estimate.
    """
    return -(advantages.detach() * seq_logps).mean()


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Leave-one-out advantage: A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j within each prompt's group.

    Kool, van Hoof, Welling 2019 ("Buy 4 REINFORCE samples, get a baseline for free!"); Ahmadian et al.
    2024, Eq. 6. rewards: (B·G,) laid out prompt by prompt; num_generations: G ≥ 2. Returns (B·G,).
    The baseline of sample i never sees r_i, so it adds no bias; the advantages of a group sum to zero.
    """
    if num_generations < 2:
        raise ValueError(f"RLOO needs num_generations >= 2 (got {num_generations}): the baseline is the others' mean")
    grouped = rewards.view(-1, num_generations)  # (B, G)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)  # (B, G)
    return (grouped - baseline).view(-1)  # (B·G,)


def reinforce_pp_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE++'s global normalisation: (A − mean(A)) / (std(A) + 1e-4) over the whole batch.

    Hu 2025, "REINFORCE++", Sec. 3 (advantage normalisation across the global batch instead of per
    prompt). advantages: (N,). Returns (N,), with zero mean and (almost) unit std; std is unbiased, as TRL's.
    """
    return (advantages - advantages.mean()) / (advantages.std() + 1e-4)


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, clip_eps_high: float | None = None) -> torch.Tensor:
    """RLOO as TRL's RLOOTrainer optimises it: a clipped *sequence*-level surrogate, averaged over sequences.

        ρ_i = exp(log π_θ(y_i|x) − log π_θ_old(y_i|x)),   L = −(1/N) Σ_i min(ρ_i A_i, clip(ρ_i, 1−ε, 1+ε_high) A_i)

    (Ahmadian et al. 2024 use the plain REINFORCE loss; the clip is TRL's, for reusing a batch.)
    logps: (N, C) per-token log π_θ with gradient; old_logps: (N, C) of the sampling policy; advantages:
    (N,) A; mask: (N, C) m; clip_eps: ε; clip_eps_high: ε_high (None: ε). Returns a scalar.
    With old_logps = logps.detach(), ρ = 1 and the gradient equals ``reinforce_loss``'s.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    seq = (logps * mask).sum(-1)  # (N,)
    old_seq = (old_logps * mask).sum(-1)  # (N,)
    ratio = torch.exp(seq - old_seq)  # (N,)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    return -torch.min(ratio * advantages, clipped * advantages).mean()
