"""Input checks shared by the preference losses of lessons 07–09: a wrong shape or a wrong-signed log-prob gets an
error that names the argument and says how to fix it, instead of a silent broadcast."""

from __future__ import annotations

import torch


def same_shape_1d(**tensors: torch.Tensor) -> None:
    """Every tensor must be 1-D, shape (B,), and all must share that shape (one value per sequence or pair)."""
    (first_name, first), *rest = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B,), got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but must be 1-D, shape (B,): one value per sequence. "
                             "Fix: reduce per-token log-probs with rlcourse.logprobs.masked_sum or masked_mean first.")
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}: "
                             "pass one value per sequence, in the same order, shape (B,) for both.")


def nonpositive(name: str, logps: torch.Tensor) -> None:
    """Log-probabilities are ≤ 0; a positive value means a reward or a logit was passed by mistake."""
    if bool((logps.detach() > 0).any()):
        raise ValueError(f"{name} has positive values (max {logps.detach().max().item():.4g}), but log-probabilities "
                         "are ≤ 0. Fix: pass log π(y|x) (rlcourse.logprobs.masked_mean for a per-token average), "
                         "not a reward or a logit.")


def positive_lengths(name: str, lengths: torch.Tensor) -> None:
    """Completion lengths divide log-probs; a zero-length completion (all tokens truncated away) has no average."""
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} has a completion with {lengths.min().item():g} tokens; every completion needs at "
                         "least one token. Fix: raise max_length or drop the examples whose completion was truncated "
                         "away.")
