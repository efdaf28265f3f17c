"""KTO: alignment from unpaired desirable / undesirable completions (lesson 09).

Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv:2402.01306). Each example is one (x, y) with a binary label, not a pair. With the implicit reward
r_θ(x, y) = log π_θ(y|x)/π_ref(y|x) (DPO's, without β) and a reference point z₀, the Kahneman–Tversky value is

    v(x, y) = λ_D σ(β(r_θ(x, y) − z₀))   if y is desirable
              λ_U σ(β(z₀ − r_θ(x, y)))   if y is undesirable
    L_KTO = E_{x,y}[ λ_y − v(x, y) ]                                           (§4.1, Eq. 7 as TRL cites it)

so each example costs λ_y (1 − σ(·)): a desirable completion is pushed above the reference point, an undesirable
one below it, and both saturate (the gradient vanishes as |r − z₀| grows), unlike DPO's log-sigmoid.

z₀ = KL(π_θ(y'|x) ‖ π_ref(y'|x)) is the policy's expected reward. The paper estimates it without sampling, from
*mismatched* pairs: inside a batch, pair each prompt x_i with another example's completion y_j and average
log π_θ(y_j|x_i)/π_ref(y_j|x_i) (``rlcourse.batches.mismatched_completions`` builds the pairs, ``kto_reference_point`` the estimate).

The ladder step from DPO: the rejected completion of the same prompt, DPO's reference for y_w, is replaced by a
batch-level reference point z₀; that is what lets the data be unpaired.

Departures, to match TRL 1.16's ``KTOTrainer`` (``loss_type="kto"``):

- z₀ is the batch mean of the mismatched log-ratios, **detached** (no gradient through it) and **clamped at 0**
  (a KL is ≥ 0, the estimate may not be). The clamp is the paper's max(0, ·); the stop-gradient is TRL's (whether
  the paper's final version also stops it was not checked offline). The authors' early code (HALOs, January 2024,
  their issue #4) back-propagated through the KL term and estimated it, for each label, from the examples of the
  other label. Under several processes TRL also averages z₀ across them.
- TRL builds the mismatched pairs by rotating completions by one *within each batch* of the dataset (of size
  ``per_device_train_batch_size``, so the data order must be sequential): x_i is paired with y_{i−1}, x_1 with y_B.
- The loss is the plain mean over the B examples of λ_y(1 − σ(·)) (TRL concatenates the weighted desirable and
  undesirable losses and takes ``nanmean``), not a mean per label: a batch with more desirable examples weighs
  them more. The paper's advice on λ_D, λ_U (λ_D n_D / (λ_U n_U) ∈ [1, 4/3]) is only a warning in TRL.
- Rewards are sums of completion-token log-probs (``masked_sum``), as in DPO.
- ``loss_type="apo_zero_unpaired"`` in TRL is this loss with z₀ = 0 (and no KL pass): ``kto_loss`` with
  ``reference_point=0``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from rlcourse.losses._validate import same_shape_1d


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """ẑ₀ = max(0, mean_i [log π_θ(y'_i|x_i) − log π_ref(y'_i|x_i)]), with no gradient   (KTO's KL estimate).

    policy_kl_logps, ref_kl_logps: (B,) summed completion log-probs of the *mismatched* pairs (x_i, y'_i)
    (``rlcourse.batches.mismatched_completions``) under π_θ and π_ref. Returns a scalar ≥ 0, detached.
    """
    same_shape_1d(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """L_KTO = mean_B λ_y (1 − σ(±β(r_θ(x, y) − z₀))), + for desirable y, − for undesirable   (Ethayarajh et al. 2024).

    policy_logps, ref_logps: (B,) log π_θ(y|x), log π_ref(y|x) summed over completion tokens.
    labels: (B,) bool, True where y is desirable. reference_point: z₀, a scalar (``kto_reference_point``; 0 gives
    TRL's ``apo_zero_unpaired``); no gradient flows through it, whatever is passed. beta: β. desirable_weight, undesirable_weight: λ_D, λ_U (λ_U > λ_D is loss
    aversion). Returns a scalar.
    """
    same_shape_1d(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if labels.dtype != torch.bool:
        raise TypeError(f"labels has dtype {labels.dtype}; it must be bool (True = desirable). Fix: labels.bool().")
    rewards = policy_logps - ref_logps  # (B,) r_θ(x, y)
    sign = labels.to(rewards.dtype) * 2 - 1  # (B,) +1 desirable, −1 undesirable
    weights = torch.where(labels, desirable_weight, undesirable_weight).to(rewards.dtype)  # (B,) λ_y
    z0 = torch.as_tensor(reference_point, dtype=rewards.dtype).detach()
    return (weights * (1 - F.sigmoid(sign * beta * (rewards - z0)))).mean()
