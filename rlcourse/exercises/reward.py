"""Exercises of lesson 04: the Bradley–Terry loss, the full reward-model loss (margin and centering), and
Spearman's rank correlation with ties."""

from __future__ import annotations

import numpy as np
import torch

from rlcourse.evaluate import spearman
from rlcourse.exercises._check import compare
from rlcourse.losses.reward import bradley_terry_loss, reward_model_loss


def _rewards(g: torch.Generator, B: int = 6) -> dict:
    return {"chosen_rewards": torch.randn(B, generator=g) * 2, "rejected_rewards": torch.randn(B, generator=g) * 2}


def _rewards_margin_center(g: torch.Generator, B: int = 6) -> dict:
    return {**_rewards(g, B), "margin": torch.rand(B, generator=g), "center_rewards_coefficient": 0.1}


def _scores_with_ties(g: torch.Generator, n: int = 12) -> dict:
    x = torch.randint(0, 5, (n,), generator=g).float()  # few distinct values: many ties, as gold scores have
    y = x + torch.randn(n, generator=g) * 2
    return {"x": x, "y": y}


def check_bradley_terry_loss(fn) -> None:
    """fn(chosen_rewards (B,), rejected_rewards (B,)) -> scalar: −mean log σ(r_w − r_l)."""
    compare("bradley_terry_loss", fn, bradley_terry_loss, _rewards)


def check_reward_model_loss(fn) -> None:
    """fn(chosen_rewards, rejected_rewards, margin (B,), center_rewards_coefficient) -> scalar: the margin loss
    plus η·mean((r_w + r_l)²); its gradient must match too."""
    compare("reward_model_loss", fn, reward_model_loss, _rewards_margin_center)

    def grad_of(loss_fn):
        def run(chosen_rewards, rejected_rewards, margin, center_rewards_coefficient):
            chosen_rewards = chosen_rewards.clone().requires_grad_(True)
            loss_fn(chosen_rewards, rejected_rewards, margin, center_rewards_coefficient).backward()
            return chosen_rewards.grad
        return run

    compare("reward_model_loss gradient", grad_of(fn), grad_of(reward_model_loss), _rewards_margin_center)


def check_spearman(fn) -> None:
    """fn(x (n,), y (n,)) -> float: Spearman's ρ with tied values given the mean of their ranks."""
    compare("spearman", lambda x, y: torch.tensor(float(fn(np.asarray(x), np.asarray(y))), dtype=torch.float64),
            lambda x, y: torch.tensor(spearman(x.numpy(), y.numpy()), dtype=torch.float64), _scores_with_ties)
