"""The online RL loop shared by RLOO and GRPO: sample, score, compute advantages, update.

    for step in range(steps):                                   # rlcourse.train.train drives this
        rows   = the next prompts_per_step prompts (in order)
        ids    = G completions per prompt, sampled with explicit SamplingSettings   # Rollouts(step)
        r      = task reward(prompts, completions, **columns)                        # TRL's reward_funcs signature
        logp   = log π_θ(completion tokens)  (N, C), with gradient                   # online_step
        ref    = log π_ref(...) with the adapters off, only when beta != 0
        A      = rloo_advantages / grpo_advantages(r)
        loss   = rloo_loss / grpo_loss(logp, logp.detach(), A, mask, ...)

One update per batch (TRL's ``num_iterations=1``): the old policy is the current one, so the importance
ratio is exactly 1 in value and only its gradient matters; clipping never triggers. Generation happens in
``Rollouts`` (called by ``train`` as ``batches(step)``), seeded per step, so a resumed run samples the same
completions; checkpoints and resume are ``train``'s. The batch layout is TRL's (left-padded prompts,
right-padded completions, the completion cut after its first EOS), so the same batch can be fed to TRL's
own loss for a parity check on fixed completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from rlcourse.kl import kl_k1, kl_k3, kl_penalized_rewards
from rlcourse.logprobs import to_model_device
from rlcourse.losses.policy_gradient import (
    LOSS_TYPES, SCALE_REWARDS, clip_fractions, grpo_advantages, grpo_loss, importance_ratio,
    reinforce_pp_advantages, rloo_advantages, rloo_loss,
)
from rlcourse.models import reference_policy
from rlcourse.sampling import SamplingSettings, generate_ids
from rlcourse.train import batch_indices


@dataclass(frozen=True)
class OnlineConfig:
    """What the online step does; ``trl_online_config`` maps it onto GRPOConfig / RLOOConfig."""

    algorithm: str = "grpo"
    """"grpo" (group-relative advantages, per-token clipped loss) or "rloo" (leave-one-out, sequence loss)."""
    num_generations: int = 4
    """G: completions sampled per prompt (TRL ``num_generations``). 2-GRPO is G = 2."""
    prompts_per_step: int = 2
    """Prompts per optimizer step; each step trains on prompts_per_step × G completions."""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_new_tokens=16))
    """How completions are drawn (temperature 1, top_p 1: the policy's own distribution)."""
    beta: float = 0.0
    """β, the KL coefficient. GRPO: k3 in the loss (TRL default 0). RLOO: k1 in the reward (TRL default 0.05)."""
    clip_eps: float = 0.2
    """ε, lower clip of the importance ratio (TRL ``epsilon``)."""
    clip_eps_high: float | None = None
    """ε_high, upper clip (TRL ``epsilon_high``; None means ε). DAPO's clip-higher uses 0.28."""
    loss_type: str = "dapo"
    """GRPO only: "grpo", "bnpo", "dr_grpo" or "dapo" (TRL's default)."""
    importance_sampling_level: str = "token"
    """GRPO only: "token" (GRPO) or "sequence" (GSPO)."""
    scale_rewards: str = "group"
    """GRPO only: divide centred rewards by the group's std ("group"), the batch's ("batch") or not ("none")."""
    normalize_advantages: bool = False
    """RLOO only: REINFORCE++'s global normalisation of the advantages (TRL ``normalize_advantages``)."""
    kl_bias_correction: bool = True
    """GRPO only: multiply the k3 term by the importance ratio (TRL ``use_bias_correction_kl``, default True)."""

    def __post_init__(self):
        if self.algorithm not in ("grpo", "rloo"):
            raise ValueError(f"OnlineConfig.algorithm={self.algorithm!r}; choose 'grpo' or 'rloo'")
        if self.num_generations < 2:
            raise ValueError(f"OnlineConfig.num_generations={self.num_generations}: a group needs at least 2 "
                             f"completions, else every advantage is 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"OnlineConfig.loss_type={self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"OnlineConfig.scale_rewards={self.scale_rewards!r}; choose one of {SCALE_REWARDS}")
        if not self.sampling.do_sample:
            raise ValueError("OnlineConfig.sampling must sample (do_sample=True): G greedy completions are identical")

    @property
    def completions_per_step(self) -> int:
        """N = prompts_per_step × G, TRL's ``per_device_train_batch_size``."""
        return self.prompts_per_step * self.num_generations


def pad_rollout(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int) -> dict:
    """TRL's layout: prompts left-padded (N, P), completions right-padded (N, C), with their masks."""
    from trl.trainer.utils import pad

    p = [torch.tensor(ids) for ids in prompt_ids]
    c = [torch.tensor(ids) for ids in completion_ids]
    return {
        "prompt_ids": pad(p, padding_value=pad_token_id, padding_side="left"),  # (N, P)
        "prompt_mask": pad([torch.ones_like(t) for t in p], padding_value=0, padding_side="left"),
        "completion_ids": pad(c, padding_value=pad_token_id, padding_side="right"),  # (N, C)
        "completion_mask": pad([torch.ones_like(t) for t in c], padding_value=0, padding_side="right"),
    }


class Rollouts:
    """``batches(step)`` for ``rlcourse.train.train``: sample and score the completions of one step.

    rows: prompt-only rows (dicts with "prompt" and the reward's columns), walked in order. reward_fn: TRL's
    ``reward_funcs`` signature. Keeps the first step's batch in ``self.first`` (for the parity check).
    """

    def __init__(self, model, tokenizer, rows, reward_fn, config: OnlineConfig, seed: int = 0):
        self.model, self.tokenizer, self.rows = model, tokenizer, list(rows)
        self.reward_fn, self.config, self.seed = reward_fn, config, seed
        self.first: dict | None = None
        if not self.rows or "prompt" not in self.rows[0]:
            raise ValueError("Rollouts needs prompt-only rows with a 'prompt' column (e.g. task.prompts('train'))")

    def __call__(self, step: int) -> dict:
        cfg = self.config
        rows = [self.rows[i] for i in batch_indices(step, cfg.prompts_per_step, len(self.rows))]
        prompts = [r["prompt"] for r in rows]
        prompt_ids, completion_ids = generate_ids(self.model, self.tokenizer, prompts, cfg.sampling,
                                                  cfg.num_generations, seed=self.seed * 1_000_003 + step)
        batch = self.score(rows, prompt_ids, completion_ids)
        if step == 0:
            self.first = batch
        return batch

    def score(self, rows: list[dict], prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict:
        """Decode and reward given completions (G per row, row by row): the batch ``online_step`` trains on."""
        G = self.config.num_generations
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
        batch = pad_rollout(prompt_ids, completion_ids, self.tokenizer.pad_token_id)
        batch["rewards"] = torch.tensor(rewards, dtype=torch.float32)  # (N,)
        batch["completions"] = texts
        return batch


def completion_logprobs(model, batch: dict, temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log π of the completion tokens, (N, C), and optionally their entropies (N, C).

    Only the last C+1 positions' logits are computed (``logits_to_keep``): position P−1+t predicts
    completion token t. Logits are divided by the sampling temperature, as TRL does.
    """
    batch = to_model_device(model, batch)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (N, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (N, P+C)
    C = batch["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1).logits  # (N, C+1, V)
    logits = logits[:, :-1].float() / temperature  # (N, C, V): row t predicts completion token t
    logp_all = F.log_softmax(logits, dim=-1)  # (N, C, V)
    logps = torch.gather(logp_all, 2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)  # (N, C)
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N, C)
    return logps, entropy


def advantages_of(batch: dict, config: OnlineConfig, logps: torch.Tensor | None = None,
                  ref_logps: torch.Tensor | None = None) -> torch.Tensor:
    """The advantages of a scored batch, (N,): GRPO's group-relative ones, or RLOO's leave-one-out ones
    (on the KL-penalised reward when beta ≠ 0, then REINFORCE++-normalised if asked)."""
    G, rewards = config.num_generations, batch["rewards"]
    if config.algorithm == "grpo":
        return grpo_advantages(rewards, G, config.scale_rewards)
    mask = batch["completion_mask"].float()
    if config.beta != 0.0:
        rewards = kl_penalized_rewards(rewards, logps, ref_logps, mask, config.beta, estimator="k1")
    adv = rloo_advantages(rewards, G)
    return reinforce_pp_advantages(adv) if config.normalize_advantages else adv


def online_step(model, batch: dict, config: OnlineConfig) -> tuple[torch.Tensor, dict]:
    """One step's loss on a scored batch, and the metrics TRL logs under the same names."""
    scored, batch = batch, to_model_device(model, batch)
    mask = batch["completion_mask"].float()  # (N, C)
    ref_logps = None
    if config.beta != 0.0:
        with torch.no_grad(), reference_policy(model):
            ref_logps, _ = completion_logprobs(model, batch, config.sampling.temperature)
    logps, entropy = completion_logprobs(model, batch, config.sampling.temperature, with_entropy=True)
    old_logps = logps.detach()  # one update per batch: π_θ_old = π_θ
    advantages = advantages_of(batch, config, old_logps, ref_logps)
    scored["advantages"] = advantages  # kept with the caller's batch, for the parity check on fixed completions
    n_tok = mask.sum().clamp(min=1.0)
    metrics = {}
    if config.algorithm == "grpo":
        loss = grpo_loss(logps, old_logps, advantages, mask, ref_logps, config.beta, config.clip_eps,
                         config.clip_eps_high, config.importance_sampling_level, config.loss_type,
                         config.sampling.max_new_tokens, kl_bias_correction=config.kl_bias_correction)
        ratio = importance_ratio(logps.detach(), old_logps, mask, config.importance_sampling_level)
        clip = clip_fractions(ratio, advantages, mask, config.clip_eps, config.clip_eps_high)
        metrics.update({f"clip_ratio/{k}": v for k, v in clip.items()})
        if config.beta != 0.0:
            metrics["kl_token"] = (kl_k3(old_logps, ref_logps) * mask).sum() / n_tok
    else:
        loss = rloo_loss(logps, old_logps, advantages, mask, config.clip_eps, config.clip_eps_high)
        if config.beta != 0.0:
            metrics["kl_token"] = (kl_k1(old_logps, ref_logps) * mask).sum() / n_tok
    rewards = batch["rewards"]
    grouped = rewards.view(-1, config.num_generations)  # (B, G)
    lengths = batch["completion_mask"].sum(-1).float()  # (N,)
    metrics.update({
        "reward": rewards.mean(),
        "reward_std": rewards.std(),
        "reward_group_std": grouped.std(1).mean(),
        "frac_reward_zero_std": (grouped.std(1) < 1e-6).float().mean(),
        "entropy": (entropy * mask).sum() / n_tok,
        "completions/mean_length": lengths.mean(),
        "advantages/mean": advantages.mean(),
        "advantages/std": advantages.std(),
        "advantages/abs_max": advantages.abs().max(),
    })
    return loss, metrics


def step_fn(config: OnlineConfig):
    """``step_fn(model, batch)`` for ``rlcourse.train.train``."""
    return partial(online_step, config=config)


def trl_inputs(batch: dict) -> dict:
    """Our scored batch as the inputs dict TRL's GRPOTrainer._compute_loss expects (advantages included)."""
    return {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")} | {
        "num_items_in_batch": batch["completion_mask"].sum()}


def trl_online_config(config: OnlineConfig, train_config, output_dir, **kwargs):
    """A GRPOConfig or RLOOConfig that runs what ``config`` describes, from ``rlcourse.trl_runs.trl_config``.

    Set explicitly, whatever TRL's defaults: the sampling settings, G, β, ε and ε_high, one iteration per batch,
    prompts in dataset order (``shuffle_dataset=False``), the dataset's extra columns kept for the reward.
    """
    from rlcourse.trl_runs import trl_config

    s = config.sampling
    common = dict(num_generations=config.num_generations, max_completion_length=s.max_new_tokens,
                  temperature=s.temperature, top_p=s.top_p, top_k=0, beta=config.beta, epsilon=config.clip_eps,
                  epsilon_high=config.clip_eps_high, num_iterations=1, shuffle_dataset=False,
                  remove_unused_columns=False, disable_tqdm=True)
    if config.algorithm == "grpo":
        from trl import GRPOConfig

        cls = GRPOConfig
        common.update(loss_type=config.loss_type, importance_sampling_level=config.importance_sampling_level,
                      scale_rewards=config.scale_rewards, use_bias_correction_kl=config.kl_bias_correction)
    else:
        from trl import RLOOConfig

        cls = RLOOConfig
        common.update(normalize_advantages=config.normalize_advantages)
    common.update(kwargs)
    if train_config.batch_size != config.completions_per_step:
        raise ValueError(f"TrainConfig.batch_size={train_config.batch_size} must be the completions per step "
                         f"(prompts_per_step × G = {config.completions_per_step}), TRL's per_device_train_batch_size")
    return trl_config(cls, train_config, output_dir, **common)


def trl_metrics(log):
    """TRL's online log with its per-token KL renamed ``kl_token``, so a probe's ``kl`` (sequence KL on held-out
    prompts, the course's meaning) can be merged into the same rows without overwriting it."""
    for row in log.rows:
        if "kl" in row:
            row["kl_token"] = row.pop("kl")
    return log


def rerun_with_seeds(policy, tokenizer, task, config: OnlineConfig, train_config, start_adapters: dict, seeds,
                     trainer_cls, out_dir, gold_fn) -> dict[str, list]:
    """Train our loop and TRL's ``trainer_cls`` again from ``start_adapters``, once per seed in ``seeds``.

    A seed changes only the order of the training prompts (the task's train split shuffled with it), the
    rollouts' sampling and TRL's own seed: what separates two runs of the same recipe, so the spread of their
    gold gains is the run-to-run noise a claimed gain must beat (``evaluate.gain_over_runs``). Probes are left
    out to save time. ``gold_fn()`` evaluates the policy as it stands. Our runs see the "ref" adapter rebuilt
    from ``start_adapters`` when the policy had one; TRL's trainer is given the policy without it and makes its
    own, as in the notebooks' main runs. Logs go to ``out_dir/ours-<seed>`` and ``out_dir/trl-<seed>``.
    Returns {"ours": [(seed, log, gold), ...], "TRL": [...]}.
    """
    from dataclasses import replace
    from pathlib import Path

    from rlcourse.models import REF_ADAPTER, add_reference_adapter, remove_reference_adapter, restore_lora
    from rlcourse.train import train
    from rlcourse.trl_runs import run_trl

    out_dir = Path(out_dir)
    with_ref = REF_ADAPTER in policy.peft_config

    def back_to_start(ref: bool) -> None:
        remove_reference_adapter(policy)
        restore_lora(policy, start_adapters)
        if ref:  # a frozen copy of the start adapters, as before the main runs
            add_reference_adapter(policy)

    runs = {"ours": [], "TRL": []}
    for seed in seeds:
        rows = task.prompts("train").shuffle(seed=seed)
        tc = replace(train_config, seed=seed)

        back_to_start(with_ref)
        log = train(policy, Rollouts(policy, tokenizer, rows, task.reward, config, seed=seed), step_fn(config), tc,
                    out_dir / f"ours-{seed}", resume=False, progress=False)
        runs["ours"].append((seed, log, gold_fn()))

        back_to_start(False)  # TRL adds its own "ref" when it needs one
        trainer = trainer_cls(model=policy, reward_funcs=task.reward, train_dataset=rows, processing_class=tokenizer,
                              args=trl_online_config(config, tc, out_dir / f"trl-{seed}"))
        log = trl_metrics(run_trl(trainer))
        log.save(out_dir / f"trl-{seed}")
        runs["TRL"].append((seed, log, gold_fn()))
        del trainer

    back_to_start(with_ref)  # leave the policy as it came
    return runs
