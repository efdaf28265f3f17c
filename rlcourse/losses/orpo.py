"""ORPO: supervised fine-tuning plus an odds-ratio penalty, in one stage and without a reference model (lesson 08).

Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model" (arXiv:2403.07691).
The ladder step from SFT: keep the NLL of the chosen completion and add λ times a term that pushes the *odds* of the
chosen completion above the odds of the rejected one:

    odds_θ(y|x) = P_θ(y|x) / (1 − P_θ(y|x))                                   (Eq. 4)
    L_OR = −log σ( log [odds_θ(y_w|x) / odds_θ(y_l|x)] )                       (Eq. 7)
    L_ORPO = E[ L_SFT + λ · L_OR ]                                              (Eq. 6)

P_θ(y|x) is the length-normalised likelihood exp((1/|y|) Σ_t log π_θ(y_t|x, y_<t)), so log P_θ is the per-token
average log-prob (``rlcourse.logprobs.masked_mean``), and log odds = log P − log(1 − P). The odds ratio is 1 (its log
0, L_OR = log 2) when chosen and rejected are equally likely, whatever that likelihood is.

Departures from the paper, to match TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``:

- TRL's NLL term is computed over the **whole chosen sequence, prompt and completion** (every token with attention
  mask 1, a token mean over the batch; its comment: "orpo chosen nll loss is computed over the full prompt and
  response"), while the odds ratio uses completion tokens only. The paper's L_SFT is the usual NLL of the response.
  ``orpo_loss`` takes the NLL as an argument, so the caller chooses: ``sft_loss`` with the attention mask reproduces
  TRL, with the completion mask the paper.
- TRL's λ is ``ORPOConfig.beta`` (default 0.1); here it is ``lambda_``.
- TRL computes log(1 − P) with a numerically stable ``log1mexp``; ``log_odds`` below does the same (two branches at
  log P = −log 2), so it stays finite for log P near 0 and for very negative log P.
- TRL adds the weighted term as ``nll − mean(λ·log σ(·))``; ``orpo_loss`` returns the same scalar.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlcourse.losses._validate import nonpositive, same_shape_1d


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, stable at both ends: log(−expm1(x)) near 0, log1p(−eˣ) for x < −log 2. Same shape as x."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(logps: torch.Tensor) -> torch.Tensor:
    """log odds_θ(y|x) = log P − log(1 − P), P = exp(logps)   (Hong et al. 2024, Eq. 4, in log space).

    logps: (B,) log P_θ(y|x), the *average* per-token log-prob of each completion (≤ 0, and < 0 for a finite result:
    a completion of probability 1 has infinite odds). Returns (B,).
    """
    return logps - log1mexp(logps)


def odds_ratio_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> torch.Tensor:
    """L_OR = −log σ( log odds_θ(y_w|x) − log odds_θ(y_l|x) ) per pair   (Hong et al. 2024, Eq. 7).

    policy_chosen_logps, policy_rejected_logps: (B,) average per-token log-probs (≤ 0). Returns (B,). Equals log 2
    when the two completions are equally likely; falls towards 0 as the chosen one's odds pull ahead.
    """
    same_shape_1d(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    nonpositive("policy_chosen_logps", policy_chosen_logps)
    nonpositive("policy_rejected_logps", policy_rejected_logps)
    chosen = policy_chosen_logps.float()  # (B,) TRL upcasts: log1mexp in bf16 loses the small differences
    rejected = policy_rejected_logps.float()
    return -F.logsigmoid(log_odds(chosen) - log_odds(rejected))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor,
    lambda_: float = 0.1,
) -> torch.Tensor:
    """L_ORPO = L_SFT + λ · mean_B L_OR   (Hong et al. 2024, Eq. 6).

    The diff from ``sft_loss``: one added term, λ times the odds-ratio loss of each pair (``odds_ratio_loss``).
    There is no reference model: the SFT term keeps the policy near the data, the odds-ratio term separates chosen
    from rejected.

    policy_chosen_logps, policy_rejected_logps: (B,) average per-token log-probs of the completions
    (``rlcourse.logprobs.masked_mean``), as TRL's ORPOTrainer uses them.
    nll_loss: scalar L_SFT, the token-mean NLL of the chosen sequences (``rlcourse.losses.sft_loss``; TRL takes it
    over prompt + completion, see the module docstring). lambda_: λ, TRL's ``beta``. Returns a scalar.
    """
    if not isinstance(nll_loss, torch.Tensor) or nll_loss.dim() != 0:
        raise ValueError("nll_loss must be a scalar tensor: the NLL averaged over the tokens of the chosen sequences "
                         "(rlcourse.losses.sft_loss).")
    return nll_loss + lambda_ * odds_ratio_loss(policy_chosen_logps, policy_rejected_logps).mean()
