"""The per-step metrics log of our training loops, and the glossary that defines every metric once.

Saved as JSON (the source of truth, reloaded on resume) and CSV (for spreadsheets), each written
atomically: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

GLOSSARY: dict[str, str] = {
    "step": "Optimizer steps completed (1 after the first update).",
    "loss": "The training loss of the step, as the method's loss function returns it (before the update).",
    "grad_norm": "L2 norm of the gradient over all trainable (LoRA) parameters, before clipping.",
    "learning_rate": "Learning rate used for the step.",
    "entropy": "Mean entropy (nats) of the policy's next-token distribution over completion tokens.",
    "mean_token_accuracy": "Fraction of completion tokens where the policy's most likely token is the target token.",
    "completion_tokens": "Completion tokens in the step's batch (the loss is averaged over these).",
    "num_tokens": "TRL's count: all (prompt + completion) tokens seen so far, cumulative.",
    "gold": "Mean gold reward of the task's programmatic metric on held-out prompts (never used for training "
            "in offline methods).",
    "kl": "KL(π_θ‖π_ref) in nats per sequence, estimated on completions sampled from the policy.",
    "step_time": "Wall-clock seconds of the step (machine-dependent: for benchmarks, never for tests).",
    "rewards/chosen": "DPO family: mean implicit reward β·log π_θ(y_w|x)/π_ref(y_w|x) of the chosen completions "
                      "(TRL's name).",
    "rewards/rejected": "DPO family: mean implicit reward β·log π_θ(y_l|x)/π_ref(y_l|x) of the rejected completions.",
    "rewards/margins": "DPO family: mean of rewards/chosen − rewards/rejected over the pairs of the step.",
    "rewards/accuracies": "DPO family: fraction of pairs whose chosen implicit reward exceeds the rejected one.",
    "logps/chosen": "DPO family: mean summed log π_θ(y_w|x) of the chosen completions (nats per sequence).",
    "logps/rejected": "DPO family: mean summed log π_θ(y_l|x) of the rejected completions (nats per sequence).",
    "margin_per_token": "DPO family: mean of (log π_θ/π_ref of y_w)/|y_w| − (log π_θ/π_ref of y_l)/|y_l|, the "
                        "per-token log-ratio margin that IPO (TRL's normalisation) pulls to 1/(2β).",
    "win_rate": "Paired gold win rate over the base model on held-out prompts: 1 per prompt where the trained "
                "policy's gold score is higher, 0.5 for a tie, 0 if lower, averaged.",
    "accuracy": "Reward model: fraction of the step's pairs whose chosen completion scores above the rejected one "
                "(TRL RewardTrainer's name).",
    "margin": "Reward model: mean of r(x, y_w) − r(x, y_l) over the step's pairs.",
    "mean_reward": "Reward model: mean score over the step's chosen and rejected sequences.",
    "min_reward": "Reward model: lowest score among the step's chosen and rejected sequences.",
    "max_reward": "Reward model: highest score among the step's chosen and rejected sequences.",
    "eval_accuracy": "Reward model: fraction of held-out pairs whose chosen completion scores above the rejected one.",
    "eval_spearman": "Reward model: Spearman rank correlation between the RM's score and the gold score over all "
                     "held-out completions (chosen and rejected).",
    "beta": "KL coefficient β in force at the step; it changes only under an adaptive KL controller "
            "(rlcourse.kl.AdaptiveKLController, lesson 10).",
    "expected_reward": "Exact expected reward E_π[r] of a categorical toy policy, summed over its answers "
                       "(no sampling; lesson 10).",
    "reward": "Online RL: mean reward of the completions sampled in the step (the training batch, before the update).",
    "reward_std": "Online RL: standard deviation of the rewards over all completions of the step.",
    "reward_group_std": "Online RL: mean over the step's prompts of the reward std within each prompt's group of G "
                        "completions (the spread GRPO and RLOO learn from; ours only).",
    "frac_reward_zero_std": "Online RL: share of the step's groups whose G rewards are all equal, so every "
                            "advantage in them is 0 and they teach nothing.",
    "completions/mean_length": "Online RL: mean completion length in tokens (the end-of-turn token included).",
    "clip_ratio/low_mean": "GRPO/RLOO: share of completion tokens with ρ < 1−ε and A < 0, whose gradient the clip removes.",
    "clip_ratio/high_mean": "GRPO/RLOO: share of completion tokens with ρ > 1+ε_high and A > 0, whose gradient the "
                            "clip removes.",
    "clip_ratio/region_mean": "GRPO/RLOO: share of completion tokens clipped on either side (0 with one update per batch).",
    "kl_token": "Online RL: mean per-token KL estimate on the step's completions, k3 for GRPO and k1 for RLOO (TRL "
                "logs it as `kl`; renamed so that `kl` keeps its held-out, per-sequence meaning).",
    "advantages/mean": "Online RL: mean advantage over the step's completions (0 for group-centred advantages).",
    "advantages/std": "Online RL: standard deviation of the step's advantages.",
    "advantages/abs_max": "Online RL: largest |advantage| in the step.",
    "sampling/sampling_logp_difference/mean": "Online RL (ours): mean |log π_sampler − log π_policy| over the "
                                              "step's sampled tokens: the rollout engine's merged copy against the "
                                              "4-bit policy (TRL logs the same with vLLM).",
    "sampling/sampling_logp_difference/max": "Online RL (ours): the largest such gap in the step.",
    "sampling/importance_sampling_ratio/min": "GRPO with a sampler correction: smallest truncated importance weight "
                                              "π_policy / π_sampler (per token or per sequence).",
    "sampling/importance_sampling_ratio/mean": "GRPO with a sampler correction: mean importance weight.",
    "sampling/importance_sampling_ratio/max": "GRPO with a sampler correction: largest importance weight.",
    "time/batch": "Seconds spent producing the step's batch (online: sync, prefill, decode, reward; "
                  "machine-dependent).",
    "time/sync": "Online (ours): seconds copying the policy's weights into the sampler (LoRA merged).",
    "time/prefill": "Online (ours): seconds of the prompts' forward in sampling, once per prompt.",
    "time/decode": "Online (ours): seconds decoding the completions token by token.",
    "time/reward": "Online (ours): seconds scoring the completions.",
    "time/reference_forward": "Online (ours): seconds of the reference policy's forward (0 when β = 0).",
    "time/forward": "Seconds of the step's loss: its forwards (policy and reference) and the loss arithmetic.",
    "time/backward": "Seconds of the backward pass.",
    "time/optimizer": "Seconds of gradient clipping and the optimizer's update.",
    "nll_loss": "CPO/ORPO: the behaviour-cloning term, mean NLL of the chosen sequences' tokens (CPO: completion "
                "tokens; ORPO, as TRL: prompt and completion tokens). TRL logs 0 when CPO's cpo_alpha is 0.",
    "or_loss": "ORPO: mean odds-ratio loss −log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x)) over the pairs (log 2 "
               "when both completions are equally likely).",
    "log_odds_ratio": "ORPO, TRL's name for mean log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x)) = −or_loss: a "
                      "log-sigmoid, not the log odds ratio.",
    "log_odds_chosen": "ORPO, TRL's name for the mean log odds ratio log odds_θ(y_w|x) − log odds_θ(y_l|x) itself.",
    "z0": "KTO: the reference point ẑ₀ = max(0, mean log π_θ(y'|x)/π_ref(y'|x)) over the batch's mismatched pairs "
          "(TRL logs it as 'kl').",
    "delta": "BCO: the reward shift δ, the running mean of every implicit reward β·log π_θ/π_ref seen so far.",
    "dro_loss": "DRO: the joint objective ½ mean (r − V(x) − τ log π_θ/π_ref)² on the step's batch, before the updates.",
    "value_loss": "DRO: the value half's loss ½ mean (r − V(x) − τ sg(log π_θ/π_ref))².",
    "advantage": "DRO: mean of r − V(x) over the batch, with the value after its update.",
    "logratio": "DRO: mean log π_θ(y|x)/π_ref(y|x) per completion (nats) over the batch.",
}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX and Windows


class MetricsLog:
    """A list of per-step metric dicts, with save/load. ``log.rows`` is the data; ``log[key]`` a column."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows: list[dict] = list(rows or [])

    def append(self, **metrics) -> None:
        self.rows.append({k: float(v) if hasattr(v, "item") else v for k, v in metrics.items()})

    def __getitem__(self, key: str) -> list:
        return [r.get(key) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def merge(self, rows: list[dict]) -> "MetricsLog":
        """Fold rows into the log by their "step" (e.g. probe results), keeping steps in order."""
        by_step = {r["step"]: dict(r) for r in self.rows}
        for r in rows:
            by_step.setdefault(r["step"], {}).update(r)
        self.rows = [by_step[k] for k in sorted(by_step)]
        return self

    def at(self, step: int) -> dict:
        """The row of ``step`` ({} if none)."""
        return next((r for r in self.rows if r.get("step") == step), {})

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update(dict.fromkeys(r))
        return list(seen)

    def save(self, folder: str | Path, name: str = "metrics") -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / f"{name}.json", json.dumps(self.rows, indent=1))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.keys())
        writer.writeheader()
        writer.writerows(self.rows)
        _atomic_write(folder / f"{name}.csv", buf.getvalue())

    @classmethod
    def load(cls, folder: str | Path, name: str = "metrics") -> "MetricsLog":
        return cls(json.loads((Path(folder) / f"{name}.json").read_text()))


def from_trl_history(log_history: list[dict]) -> MetricsLog:
    """TRL's ``trainer.state.log_history`` as a MetricsLog: one row per logged training step, the run's
    closing summary (train_runtime, ...) left out."""
    return MetricsLog([dict(r) for r in log_history if "loss" in r and "train_runtime" not in r])


def preference_metrics(r_chosen, r_rejected, logp_chosen, logp_rejected) -> dict:
    """What TRL's preference trainers log about a batch of pairs, as batch means: ``rewards/*``, the implicit
    rewards of the chosen and rejected completions, their margin and how often the chosen one wins; ``logps/*``, the
    policy's log-probs of both. Each argument is (B,); the results carry no gradient."""
    r_chosen, r_rejected = r_chosen.detach(), r_rejected.detach()
    return {
        "rewards/chosen": r_chosen.mean(),
        "rewards/rejected": r_rejected.mean(),
        "rewards/margins": (r_chosen - r_rejected).mean(),
        "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
        "logps/chosen": logp_chosen.detach().mean(),
        "logps/rejected": logp_rejected.detach().mean(),
    }
