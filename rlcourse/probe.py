"""Measure gold reward and KL to the reference *during* training, for our loop and for TRL's.

A probe samples completions from the current policy on a fixed set of held-out prompts (temperature 1:
the policy's own distribution, which the KL estimate requires) and records their mean gold reward and
KL(π_θ‖π_ref). ``ProbeCallback`` runs the same probe inside a TRL trainer, so both runs draw comparable
reward and KL curves.
"""

from __future__ import annotations

import numpy as np
from transformers import TrainerCallback

from rlcourse.kl import sequence_kl
from rlcourse.sampling import SamplingSettings, generate


def make_probe(tokenizer, task, prompts, max_new_tokens: int, batch_size: int = 16, seed: int = 0):
    """A function model -> {"gold": mean gold reward, "kl": mean sequence KL} on the rows of ``prompts``."""
    rows = list(prompts)
    prompt_list = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0)

    def probe(model) -> dict:
        completions = generate(model, tokenizer, prompt_list, settings, batch_size=batch_size, seed=seed,
                               progress=False)
        gold = task.reward(prompt_list, completions, **columns)
        kl = sequence_kl(model, tokenizer, prompt_list, completions, batch_size=batch_size)
        return {"gold": float(np.mean(gold)), "kl": float(np.mean(kl))}

    return probe


def probe_steps(total: int, every: int) -> set[int]:
    """Steps at which to probe: 0 (the start), every ``every`` steps, and the last one."""
    return set(range(0, total, max(every, 1))) | {total}


class ProbeCallback(TrainerCallback):
    """Runs ``probe(model)`` in a TRL trainer at the same steps as our loop; results in ``self.rows``."""

    def __init__(self, probe, steps: set[int]):
        self.probe, self.steps, self.rows = probe, steps, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.steps:
            self.rows.append({"step": 0, **self.probe(model)})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.rows.append({"step": state.global_step, **self.probe(model)})
