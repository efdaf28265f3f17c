"""Exercises of lessons 11 (RLOO) and 12 (GRPO): the advantages and the clipped per-token loss."""

from __future__ import annotations

import torch

from rlcourse.exercises._check import compare
from rlcourse.losses.grpo import grpo_advantages, grpo_loss
from rlcourse.losses.rloo import rloo_advantages


def _rewards(g: torch.Generator) -> dict:
    G = int(torch.randint(2, 7, (1,), generator=g))
    B = int(torch.randint(1, 5, (1,), generator=g))
    rewards = torch.randint(0, 2, (B * G,), generator=g).float()  # 0/1 like a verifier, with ties ...
    rewards[: G] = torch.rand(G, generator=g)  # ... and one group of real-valued rewards
    return {"rewards": rewards, "num_generations": G}


def _surrogate(g: torch.Generator, N: int = 6, C: int = 5) -> dict:
    mask = (torch.rand(N, C, generator=g) > 0.3).float()
    mask[:, 0] = 1.0  # every completion has at least one token
    old = -torch.rand(N, C, generator=g) * 3
    return {
        "logps": old + 0.4 * torch.randn(N, C, generator=g),  # ρ = exp(logps − old) spreads over the clip band
        "old_logps": old,
        "advantages": torch.randn(N, generator=g),
        "mask": mask,
        "clip_eps": 0.2,
    }


def check_rloo_advantages(fn) -> None:
    """fn(rewards (B·G,), num_generations G) -> (B·G,): r_i minus the mean reward of the other G−1 samples."""
    compare("rloo_advantages", fn, rloo_advantages, _rewards)


def check_group_advantages(fn) -> None:
    """fn(rewards (B·G,), num_generations G) -> (B·G,): (r − group mean) / (group std + 1e-4), std unbiased."""
    compare("group_advantages", fn, lambda r, G: grpo_advantages(r, G, "group"), _rewards, atol=1e-4)


def check_clipped_surrogate(fn) -> None:
    """fn(logps, old_logps, advantages, mask, clip_eps) -> scalar: GRPO's per-token clipped loss, "grpo"
    aggregation (token mean per sequence, then mean over sequences), no KL. Gradients are compared too."""
    def reference(logps, old_logps, advantages, mask, clip_eps):
        return grpo_loss(logps, old_logps, advantages, mask, clip_eps=clip_eps, loss_type="grpo")

    compare("clipped_surrogate", fn, reference, _surrogate)

    def grad_of(loss_fn):
        def run(logps, old_logps, advantages, mask, clip_eps):
            logps = logps.clone().requires_grad_(True)
            loss_fn(logps, old_logps, advantages, mask, clip_eps).backward()
            return logps.grad
        return run

    compare("clipped_surrogate gradient", grad_of(fn), grad_of(reference), _surrogate)
