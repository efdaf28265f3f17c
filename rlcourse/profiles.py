"""Run profiles: how big a notebook's runs are.

- ``ci``: the smallest run that still exercises every code path on the real 4-bit model (CI, 2 CPU cores).
- ``cpu``: a laptop run that shows the method working (minutes per notebook).
- ``gpu``: longer runs with larger batches, when CUDA is available.

A notebook's ``parameters`` cell sets ``profile = "auto"``; papermill can override it
(``-p profile ci``). ``auto`` means ``gpu`` when CUDA is available, else ``cpu``.

Every run size and learning rate of the notebooks lives here: ``Profile`` holds the ones most lessons share,
and a dataclass per lesson (``IPOSizes``, ``KLStudySizes``, ``OnlineSizes``) the ones only one lesson uses. A
notebook's parameters cell may override some of them; its ``None`` means "the profile's".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class IPOSizes:
    """Lesson 06's runs on deterministic preferences (DPO and IPO, ours and TRL's)."""

    steps: int
    """Optimizer steps of each run."""
    batch_size: int
    """Pairs per optimizer step."""
    n_pairs: int
    """Distinct pairs in the deterministic dataset; each is seen every ``n_pairs / batch_size`` steps."""


@dataclass(frozen=True)
class KLStudySizes:
    """Lesson 10's study of the KL estimators and its exact toy problem."""

    n_prompts: int
    """Held-out prompts the estimators are compared on."""
    samples_per_prompt: int
    """Completions sampled per prompt: the estimators' bias and spread are measured over them."""
    max_new_tokens: int
    """Longest sampled completion in tokens."""
    toy_steps: int
    """Adam steps of the exact toy problem (a categorical policy over a few tokens)."""
    toy_learning_rate: float
    """Adam learning rate of the toy problem's logits."""


@dataclass(frozen=True)
class OnlineSizes:
    """An online RL lesson's run (11 RLOO, 12 GRPO): each optimizer step trains on prompts_per_step × G completions."""

    steps: int
    """Optimizer steps of each RL run (ours and TRL's)."""
    num_generations: int
    """G, completions sampled per prompt."""
    prompts_per_step: int
    """Prompts per optimizer step."""
    max_new_tokens: int
    """Longest completion in tokens, in the rollouts and in the evaluation."""
    learning_rate: float
    """AdamW learning rate of the RL runs (ours and TRL's)."""
    warm_start_steps: int
    """SFT steps on the task's demonstrations before RL (0: RL from the base model)."""
    warm_start_learning_rate: float
    """AdamW learning rate of that SFT warm start."""
    warm_start_max_length: int
    """Longest demonstration (prompt + answer) in tokens in that SFT warm start; the arithmetic task's fit."""
    n_eval: int
    """Held-out prompts of the gold evaluation and of the probes."""
    eval_samples: int
    """Completions sampled per held-out prompt: gold is their mean, the expected reward RL maximises."""
    base_eval_samples: int
    """The same for the base model (adapters off): its gold sits far below the SFT start, and its completions run
    to ``max_new_tokens``, so fewer samples show it at a fraction of the cost."""
    n_probe: int
    """Held-out prompts of the probes during training (the first of the ``n_eval``), one sample each."""
    probe_every: int
    """Steps between probes of gold and KL during training (0 and the last step always)."""
    extra_seeds: int
    """Runs per side beyond the first, with seeds seed+1..: the run-to-run noise a gain must clear (0: none)."""


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
    """Tokens generated per completion in evaluation (the online lessons use their own, ``OnlineSizes``)."""
    n_eval: int
    """Held-out prompts used for the gold evaluation (the online lessons use their own, ``OnlineSizes``)."""
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
    preference_learning_rate: float
    """AdamW learning rate of the preference runs in lessons 05–09 (DPO to KTO), in place of ``learning_rate``."""
    forward_timing_repeats: int
    """Timed forwards per configuration in lesson 03's memory and speed table; the fastest counts."""
    step_cost_repeats: int
    """Timed steps per method in lesson 07's cost of a reference model (``rlcourse.measure.step_cost``); the median
    counts."""
    # One lesson's sizes each; left out of the repr because each lesson prints its own.
    ipo: IPOSizes = field(repr=False)
    """Lesson 06's IPO and DPO runs."""
    kl_penalty: KLStudySizes = field(repr=False)
    """Lesson 10's estimator study and toy problem."""
    rloo: OnlineSizes = field(repr=False)
    """Lesson 11's RLOO runs."""
    grpo: OnlineSizes = field(repr=False)
    """Lesson 12's GRPO runs."""


# Online RL (lessons 11 and 12): each step trains on prompts_per_step × num_generations completions.
_ONLINE = {
    "ci": OnlineSizes(steps=3, num_generations=2, prompts_per_step=1, max_new_tokens=8, learning_rate=2e-4,
                      warm_start_steps=2, warm_start_learning_rate=5e-4, warm_start_max_length=64, n_eval=6,
                      eval_samples=2, base_eval_samples=2, n_probe=6, probe_every=3, extra_seeds=1),
    # cpu: one seed a side by default (the reruns are a parameter, extra_seeds). Sampled gold, SFT start -> ours, one
    # run each: 20 steps of 3 prompts at 3e-4 0.305 -> 0.268; 24 of 4 at 2e-4 0.305 -> 0.395; 24 of 4 with G = 6
    # 0.323 -> 0.293; with an empty system prompt, GRPO at 5e-4 collapsed (0.315 -> 0.085) and at 1e-4 barely moved
    # (0.315 -> 0.328). 16 samples per held-out prompt: the same two GRPO adapters measured +0.070 [-0.003, +0.145]
    # and +0.090 [+0.020, +0.165] with 4 (two evaluations), +0.112 [+0.048, +0.178] and +0.134 [+0.069, +0.203]
    # with 16: with 4, a gain's estimate moves by more than its interval's margin over zero.
    "cpu": OnlineSizes(steps=24, num_generations=8, prompts_per_step=4, max_new_tokens=16, learning_rate=2e-4,
                       warm_start_steps=30, warm_start_learning_rate=5e-4, warm_start_max_length=64, n_eval=100,
                       eval_samples=16, base_eval_samples=4, n_probe=16, probe_every=12, extra_seeds=0),
    "gpu": OnlineSizes(steps=150, num_generations=8, prompts_per_step=8, max_new_tokens=16, learning_rate=2e-4,
                       warm_start_steps=60, warm_start_learning_rate=5e-4, warm_start_max_length=64, n_eval=100,
                       eval_samples=16, base_eval_samples=8, n_probe=100, probe_every=30, extra_seeds=2),
}

PROFILES = {
    "ci": Profile("ci", steps=3, batch_size=2, max_length=96, max_new_tokens=24, n_eval=6, n_train=12,
                  learning_rate=2e-4, eval_batch_size=6, checkpoint_every=2, probe_every=3,
                  preference_learning_rate=5e-4, forward_timing_repeats=1, step_cost_repeats=2,
                  ipo=IPOSizes(steps=3, batch_size=4, n_pairs=8),
                  kl_penalty=KLStudySizes(n_prompts=2, samples_per_prompt=4, max_new_tokens=16, toy_steps=300,
                                        toy_learning_rate=0.05),
                  rloo=_ONLINE["ci"], grpo=_ONLINE["ci"]),
    "cpu": Profile("cpu", steps=40, batch_size=8, max_length=128, max_new_tokens=48, n_eval=48, n_train=320,
                   learning_rate=2e-4, eval_batch_size=16, checkpoint_every=10, probe_every=10,
                   preference_learning_rate=5e-4, forward_timing_repeats=3, step_cost_repeats=5,
                   ipo=IPOSizes(steps=60, batch_size=4, n_pairs=8),
                   kl_penalty=KLStudySizes(n_prompts=8, samples_per_prompt=32, max_new_tokens=48, toy_steps=3000,
                                         toy_learning_rate=0.05),
                   rloo=_ONLINE["cpu"], grpo=_ONLINE["cpu"]),
    "gpu": Profile("gpu", steps=150, batch_size=16, max_length=192, max_new_tokens=64, n_eval=200, n_train=2400,
                   learning_rate=1e-4, eval_batch_size=64, checkpoint_every=50, probe_every=30,
                   preference_learning_rate=5e-4, forward_timing_repeats=3, step_cost_repeats=5,
                   ipo=IPOSizes(steps=60, batch_size=4, n_pairs=8),
                   kl_penalty=KLStudySizes(n_prompts=32, samples_per_prompt=64, max_new_tokens=64, toy_steps=3000,
                                         toy_learning_rate=0.05),
                   rloo=_ONLINE["gpu"], grpo=_ONLINE["gpu"]),
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
