"""Supervised fine-tuning losses on completion tokens.

- ``sft_loss``: the negative log-likelihood of the demonstration, averaged over completion tokens of the
  whole batch (token-level mean, as TRL's SFTTrainer computes it; a per-sequence mean would weight short
  completions more).
- ``dft_loss``: Dynamic Fine-Tuning, Wu et al. 2025, "On the Generalization of SFT: A Reinforcement
  Learning Perspective with Reward Rectification", Eq. 9: each token's NLL is multiplied by its
  probability, with the gradient stopped through the weight. The paper shows the SFT gradient is a policy
  gradient with an implicit reward 1/π(y_t), which explodes on unlikely tokens; the weight sg(π) cancels it.
"""

from __future__ import annotations

import torch


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_SFT = -(1/N) Σ_{b,t} m_{b,t} log π(y_{b,t} | x_b, y_{b,<t}),  N = Σ m.

    logps: (B, T) per-token log π of the demonstration tokens; mask: (B, T), 1 on completion tokens.
    Returns a scalar.
    """
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


def dft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_DFT = -(1/N) Σ_{b,t} m_{b,t} sg(π(y_{b,t}|·)) log π(y_{b,t}|·)   (Wu et al. 2025, Eq. 9; sg = stop-gradient).

    logps: (B, T); mask: (B, T). Returns a scalar.
    """
    weight = logps.detach().exp()
    return -(weight * logps * mask).sum() / mask.sum().clamp(min=1)
