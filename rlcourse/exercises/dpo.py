"""Exercises of lessons 05 and 06: the implicit reward, the DPO loss, and the IPO loss."""

from __future__ import annotations

import torch

from rlcourse.exercises._check import compare
from rlcourse.losses.dpo import dpo_loss, implicit_reward, ipo_loss


def _pair_logps(g: torch.Generator, B: int = 6) -> dict:
    """Summed completion log-probs of B pairs: policy and reference near each other, as in training."""
    ref_chosen = -torch.rand(B, generator=g) * 40
    ref_rejected = -torch.rand(B, generator=g) * 40
    return {
        "policy_chosen_logps": ref_chosen + torch.randn(B, generator=g) * 3,
        "policy_rejected_logps": ref_rejected + torch.randn(B, generator=g) * 3,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }


def check_implicit_reward(fn) -> None:
    """fn(policy_logps (B,), ref_logps (B,), beta) -> (B,): r̂ = β log π_θ(y|x)/π_ref(y|x)."""
    def inputs(g):
        d = _pair_logps(g)
        return {"policy_logps": d["policy_chosen_logps"], "ref_logps": d["ref_chosen_logps"],
                "beta": float(torch.rand(1, generator=g)) * 0.5 + 0.05}

    compare("implicit_reward", fn, implicit_reward, inputs)


def check_dpo_loss(fn) -> None:
    """fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) -> scalar:
    the mean over pairs of −log σ(β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])."""
    def inputs(g):
        return {**_pair_logps(g), "beta": float(torch.rand(1, generator=g)) * 0.5 + 0.05}

    compare("dpo_loss", fn, dpo_loss, inputs)


def check_ipo_loss(fn) -> None:
    """fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
    rejected_lengths, beta) -> scalar: the mean of (ρ̄_w − ρ̄_l − 1/(2β))², ρ̄ the per-token average log-ratio."""
    def inputs(g):
        d = _pair_logps(g)
        B = d["ref_chosen_logps"].shape[0]
        return {**d, "chosen_lengths": torch.randint(1, 30, (B,), generator=g).float(),
                "rejected_lengths": torch.randint(1, 30, (B,), generator=g).float(),
                "beta": float(torch.rand(1, generator=g)) + 0.1}

    compare("ipo_loss", fn, ipo_loss, inputs)
