"""BCO: alignment as binary classification of the implicit reward, with a running reward shift (lesson 09).

Jung, Han, Nam & On 2024, "Binary Classifier Optimization for Large Language Model Alignment" (arXiv:2404.04656).
Train a logistic classifier whose logit is DPO's implicit reward r_θ(x, y) = β log π_θ(y|x)/π_ref(y|x), shifted by
δ: desirable completions are class 1, undesirable ones class 0,

    L_BCO = −E_{desirable}[ log σ(r_θ(x, y) − δ) ] − E_{undesirable}[ log σ(−(r_θ(x, y) − δ)) ].

The paper shows this binary cross-entropy upper-bounds the DPO loss on pairs, and that the bound is tighter with the
*reward shift* δ set to the average reward, which it tracks as a moving average over training (``RewardShift``).

The ladder step from KTO (same unpaired data, same implicit reward): the saturating 1 − σ(·) becomes the
log-likelihood −log σ(·), and KTO's reference point z₀ (a KL estimate from mismatched pairs) becomes δ (the running
mean of the rewards themselves); no mismatched forward pass is needed.

How it relates to TRL 1.16, which has no BCO trainer (README pitfall 7):

- ``DPOConfig(loss_type="bco_pair")`` computes, per *pair*, −log σ(βρ_w) − log σ(−βρ_l) and averages over pairs:
  ``bco_pair_loss`` with δ = 0. TRL 1.16 **dropped the reward shift** that older TRL versions kept in
  ``bco_pair`` (a ``RunningMoments`` of the batch-mean rewards): its δ is always 0.
- On the same 2B rows, ``bco_pair_loss`` = 2 × ``bco_loss``: the pair loss sums two terms per pair, the unpaired loss
  averages one term per example (as the removed ``BCOTrainer`` did with ``nanmean``).
- ``RewardShift`` follows the removed ``BCOTrainer``: before each loss, update the running mean with every reward of
  the batch (detached), then use the updated mean as δ. It is a cumulative mean over all rewards seen (each reward
  weighs the same), which is what TRL's ``RunningMoments`` computed, not an exponential moving average.
- Not reproduced: *underlying distribution matching* (UDM), proposed in the paper's first version (v1, 2024) and
  implemented by the removed ``BCOTrainer``: undesirable examples re-weighted by a density ratio from a classifier
  on prompt embeddings. The later version (ACL 2025) keeps the reward shift as the technique that tightens the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlcourse.losses._validate import same_shape_1d


@dataclass
class RewardShift:
    """The running reward shift δ of BCO: the mean of every implicit reward seen so far (TRL's old ``RunningMoments``).

    mean: δ, the current running mean (0 before any update). count: how many rewards it averages.
    """

    mean: float = 0.0
    count: int = 0

    @torch.no_grad()
    def update(self, rewards: torch.Tensor) -> float:
        """Fold a batch's rewards (any shape, e.g. (B,) or chosen and rejected concatenated) into δ; return the new δ."""
        n = rewards.numel()
        if n == 0:
            return self.mean
        batch_mean = rewards.detach().double().mean().item()
        self.count += n
        self.mean += (batch_mean - self.mean) * n / self.count
        return self.mean


def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.1,
    delta: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """L_BCO = mean_B −log σ(±(β log π_θ(y|x)/π_ref(y|x) − δ)), + for desirable y, − for undesirable   (Jung et al. 2024).

    policy_logps, ref_logps: (B,) log π_θ(y|x), log π_ref(y|x) summed over completion tokens.
    labels: (B,) bool, True where y is desirable. beta: β. delta: δ, the reward shift (``RewardShift.mean``; no
    gradient flows through it). Returns a scalar, the mean over the B examples.
    """
    same_shape_1d(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if labels.dtype != torch.bool:
        raise TypeError(f"labels has dtype {labels.dtype}; it must be bool (True = desirable). Fix: labels.bool().")
    rewards = beta * (policy_logps - ref_logps)  # (B,) r_θ(x, y)
    sign = labels.to(rewards.dtype) * 2 - 1  # (B,) +1 desirable, −1 undesirable
    delta = torch.as_tensor(delta, dtype=rewards.dtype).detach()
    return -F.logsigmoid(sign * (rewards - delta)).mean()


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    delta: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """BCO on pairs: mean_B [ −log σ(r_w − δ) − log σ(−(r_l − δ)) ], r = β log π_θ/π_ref   (TRL ``loss_type="bco_pair"``).

    Each pair gives one desirable and one undesirable example; their two BCO terms are added. With δ = 0 this is
    TRL 1.16's ``DPOTrainer(loss_type="bco_pair")`` exactly; with ``delta=RewardShift.mean`` the paper's BCO.
    policy_*_logps, ref_*_logps: (B,) summed completion log-probs as in ``dpo_loss``. beta: β. delta: δ.
    Returns a scalar.
    """
    same_shape_1d(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,) r_w
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,) r_l
    delta = torch.as_tensor(delta, dtype=chosen_rewards.dtype).detach()
    return (-F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))).mean()
