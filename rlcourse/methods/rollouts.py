"""Rollouts: what the online methods (RLOO, GRPO) share, from sampling completions to the metrics TRL logs.

    for step in range(steps):                                   # rlcourse.train.train drives this
        rows   = the next prompts_per_step prompts (in order)
        ids    = G completions per prompt, sampled with explicit SamplingSettings    # Rollouts(step), by the
                 rollout engine: a merged copy of the policy synced after each step, one prefill per prompt
        r      = task reward(prompts, completions, **columns)                         # TRL's reward_funcs signature
        then the method's step: its advantages and loss on the scored RolloutBatch   # rloo.py, grpo.py

One update per batch (TRL's ``num_iterations=1``): the old policy is the current one, so the importance ratio is
exactly 1 in value and only its gradient matters; clipping never triggers. Generation is seeded per step, so a
resumed run samples the same completions; checkpoints and resume are ``train``'s. The batch layout is TRL's
(left-padded prompts, right-padded completions, the completion cut after its first EOS), so the same batch can be
fed to TRL's own loss for a parity check on fixed completions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from rlcourse.batches import RolloutBatch, batch_indices, pad_rollout
from rlcourse.logprobs import logprobs_and_entropy, masked_token_mean, shared_prompt_logits, to_model_device
from rlcourse.losses.off_policy import sampler_gap_metrics
from rlcourse.models import reference_policy
from rlcourse.rollout_engine import sampler_for
from rlcourse.sampling import SamplingSettings, eos_token_ids, prompt_ids


@dataclass(frozen=True)
class RolloutSettings:
    """How many completions a step samples, and how; TRL's names in brackets (GRPOConfig / RLOOConfig)."""

    num_generations: int = 4
    """G [``num_generations``]: completions sampled per prompt. 2-GRPO is G = 2."""
    prompts_per_step: int = 2
    """Prompts per optimizer step; each step trains on prompts_per_step × G completions."""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_new_tokens=16))
    """How completions are drawn [``temperature``, ``top_p``, ``max_completion_length``] (temperature 1, top_p 1:
    the policy's own distribution)."""

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"RolloutSettings.num_generations={self.num_generations}: a group needs at least 2 "
                             f"completions, else every advantage is 0")
        if not self.sampling.do_sample:
            raise ValueError("RolloutSettings.sampling must sample (do_sample=True): G greedy completions are "
                             "identical")

    @property
    def completions_per_step(self) -> int:
        """N = prompts_per_step × G, TRL's ``per_device_train_batch_size``."""
        return self.prompts_per_step * self.num_generations


class Rollouts:
    """step -> the scored ``RolloutBatch`` of that step, for ``rlcourse.train.train``: the online methods' batches.

    rows: prompt-only rows (dicts with "prompt" and the reward's columns), walked in order. reward_fn: TRL's
    ``reward_funcs`` signature. Keeps the first step's batch in ``self.first`` (for the parity check).
    """

    def __init__(self, model, tokenizer, rows, reward_fn, settings: RolloutSettings, seed: int = 0):
        self.model, self.tokenizer, self.rows = model, tokenizer, list(rows)
        self.reward_fn, self.settings, self.seed = reward_fn, settings, seed
        self.first: RolloutBatch | None = None
        if not self.rows or "prompt" not in self.rows[0]:
            raise ValueError("Rollouts needs prompt-only rows with a 'prompt' column (e.g. task.prompts('train'))")

    def __call__(self, step: int) -> RolloutBatch:
        s = self.settings
        rows = [self.rows[i] for i in batch_indices(step, s.prompts_per_step, len(self.rows))]
        prompts = [r["prompt"] for r in rows]
        t0 = time.perf_counter()
        sampler = sampler_for(self.model)  # synced with the policy's weights after the last optimizer step
        sync_s = time.perf_counter() - t0
        torch.manual_seed(self.seed * 1_000_003 + step)  # a resumed run samples the same completions
        ids = prompt_ids(self.tokenizer, prompts)
        samples = sampler.sample(ids, s.num_generations, s.sampling.max_new_tokens,
                                 eos_token_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id,
                                 temperature=s.sampling.temperature, top_p=s.sampling.top_p)
        repeated = [p for p in ids for _ in range(s.num_generations)]
        t1 = time.perf_counter()
        batch = self.score(rows, repeated, samples.completion_ids, samples.logps)
        timings = {"sync": sync_s, "prefill": samples.prefill_s, "decode": samples.decode_s,
                   "reward": time.perf_counter() - t1}
        batch = replace(batch, timings=timings)
        if step == 0:
            self.first = batch
        return batch

    def score(self, rows: list[dict], prompt_ids: list[list[int]], completion_ids: list[list[int]],
              sampler_logps: list[list[float]] | None = None) -> RolloutBatch:
        """Decode and reward given completions (G per row, row by row): the batch a step trains on."""
        G = self.settings.num_generations
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        repeated = [r for r in rows for _ in range(G)]
        prompts = [r["prompt"] for r in repeated]
        conversational = not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] if conversational else t for t in texts]
        columns = {k: [r[k] for r in repeated] for k in repeated[0] if k != "prompt"}
        rewards = self.reward_fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(rewards) != len(prompts) or any(r is None for r in rewards):
            raise ValueError(f"the reward function returned {len(rewards)} rewards (or a None) for {len(prompts)} "
                             f"completions; it must return one float per completion")
        return RolloutBatch(**pad_rollout(prompt_ids, completion_ids, self.tokenizer.pad_token_id, sampler_logps),
                            rewards=torch.tensor(rewards, dtype=torch.float32), completions=texts)  # rewards (N,)


def completion_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False,
                        num_generations: int = 1):
    """Per-token log π of the completion tokens, (N, C), and optionally their entropies (N, C).

    Only the completion positions' logits are computed: position P−1+t predicts completion token t. Logits are
    divided by the sampling temperature, as TRL does. With ``num_generations`` = G > 1 and the rows in groups of G
    that share their prompt (as rollouts are), each prompt's forward runs once and its G completions attend to its
    keys and values (``rlcourse.logprobs.shared_prompt_logits``): the same log-probs, and gradients, for ~P/C fewer
    token-forwards. The entropies are taken at completion tokens (0 on padding).
    """
    batch = to_model_device(model, batch)
    if num_generations > 1 and _prompts_repeat(batch, num_generations):
        G = num_generations
        logits, _ = shared_prompt_logits(model, batch.prompt_ids[::G], batch.prompt_mask[::G], batch.completion_ids,
                                         batch.completion_mask, G)  # (N, C, V)
    else:
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)  # (N, P+C)
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)  # (N, P+C)
        C = batch.completion_ids.size(1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1).logits[:, :-1]
    logits = logits.float() / temperature  # (N, C, V): row t predicts completion token t
    if with_entropy:  # entropy at the completion's tokens, 0 on padding
        return logprobs_and_entropy(logits, batch.completion_ids, batch.completion_mask)
    return torch.gather(F.log_softmax(logits, dim=-1), 2, batch.completion_ids.unsqueeze(-1)).squeeze(-1), None


def _prompts_repeat(batch: RolloutBatch, G: int) -> bool:
    """True when the N rows form N/G groups of G rows with one prompt each (the layout ``Rollouts`` makes)."""
    N, P = batch.prompt_ids.shape
    if N % G:
        return False
    ids = batch.prompt_ids.view(N // G, G, P)
    return bool((ids == ids[:, :1]).all()) and bool((batch.prompt_mask.view(N // G, G, P) ==
                                                    batch.prompt_mask.view(N // G, G, P)[:, :1]).all())


def policy_logprobs(model, batch: RolloutBatch, temperature: float, beta: float, num_generations: int = 1):
    """What every online step starts from: log π_θ (N, C) with gradient, its entropy (N, C), and log π_ref (N, C),
    computed (with the adapters off, or the "ref" adapter) only when the KL coefficient β ≠ 0, else None. Each
    group of ``num_generations`` rows' prompt is forwarded once (``completion_logprobs``). Also returns the seconds
    the reference forward took (0 without one), for the step breakdown."""
    ref_logps, t0 = None, time.perf_counter()
    if beta != 0.0:
        with torch.no_grad(), reference_policy(model):
            ref_logps, _ = completion_logprobs(model, batch, temperature, num_generations=num_generations)
    reference_seconds = time.perf_counter() - t0
    logps, entropy = completion_logprobs(model, batch, temperature, with_entropy=True,
                                         num_generations=num_generations)
    return logps, entropy, ref_logps, reference_seconds


def rollout_metrics(batch: RolloutBatch, num_generations: int, advantages: torch.Tensor, entropy: torch.Tensor,
                    old_logps: torch.Tensor | None = None, sampler_weights: torch.Tensor | None = None,
                    reference_seconds: float = 0.0) -> dict:
    """The metrics TRL's online trainers log under these names: rewards (mean, spread, groups with no spread),
    entropy, completion length, advantages; with the policy's log-probs ``old_logps`` (N, C) and a batch from the
    rollout engine, the sampler/policy gap (``sampling/*``, as TRL logs it with vLLM). Also the seconds the batch
    took by phase and the reference forward's (``time/*``), for the step breakdown."""
    rewards, mask = batch.rewards, batch.completion_mask.float()
    grouped = rewards.view(-1, num_generations)  # (B, G)
    gap = {}
    if old_logps is not None and batch.sampler_logps is not None:
        gap = sampler_gap_metrics(old_logps, batch.sampler_logps.to(old_logps.device), mask, sampler_weights)
    timings = {f"time/{k}": v for k, v in batch.timings.items()} | {"time/reference_forward": reference_seconds}
    return gap | timings | {
        "reward": rewards.mean(),
        "reward_std": rewards.std(),
        "reward_group_std": grouped.std(1).mean(),
        "frac_reward_zero_std": (grouped.std(1) < 1e-6).float().mean(),
        "entropy": masked_token_mean(entropy, mask),
        "completions/mean_length": batch.completion_mask.sum(-1).float().mean(),
        "advantages/mean": advantages.mean(),
        "advantages/std": advantages.std(),
        "advantages/abs_max": advantages.abs().max(),
    }


def trl_inputs(batch: RolloutBatch, advantages: torch.Tensor) -> dict:
    """A scored batch as the inputs dict TRL's ``_compute_loss`` expects (GRPOTrainer's, RLOOTrainer's), with our
    advantages: for a parity check on fixed completions. Each loss adds its old log-probs under its own key."""
    return {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
            "completion_mask": batch.completion_mask, "advantages": advantages,
            "num_items_in_batch": batch.completion_mask.sum()}


def trl_kwargs(settings: RolloutSettings) -> dict:
    """The GRPOConfig / RLOOConfig options of the rollouts, set explicitly whatever TRL's defaults: the sampling
    settings, G, one iteration per batch, prompts in dataset order (``shuffle_dataset=False``), the dataset's extra
    columns kept for the reward."""
    s = settings.sampling
    return dict(num_generations=settings.num_generations, max_completion_length=s.max_new_tokens,
                temperature=s.temperature, top_p=s.top_p, top_k=0, num_iterations=1, shuffle_dataset=False,
                remove_unused_columns=False, disable_tqdm=True)


def trl_online_config(method, settings, rollout: RolloutSettings, train_config, output_dir, **kwargs):
    """The TRL config (GRPOConfig, RLOOConfig, ...) of an online ``method`` module (``rlcourse.methods.grpo``, ...)
    that runs what ``settings`` and ``rollout`` describe; ``kwargs`` override. Built by ``rlcourse.trl_runs.trl_config``,
    so the optimizer, seed and precision match ``train_config``."""
    from rlcourse.trl_runs import trl_config

    if train_config.batch_size != rollout.completions_per_step:
        raise ValueError(f"TrainConfig.batch_size={train_config.batch_size} must be the completions per step "
                         f"(prompts_per_step × G = {rollout.completions_per_step}), TRL's per_device_train_batch_size")
    _, config_cls = method.trl_classes()
    options = trl_kwargs(rollout) | method.trl_kwargs(settings) | kwargs
    return trl_config(config_cls, train_config, output_dir, **options)


def trl_metrics(log):
    """TRL's online log with its per-token KL renamed ``kl_token``, so a probe's ``kl`` (sequence KL on held-out
    prompts, the course's meaning) can be merged into the same rows without overwriting it."""
    for row in log.rows:
        if "kl" in row:
            row["kl_token"] = row.pop("kl")
    return log
