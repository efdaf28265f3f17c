"""Reward-model losses: Bradley–Terry, its margin variant (Llama 2) and the centering term.

A reward model r(x, y) maps a prompt and a completion to one number. It is trained on pairs: for a prompt
x, a chosen completion y_w and a rejected one y_l. The Bradley–Terry model of paired comparisons says

    P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)),

and the loss is the negative log-likelihood of the observed preferences under it. Three functions, each
adding one idea to the previous one:

- ``bradley_terry_loss``: −log σ(r_w − r_l), averaged over the pairs (Ouyang et al. 2022, Eq. 1).
- ``margin_loss``: the same with a per-pair margin m subtracted inside the sigmoid, so that a pair
  known to be far apart must be separated by at least about m (Touvron et al. 2023, Llama 2, Eq. 2).
- ``center_rewards_loss``: an auxiliary penalty on (r_w + r_l)², which pins the rewards near zero mean
  (Eisenstein et al. 2023, "Helping or Herding?", the auxiliary loss that TRL cites as its Eq. 2).

``reward_model_loss`` combines them exactly as TRL 1.16's ``RewardTrainer.compute_loss`` does.

Departures from the papers, all TRL's:
- InstructGPT's Eq. 1 averages over all K(K−1)/2 pairs of K ranked completions of one prompt; here every
  prompt has one pair, so the average is over the B pairs of the batch.
- Llama 2's margin m(r) is a small discrete value per rating gap ("significantly better" etc.). TRL takes
  any real number from the dataset's ``margin`` column; the course makes it from the gold-score gap.
- The centering term is averaged over the pairs, and its coefficient η is TRL's
  ``center_rewards_coefficient`` (TRL recommends 0.01).

Shapes: B = number of pairs; every reward tensor is (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """L_BT = −(1/B) Σ_i log σ(r(x_i, y_w,i) − r(x_i, y_l,i)).

    Bradley & Terry (1952), as the reward-model loss of Ouyang et al. 2022, "Training language models to
    follow instructions with human feedback", Eq. 1 (with one pair per prompt).

    chosen_rewards: (B,) r(x, y_w), the scores of the chosen completions.
    rejected_rewards: (B,) r(x, y_l), the scores of the rejected completions.
    Returns a scalar. It is log 2 when the two scores are equal, and it depends only on their difference:
    adding a constant to every reward changes nothing (the scale of r is not identified).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def margin_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """L_margin = −(1/B) Σ_i log σ(r(x_i, y_w,i) − r(x_i, y_l,i) − m_i).

    Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Eq. 2. One term more than
    ``bradley_terry_loss``: the margin m_i. A pair stops pulling hard only once r_w − r_l exceeds m_i, so
    pairs with a large known gap are pushed further apart than pairs that were nearly tied.

    chosen_rewards, rejected_rewards: (B,) as in ``bradley_terry_loss``.
    margin: (B,) m, TRL's ``margin`` dataset column (0 everywhere gives ``bradley_terry_loss``).
    Returns a scalar.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def center_rewards_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """L_center = (1/B) Σ_i (r(x_i, y_w,i) + r(x_i, y_l,i))².

    Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking", the auxiliary loss (Eq. 2 as TRL's ``RewardConfig`` cites it). The Bradley–Terry loss cannot
    see a constant added to every reward; this term picks the constant that puts each pair's mean at zero,
    so rewards of different models (or runs) sit on a comparable scale.

    chosen_rewards, rejected_rewards: (B,). Returns a scalar, ≥ 0, which does not depend on r_w − r_l.
    """
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """L = L_BT (or L_margin when ``margin`` is given) + η · L_center (when η is given).

    What TRL 1.16's ``RewardTrainer.compute_loss`` computes.

    chosen_rewards, rejected_rewards: (B,) r(x, y_w) and r(x, y_l).
    margin: (B,) m, or None for no margin column.
    center_rewards_coefficient: η, TRL's ``center_rewards_coefficient``; None switches the term off.
    Returns a scalar.
    """
    if margin is None:
        loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
    else:
        loss = margin_loss(chosen_rewards, rejected_rewards, margin)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * center_rewards_loss(chosen_rewards, rejected_rewards)
    return loss
