"""BCO (Jung et al. 2024, lesson 09): a binary classifier of desirable vs undesirable completions, on KTO's batches.

The loss and the running reward shift δ live in ``rlcourse.losses.bco``. TRL 1.16 has no BCO trainer (1.13.0 was the
last release with one); our step follows that ``BCOTrainer``'s order: δ is updated with the batch's rewards
(detached), then used.
The mismatched KL sequences of the batch are not needed. δ is state, so the step is a small class whose
``state_dict`` / ``load_state_dict`` let ``rlcourse.train`` checkpoints resume it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcourse.batches import UnpairedBatch
from rlcourse.logprobs import sequence_logps, to_model_device
from rlcourse.losses.bco import RewardShift, bco_loss
from rlcourse.methods.kto import batches, label_metrics  # noqa: F401 (batches: part of the interface)
from rlcourse.models import reference_policy


@dataclass(frozen=True)
class Settings:
    """BCO's one option (the removed ``BCOConfig``'s name in brackets)."""

    beta: float = 0.1
    """β [``beta``]: scales the implicit reward β·log(π_θ/π_ref) the classifier reads."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")


def trl_classes():
    """None: TRL 1.16 has no BCO trainer to compare with (the tests check the loss against its formula and TRL's
    ``bco_pair`` DPO loss instead)."""
    return None


class BCOStep:
    """One BCO step for ``rlcourse.train.train``, with the running reward shift δ it carries from step to step."""

    def __init__(self, settings: Settings = Settings()):
        self.settings, self.shift = settings, RewardShift()

    def __call__(self, model, batch: UnpairedBatch) -> tuple[torch.Tensor, dict]:
        beta = self.settings.beta
        batch = to_model_device(model, batch)
        logps, out = sequence_logps(model, batch.sequences, with_stats=True)  # (B,)
        with torch.no_grad(), reference_policy(model):
            ref_logps, _ = sequence_logps(model, batch.sequences)
        rewards = beta * (logps - ref_logps)  # (B,)
        delta = self.shift.update(rewards)
        labels = batch.label.bool()
        loss = bco_loss(logps, ref_logps, labels, beta, delta)
        with torch.no_grad():
            metrics = label_metrics(rewards.detach(), logps, labels, out) | {
                "delta": torch.tensor(delta, device=logps.device)}
        return loss, metrics

    def state_dict(self) -> dict:
        return {"mean": self.shift.mean, "count": self.shift.count}

    def load_state_dict(self, state: dict) -> None:
        self.shift = RewardShift(**state)


def step_fn(settings: Settings = Settings()) -> BCOStep:
    """A fresh ``BCOStep`` (δ = 0), for ``rlcourse.train.train``."""
    return BCOStep(settings)
