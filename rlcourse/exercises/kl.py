"""Exercises of lesson 10: the exact per-token KL over the vocabulary, and Schulman's k3 estimator."""

from __future__ import annotations

import torch

from rlcourse.exercises._check import compare
from rlcourse.kl import exact_token_kl, kl_k3


def _sampled_logps(g: torch.Generator, B: int = 3, T: int = 8) -> dict:
    logps = -torch.rand(B, T, generator=g) * 4  # log π_θ of the sampled tokens (≤ 0)
    ref_logps = logps + torch.randn(B, T, generator=g) * 1.5  # log π_ref: sometimes larger, sometimes smaller
    return {"logps": logps, "ref_logps": ref_logps.clamp(max=0)}


def _distributions(g: torch.Generator, B: int = 2, T: int = 5, V: int = 13) -> dict:
    logp = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    logq = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    return {"logp": logp, "logq": logq}


def check_kl_k3(fn) -> None:
    """fn(logps (B, T), ref_logps (B, T)) -> (B, T): k3 = (r − 1) − log r with r = π_ref / π_θ of the sampled token."""
    compare("kl_k3", fn, kl_k3, _sampled_logps)


def check_exact_token_kl(fn) -> None:
    """fn(logp (B, T, V), logq (B, T, V)) -> (B, T): Σ_v p(v) (log p(v) − log q(v)), p the policy, q the reference."""
    compare("exact_token_kl", fn, exact_token_kl, _distributions)
