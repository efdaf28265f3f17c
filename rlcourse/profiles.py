"""Run profiles: how big a notebook's runs are.

- ``ci``: the smallest run that still exercises every code path on the real 4-bit model (CI, 2 CPU cores).
- ``cpu``: a laptop run that shows the method working (minutes per notebook).
- ``gpu``: longer runs with larger batches, when CUDA is available.

A notebook's ``parameters`` cell sets ``profile = "auto"``; papermill can override it
(``-p profile ci``). ``auto`` means ``gpu`` when CUDA is available, else ``cpu``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Profile:
    name: str
    """"ci", "cpu" or "gpu"."""
    steps: int
    """Optimizer steps of each training run (ours and TRL's)."""
    batch_size: int
    """Examples per optimizer step."""
    max_length: int
    """Longest prompt + completion in tokens for training; longer examples are truncated."""
    max_new_tokens: int
    """Tokens generated per completion in evaluation and in online methods."""
    n_eval: int
    """Held-out prompts used for the gold evaluation."""
    n_train: int
    """Training examples drawn from the task's training split."""
    learning_rate: float
    """AdamW learning rate for the LoRA parameters."""
    eval_batch_size: int
    """Prompts generated at once in evaluation."""
    checkpoint_every: int
    """Steps between checkpoints of our loop (adapter, optimizer, metrics)."""
    probe_every: int
    """Steps between probes of gold reward and KL on held-out prompts during training (0 and the end always)."""


PROFILES = {
    "ci": Profile("ci", steps=3, batch_size=2, max_length=96, max_new_tokens=24, n_eval=6, n_train=12,
                  learning_rate=2e-4, eval_batch_size=6, checkpoint_every=2, probe_every=3),
    "cpu": Profile("cpu", steps=40, batch_size=8, max_length=128, max_new_tokens=48, n_eval=48, n_train=320,
                   learning_rate=2e-4, eval_batch_size=16, checkpoint_every=10, probe_every=10),
    "gpu": Profile("gpu", steps=150, batch_size=16, max_length=192, max_new_tokens=64, n_eval=200, n_train=2400,
                   learning_rate=1e-4, eval_batch_size=64, checkpoint_every=50, probe_every=30),
}


def get_profile(name: str = "auto", **overrides) -> Profile:
    """The profile called ``name`` (``auto``: gpu if CUDA is available, else cpu), with field overrides."""
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} or 'auto'")
    return replace(PROFILES[name], **overrides)


def subset(dataset, n: int, seed: int = 0):
    """A seeded shuffle of ``dataset`` cut to its first ``n`` rows, or all of them when it has fewer.

    A profile's ``n_train`` is an upper bound: the shipped files differ in size per task and kind.
    """
    return dataset.shuffle(seed=seed).select(range(min(n, len(dataset))))
