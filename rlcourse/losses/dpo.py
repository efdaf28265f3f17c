"""Direct preference losses on sequence log-probs: DPO and the variants TRL 1.16 reaches by ``loss_type``, and IPO.

Every function takes the summed completion log-probs of a batch of B preference pairs, shape (B,) each:
log π_θ(y_w|x), log π_θ(y_l|x) of the policy and log π_ref(y_w|x), log π_ref(y_l|x) of the reference
(``policy_chosen_logps``, ``policy_rejected_logps``, ``ref_chosen_logps``, ``ref_rejected_logps``), plus β
(``beta``). They never see a model.

A ladder of small diffs, each variant one idea away from the one above it:

- ``implicit_reward``: r̂(x, y) = β log π_θ(y|x)/π_ref(y|x), the reward DPO's policy is optimal for.
- ``dpo_sigmoid``: Rafailov et al. 2023, Eq. 7: −log σ(r̂_w − r̂_l), a Bradley–Terry likelihood of the labels.
- ``dpo_cdpo``: conservative DPO (Mitchell 2023): the label is trusted with probability 1−ε (label smoothing).
- ``dpo_robust``: robust DPO, rDPO (Chowdhury et al. 2024): the same two terms, re-weighted to be unbiased under
  flip noise ε, divided by 1−2ε.
- ``dpo_hinge``: the log-sigmoid replaced by a hinge, max(0, 1 − (r̂_w − r̂_l)) (SLiC, Zhao et al. 2023; RSO, Liu et al. 2024).
- ``apo_zero`` / ``apo_down``: anchored preference optimisation (D'Oosterlinck et al. 2024, Eqs. 7–8): separate
  terms for the chosen and the rejected reward, so the update also says which way each should move.
- ``ipo_loss``: IPO (Azar et al. 2023, Eq. 17): a squared loss that pulls the log-ratio margin to a finite target
  1/(2β) instead of pushing it to infinity.

Departures from the papers, all to match TRL 1.16's ``DPOTrainer`` exactly:
- β multiplies the log-ratios (β is IPO's τ): TRL's ``beta`` is the same number for every ``loss_type``.
- ``ipo_loss`` uses *per-token average* log-ratios, each completion's log-ratio divided by its token count.
  The paper writes sequence log-probs; TRL normalises by length (its comment says the IPO authors confirmed this
  is the form behind the paper's results), so β and the target 1/(2β) are in nats per token here.
- cDPO is not a ``loss_type`` of TRL 1.16 (its ``"sigmoid"`` ignores ``label_smoothing``); it is kept because it
  is the one-line step from DPO to robust DPO. Our ``loss_type="cdpo"`` has no TRL counterpart.
- Each loss returns the mean over the B pairs, a scalar, as TRL's trainer reduces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r̂(x, y) = β log π_θ(y|x) / π_ref(y|x)   (Rafailov et al. 2023, Eq. 5 solved for r).

    From the closed-form optimum π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x) of KL-regularised reward
    maximisation, r(x, y) = β log π*(y|x)/π_ref(y|x) + β log Z(x); the β log Z(x) term is the same for every
    completion of x and cancels in a comparison, so it is dropped. This is what TRL logs as ``rewards/chosen``
    and ``rewards/rejected``.

    policy_logps: (B,) log π_θ(y|x) summed over completion tokens; ref_logps: (B,) the same under π_ref;
    beta: β. Returns (B,).
    """
    return beta * (policy_logps - ref_logps)


def dpo_sigmoid(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss −log σ(β(ρ_w − ρ_l)), ρ = log π_θ/π_ref   (Rafailov et al. 2023, Eq. 7).

    chosen_logratios, rejected_logratios: (B,) ρ_w and ρ_l. beta: β. label_smoothing is ignored (as TRL's
    ``"sigmoid"`` ignores it). Returns (B,).
    """
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def dpo_cdpo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Conservative DPO: −(1−ε) log σ(βΔ) − ε log σ(−βΔ), Δ = ρ_w − ρ_l   (Mitchell 2023, "A note on DPO with
    noisy preferences & relationship to IPO").

    The diff from ``dpo_sigmoid``: a second term for the flipped label, weighted by ε (``label_smoothing``), the
    probability that a label is wrong. Its minimum is at a finite margin βΔ = log((1−ε)/ε). Returns (B,).
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_robust(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO: [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)   (Chowdhury et al. 2024, the rDPO loss; TRL ``"robust"``).

    The diff from ``dpo_cdpo``: the flipped-label term is *subtracted*, and the whole is divided by 1−2ε, which
    makes the loss an unbiased estimate of the clean-label DPO loss when each label flips with probability ε
    (``label_smoothing``, in [0, 0.5)). Returns (B,).
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def dpo_hinge(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinge loss max(0, 1 − βΔ)   (SLiC's calibration loss, Zhao et al. 2023, as RSO uses it, Liu et al. 2024; TRL ``"hinge"``).

    The diff from ``dpo_sigmoid``: −log σ(z) becomes max(0, 1 − z), so a pair whose margin βΔ already exceeds 1
    gives no gradient at all. Returns (B,).
    """
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def apo_zero(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """APO-zero: [1 − σ(βρ_w)] + σ(βρ_l)   (D'Oosterlinck et al. 2024, Eq. 7; TRL ``"apo_zero"``).

    The diff from DPO: no difference ρ_w − ρ_l. Each reward is anchored at zero on its own: the chosen one is
    pushed up and the rejected one down. For data whose chosen answers beat what the model already writes.
    Returns (B,).
    """
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """APO-down: σ(βρ_w) + [1 − σ(β(ρ_w − ρ_l))]   (D'Oosterlinck et al. 2024, Eq. 8; TRL ``"apo_down"``).

    The diff from ``apo_zero``: the chosen reward is pushed *down*, and the rejected one down further (through
    the difference). For data whose chosen answers are worse than what the model already writes. Returns (B,).
    """
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


DPO_LOSSES = {
    "sigmoid": dpo_sigmoid,
    "cdpo": dpo_cdpo,
    "robust": dpo_robust,
    "hinge": dpo_hinge,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
}
"""``loss_type`` -> per-pair loss of (ρ_w, ρ_l, β, ε). All but "cdpo" are TRL 1.16 ``DPOConfig.loss_type`` values."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean DPO loss over B pairs (Rafailov et al. 2023, Eq. 7), or one of its variants picked by ``loss_type``:

        L = −E[ log σ( β log π_θ(y_w|x)/π_ref(y_w|x) − β log π_θ(y_l|x)/π_ref(y_l|x) ) ]

    policy_chosen_logps, policy_rejected_logps: (B,) log π_θ(y_w|x), log π_θ(y_l|x), summed over completion tokens.
    ref_chosen_logps, ref_rejected_logps: (B,) the same under π_ref (no gradient needed).
    beta: β, the strength of the pull towards π_ref. loss_type: a key of ``DPO_LOSSES``.
    label_smoothing: ε, the assumed probability that a label is flipped ("cdpo" and "robust" only).
    Returns a scalar.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)} (IPO is `ipo_loss`)")
    if loss_type in ("cdpo", "robust") and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5) for loss_type={loss_type!r}: "
                         "it is the probability that a preference label is flipped")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,) ρ_w
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,) ρ_l
    return DPO_LOSSES[loss_type](chosen_logratios, rejected_logratios, beta, label_smoothing).mean()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Mean IPO loss over B pairs: (h − 1/(2β))², h = ρ̄_w − ρ̄_l   (Azar et al. 2023, Eq. 17, β = the paper's τ).

    The diff from DPO: the log-sigmoid of the margin becomes a squared distance to the target 1/(2β). DPO's
    loss keeps falling as the margin grows, so on pairs whose label never varies it drives the margin to
    infinity (and π_θ(y_l|x) to 0) whatever β is; IPO's loss is smallest at the finite margin 1/(2β).

    ρ̄ is the *per-token average* log-ratio, (log π_θ(y|x) − log π_ref(y|x)) / |y|, as in TRL 1.16 (see the
    module docstring). policy_*_logps, ref_*_logps: (B,) summed completion log-probs as in ``dpo_loss``.
    chosen_lengths, rejected_lengths: (B,) completion tokens |y_w|, |y_l| (clamped at 1). beta: β (τ).
    Returns a scalar.
    """
    chosen_avg = (policy_chosen_logps - ref_chosen_logps) / chosen_lengths.clamp(min=1)  # (B,) ρ̄_w
    rejected_avg = (policy_rejected_logps - ref_rejected_logps) / rejected_lengths.clamp(min=1)  # (B,) ρ̄_l
    return ((chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2).mean()
