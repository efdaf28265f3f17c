"""Exercises of lesson 01: per-token log-probs, the completion-only SFT loss, and DFT."""

from __future__ import annotations

import torch

from rlcourse.exercises._check import compare
from rlcourse.logprobs import token_logprobs
from rlcourse.losses.sft import dft_loss, sft_loss


def _logits_and_ids(g: torch.Generator, B: int = 3, T: int = 7, V: int = 11) -> dict:
    return {"logits": torch.randn(B, T, V, generator=g) * 3, "input_ids": torch.randint(0, V, (B, T), generator=g)}


def _logps_and_mask(g: torch.Generator, B: int = 4, T: int = 9) -> dict:
    logps = -torch.rand(B, T, generator=g) * 5  # log-probs are ≤ 0
    mask = (torch.rand(B, T, generator=g) > 0.4).float()
    mask[0, 0] = 1.0  # never an all-zero mask
    return {"logps": logps, "mask": mask}


def check_token_logprobs(fn) -> None:
    """fn(logits (B, T, V), input_ids (B, T)) -> (B, T-1): log π(y_{t+1} | y_≤t)."""
    compare("token_logprobs", fn, token_logprobs, _logits_and_ids)


def check_sft_loss(fn) -> None:
    """fn(logps (B, T), mask (B, T)) -> scalar: NLL averaged over the masked tokens of the whole batch."""
    compare("sft_loss", fn, sft_loss, _logps_and_mask)


def check_dft_loss(fn) -> None:
    """fn(logps, mask) -> scalar DFT loss; its gradient must also match (the stop-gradient matters)."""
    compare("dft_loss", fn, dft_loss, _logps_and_mask)

    def grad_of(loss_fn):
        def run(logps, mask):
            logps = logps.clone().requires_grad_(True)
            loss_fn(logps, mask).backward()
            return logps.grad
        return run

    compare("dft_loss gradient", grad_of(fn), grad_of(dft_loss), _logps_and_mask)
