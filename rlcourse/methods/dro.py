"""DRO-V (Richemond et al. 2024, lesson 09): regress a scalar reward with a learned per-prompt value, on KTO's batches.

The losses live in ``rlcourse.losses.dro``. Each row needs a scalar reward: ``rlcourse.data.unpaired_rows`` gives every
completion its gold score. The value half updates V(x) (one learned scalar per training prompt, ``PromptValues``) with
its own Adam inside the step; the policy half's loss is returned for the loop to update the policy. No TRL trainer
exists; the value table and its optimizer are state, so the step is a class with ``state_dict`` /
``load_state_dict``, which ``rlcourse.train`` checkpoints save and restore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcourse.batches import UnpairedBatch
from rlcourse.logprobs import masked_token_mean, sequence_logps, to_model_device
from rlcourse.losses.dro import dro_loss, dro_policy_loss, dro_value_loss
from rlcourse.methods.kto import batches  # noqa: F401 (part of the interface: KTO's batches, with scores)
from rlcourse.models import reference_policy


@dataclass(frozen=True)
class Settings:
    """DRO's options."""

    tau: float = 1.0
    """τ: the KL regularisation strength of the objective (the paper's τ)."""
    value_lr: float = 0.1
    """Adam learning rate of the value table V(x)."""

    def __post_init__(self):
        if self.tau <= 0 or self.value_lr <= 0:
            raise ValueError(f"tau={self.tau} and value_lr={self.value_lr} must be positive")


def trl_classes():
    """None: no TRL release has a DRO trainer (the tests check the losses against their formulas)."""
    return None


class PromptValues(torch.nn.Module):
    """DRO's value V(x): one learned scalar per training prompt (the prompts are few and each has its rows)."""

    def __init__(self, n_prompts: int):
        super().__init__()
        self.values = torch.nn.Parameter(torch.zeros(n_prompts))

    def forward(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return self.values[prompt_index]  # (B,)


class DROStep:
    """One DRO-V step for ``rlcourse.train.train``; ``values`` is the value table, trained here by its own Adam.

    Metrics: ``dro_loss`` (the joint objective, before the updates), ``value_loss``, ``advantage`` (mean r − V),
    ``logratio`` (mean log π_θ/π_ref per completion), ``reward``, ``entropy``.
    """

    def __init__(self, n_prompts: int, settings: Settings = Settings()):
        self.settings = settings
        self.values = PromptValues(n_prompts)
        self.optimizer = torch.optim.Adam(self.values.parameters(), lr=settings.value_lr)

    def __call__(self, model, batch: UnpairedBatch) -> tuple[torch.Tensor, dict]:
        tau = self.settings.tau
        if batch.score is None:
            raise ValueError("DRO needs a scalar reward per row: build the rows with rlcourse.data.unpaired_rows() from "
                             "pairs with 'score_chosen' and 'score_rejected', or give every row a 'score'")
        batch = to_model_device(model, batch)
        self.values.to(batch.score.device)  # in place: the value optimizer keeps the same parameter
        logps, out = sequence_logps(model, batch.sequences, with_stats=True)
        with torch.no_grad(), reference_policy(model):
            ref_logps, _ = sequence_logps(model, batch.sequences)
        rewards = batch.score.to(logps.dtype)
        v = self.values(batch.prompt_index)
        with torch.no_grad():
            joint = dro_loss(logps.float(), ref_logps.float(), rewards.float(), v.float(), tau)
        value_loss = dro_value_loss(v, rewards.float(), logps.float(), ref_logps.float(), tau)
        self.optimizer.zero_grad()
        value_loss.backward()
        self.optimizer.step()
        v = self.values(batch.prompt_index).detach()  # the updated baseline
        loss = dro_policy_loss(logps.float(), ref_logps.float(), rewards.float(), v, tau)
        with torch.no_grad():
            logratio = (logps - ref_logps).float()
            metrics = {"dro_loss": joint, "value_loss": value_loss.detach(), "advantage": (rewards - v).mean(),
                       "logratio": logratio.mean(), "reward": rewards.mean(),
                       "entropy": masked_token_mean(out["entropy"], out["mask"])}
        return loss, metrics

    def state_dict(self) -> dict:
        return {"values": self.values.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.values.load_state_dict(state["values"])
        self.optimizer.load_state_dict(state["optimizer"])


def step_fn(n_prompts: int, settings: Settings = Settings()) -> DROStep:
    """A fresh ``DROStep`` with V = 0 for ``n_prompts`` prompts (``UnpairedBatches.n_prompts``)."""
    return DROStep(n_prompts, settings)
