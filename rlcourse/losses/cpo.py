"""Reference-free preference losses: CPO and SimPO (lesson 07).

Both drop DPO's reference model. DPO's margin is β[(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) −
log π_ref(y_l|x))]; set the two reference terms to zero (a uniform reference, the β → 0 view in the CPO paper) and
the margin becomes β[log π_θ(y_w|x) − log π_θ(y_l|x)]. A ladder of small diffs from ``dpo_loss``:

- ``cpo_loss``: Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
  Machine Translation" (arXiv:2401.08417). The reference-free sigmoid term (the paper's Eq. 3, which TRL's comment
  cites) plus a behaviour-cloning NLL term on the chosen completion: L_CPO = L_prefer + L_NLL. Without a reference
  model nothing anchors the policy, so the NLL term keeps π_θ(y_w|x) from drifting down with π_θ(y_l|x).
- ``simpo_loss``: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
  (arXiv:2405.14734). The diff from CPO's sigmoid term: each log-prob is divided by its completion's length
  (the reward of Eq. 4 is the *average* per-token log-prob, times β), and a target margin γ is subtracted
  (Eq. 6), so the pair must be separated by at least γ before the loss flattens. No NLL term.

Departures from the papers, all to match TRL 1.16's ``trl.experimental.cpo.CPOTrainer``:

- CPO's NLL term is a *token mean* over all chosen completion tokens of the batch (``nn.CrossEntropyLoss`` with
  prompt labels masked), i.e. ``rlcourse.losses.sft_loss`` on the chosen half; the paper writes −E[log π_θ(y_w|x)],
  a per-sequence *sum*. The two differ by the completion length, so TRL's NLL is ~|y_w| times smaller than the
  paper's and the preference term weighs relatively more. It is weighted by ``cpo_alpha`` (TRL's name; the paper's
  weight is 1), and TRL skips computing it (uses 0) when ``cpo_alpha == 0``.
- ``label_smoothing`` ε (conservative, cDPO-style: −(1−ε) log σ(z) − ε log σ(−z)) is a TRL addition to both losses,
  absent from both papers; 0 by default gives the papers' losses.
- SimPO in TRL is ``CPOTrainer(loss_type="simpo")``; it still adds ``cpo_alpha`` × NLL, so the paper's SimPO needs
  ``cpo_alpha=0`` (TRL's default is 1.0). TRL computes the logits as β·((r̄_w − r̄_l) − γ/β); we write the paper's
  β(r̄_w − r̄_l) − γ, equal up to float rounding.
- TRL's ``alpha`` (AlphaPO reward shaping) and its ``"hinge"``/``"ipo"`` loss types are not reproduced here.
- Each loss returns the mean over the B pairs (plus α·NLL for CPO), a scalar, as TRL's trainer reduces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcourse.logprobs import masked_mean
from rlcourse.losses._validate import positive_lengths, same_shape_1d


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z), per pair. ε = 0 gives the plain Bradley–Terry loss −log σ(z). (B,) -> (B,)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5): it is the probability that a "
                         "preference label is flipped (0 turns smoothing off)")
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor | None = None,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """CPO: L = −E[log σ(β log π_θ(y_w|x) − β log π_θ(y_l|x))] + α·L_NLL   (Xu et al. 2024, Eq. 3 plus the NLL term).

    The diff from ``dpo_loss``: no reference log-probs (they are set to 0), and a behaviour-cloning term on the
    chosen completions, weighted by α (``cpo_alpha``). With ``cpo_alpha=0`` this is DPO with π_ref ≡ 1.

    policy_chosen_logps, policy_rejected_logps: (B,) log π_θ(y_w|x), log π_θ(y_l|x), *summed* over completion
    tokens (``rlcourse.logprobs.masked_sum``), as TRL's ``loss_type="sigmoid"`` uses them.
    nll_loss: scalar L_NLL, the token-mean NLL of the chosen completions (``rlcourse.losses.sft_loss`` on the chosen
    half of the batch, as TRL computes it); may be None only when ``cpo_alpha == 0``.
    beta: β, the temperature of the preference term. cpo_alpha: α, the weight of the NLL term.
    label_smoothing: ε, TRL's conservative smoothing (0 = the paper's loss).
    Returns a scalar.
    """
    same_shape_1d(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    logits = beta * (policy_chosen_logps - policy_rejected_logps)  # (B,)
    loss = _smoothed_sigmoid_loss(logits, label_smoothing).mean()
    if cpo_alpha == 0:
        return loss
    if nll_loss is None:
        raise ValueError(f"cpo_alpha={cpo_alpha} needs nll_loss, the token-mean NLL of the chosen completions. Fix: "
                         "pass nll_loss=sft_loss(chosen_logps, chosen_mask), or set cpo_alpha=0.")
    if nll_loss.dim() != 0:
        raise ValueError(f"nll_loss has shape {tuple(nll_loss.shape)} but must be a scalar: the NLL averaged over all "
                         "chosen completion tokens of the batch (rlcourse.losses.sft_loss).")
    return loss + cpo_alpha * nll_loss


def simpo_reward(logps: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """SimPO's reference-free reward r_SimPO(x, y) = (β/|y|) Σ_t log π_θ(y_t | x, y_<t)   (Meng et al. 2024, Eq. 4).

    The length-normalised (average per-token) log-likelihood, scaled by β: the quantity the model ranks candidates
    by when it generates, so training and inference agree. A completion does not gain reward by being longer.
    logps: (B, T) per-token log π_θ; mask: (B, T), 1 on completion tokens. Returns (B,).
    """
    return beta * masked_mean(logps, mask)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO: L = −E[log σ( (β/|y_w|) log π_θ(y_w|x) − (β/|y_l|) log π_θ(y_l|x) − γ )]   (Meng et al. 2024, Eq. 6).

    The diff from ``cpo_loss`` (with ``cpo_alpha=0``): each summed log-prob is divided by its completion length, and
    the target reward margin γ is subtracted inside the sigmoid.

    policy_chosen_logps, policy_rejected_logps: (B,) log π_θ(y|x) *summed* over completion tokens.
    chosen_lengths, rejected_lengths: (B,) completion tokens |y_w|, |y_l| (each ≥ 1); the division gives the per-token
    average that TRL's ``CPOTrainer(loss_type="simpo")`` feeds its loss.
    beta: β, the reward scale (the paper uses 2–10; TRL's default 0.1 is CPO's). gamma: γ, the target margin
    (TRL ``simpo_gamma``). label_smoothing: ε, TRL's addition (0 = the paper's loss). Returns a scalar.
    """
    same_shape_1d(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    positive_lengths("chosen_lengths", chosen_lengths)
    positive_lengths("rejected_lengths", rejected_lengths)
    chosen_avg = policy_chosen_logps / chosen_lengths  # (B,) average per-token log-prob of y_w
    rejected_avg = policy_rejected_logps / rejected_lengths  # (B,)
    logits = beta * (chosen_avg - rejected_avg) - gamma  # (B,)
    return _smoothed_sigmoid_loss(logits, label_smoothing).mean()
