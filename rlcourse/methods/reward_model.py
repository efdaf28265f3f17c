"""Reward models: a scalar head on the 4-bit LoRA transformer, trained on preference pairs.

The losses live in ``rlcourse.losses.reward``; this module prepares the pairs the way TRL 1.16's
``RewardTrainer`` does, turns a batch into (loss, metrics) for ``rlcourse.train.train``, scores held-out
completions, and saves and reloads the trained reward model so that later lessons (PPO, reward hacking)
can use it: ``load_or_train_reward_model(profile)`` returns it, training it first when it is missing.

What ``RewardTrainer`` does, and so what we do:
- a pair becomes two sequences, prompt + chosen and prompt + rejected, each through the chat template
  (no completion mask: the reward model reads the whole conversation);
- pairs where either sequence is longer than ``max_length`` are *dropped*, not truncated;
- a batch of B pairs is one forward pass over 2B sequences, the B chosen ones first, right-padded;
- a sequence's reward is the score head applied to the hidden state of its last token.

Where we depart from TRL: we read that last token from the attention mask and apply the head to it alone
(``sequence_rewards``); transformers applies the head at every position and then picks the last position
whose token is not the pad token. The two agree on conversational data (SmolLM2's template ends every
conversation with "<|im_end|>\\n", and "\\n" is not the pad token). On plain-text pairs they part: TRL appends
the EOS token, which for SmolLM2 is also the pad token, so transformers reads the token before it, and we read
the EOS itself. Tests check both. We also compute the loss in fp32 on the bf16 rewards, where TRL computes it
in the rewards' dtype.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rlcourse.evaluate import spearman
from rlcourse.logprobs import to_model_device
from rlcourse.losses.reward import reward_model_loss
from rlcourse.train import _replace_dir, batch_indices

SLUG = "04_reward-models"
"""The lesson's build folder: artifacts live in ``build/04_reward-models/<profile>/``."""


@dataclass(frozen=True)
class RewardModelConfig:
    """How the reward model is trained, beyond the profile's steps, batch size and learning rate."""

    margin_scale: float = 0.0
    """Llama 2's margin: m = margin_scale · (gold score of chosen − gold score of rejected), TRL's ``margin``
    column. 0 means no margin column at all (plain Bradley–Terry)."""
    center_rewards_coefficient: float | None = 0.01
    """η of the centering term η·mean((r_w + r_l)²), TRL's ``center_rewards_coefficient`` (its recommended
    value is 0.01). None switches it off."""
    max_length: int = 1024
    """Pairs with a sequence longer than this many tokens are dropped (TRL's ``max_length``, also 1024)."""


# ── data ─────────────────────────────────────────────────────────────────────────────────────────────


def add_margin(dataset, margin_scale: float):
    """The preference dataset with TRL's ``margin`` column, m = margin_scale · (score_chosen − score_rejected).

    Returns the dataset unchanged when ``margin_scale`` is 0. Raises a ValueError naming the row when a
    gold score is missing or not a number.
    """
    if not margin_scale:
        return dataset
    for i, row in enumerate(dataset):
        for field in ("score_chosen", "score_rejected"):
            if not isinstance(row.get(field), (int, float)):
                raise ValueError(f"row {i}: field {field!r} is {row.get(field)!r}, but a margin needs both gold "
                                 f"scores as numbers. Fix: add them, or set margin_scale=0 (no margin).")
    return dataset.map(lambda r: {"margin": margin_scale * (r["score_chosen"] - r["score_rejected"])})


def tokenize_pair(tokenizer, row: dict) -> dict:
    """``chosen_ids`` and ``rejected_ids`` of one preference row, as ``RewardTrainer`` builds them.

    Conversational rows: the chat template over prompt + chosen (and prompt + rejected), whole, with no
    generation prompt. Standard rows: plain text, prompt + completion, with the EOS token appended when
    missing. A ``margin`` value is carried along.
    """
    for field in ("chosen", "rejected"):
        if field not in row:
            raise ValueError(f"a preference row needs {field!r}; this one has {sorted(row)}. Fix: see lesson 02's "
                             f"preference format (prompt, chosen, rejected).")
    prompt = row.get("prompt")
    out = {}
    for field in ("chosen", "rejected"):
        completion = row[field]
        if isinstance(completion, list):  # conversational
            messages = (prompt or []) + completion
            out[f"{field}_ids"] = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            text = (prompt or "") + completion
            if not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token
            out[f"{field}_ids"] = tokenizer(text)["input_ids"]
    if "margin" in row:
        out["margin"] = float(row["margin"])
    return out


def tokenize_pairs(dataset, tokenizer, max_length: int | None = None) -> list[dict]:
    """Every row tokenized by ``tokenize_pair``, in order; pairs longer than ``max_length`` are dropped (as
    TRL does), with a message saying how many. Raises a ValueError when none is left."""
    rows = [tokenize_pair(tokenizer, row) for row in dataset]
    if max_length is None:
        return rows
    kept = [r for r in rows if len(r["chosen_ids"]) <= max_length and len(r["rejected_ids"]) <= max_length]
    if len(kept) < len(rows):
        print(f"dropped {len(rows) - len(kept)} of {len(rows)} pairs longer than max_length={max_length} tokens")
    if not kept:
        raise ValueError(f"every pair is longer than max_length={max_length} tokens. Fix: raise max_length.")
    return kept


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B tokenized pairs -> one right-padded batch of 2B sequences, the B chosen ones first.

    Returns ``input_ids`` and ``attention_mask``, (2B, T), and ``margin``, (B,), when the pairs have one.
    """
    from trl.trainer.utils import pad

    ids = [torch.tensor(e["chosen_ids"]) for e in examples] + [torch.tensor(e["rejected_ids"]) for e in examples]
    batch = {
        "input_ids": pad(ids, padding_value=pad_token_id),  # (2B, T)
        "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0),  # (2B, T)
    }
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)  # (B,)
    return batch


def batch_fn(tokenized: list[dict], batch_size: int, pad_token_id: int):
    """step -> collated batch of ``batch_size`` pairs, walking the pairs in order (TRL's sequential sampler)."""
    return lambda step: collate_pairs([tokenized[i] for i in batch_indices(step, batch_size, len(tokenized))],
                                      pad_token_id)


def training_pairs(task, n: int, batch_size: int, seed: int = 0):
    """The pairs both runs train on: the task's train preferences, shuffled with ``seed``, the first
    ``min(n, all)`` rounded down to a multiple of ``batch_size`` (so that both runs wrap round to the same
    pair when a run is longer than an epoch)."""
    rows = task.preferences("train").shuffle(seed=seed)
    n = min(n, len(rows)) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(rows)} training pairs")
    return rows.select(range(n))


# ── the model's scores and the training step ─────────────────────────────────────────────────────────


def _backbone_and_head(model):
    """The transformer and the score head of a sequence-classification model (plain or wrapped by peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.score


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) of each right-padded sequence: the score head on the hidden state of its last real token.

    input_ids, attention_mask: (N, T). Returns (N,), in the head's compute dtype (bf16 under autocast).
    """
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (N, T, H)
    last = attention_mask.sum(-1) - 1  # (N,): position of the last real token (right padding)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)
    return head(last_hidden).squeeze(-1)  # (N, 1) -> (N,)


def reward_step(model, batch: dict, center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict]:
    """One step's loss and the metrics ``RewardTrainer`` logs (accuracy, margin, min/mean/max reward)."""
    batch = to_model_device(model, batch)
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"]).float()  # (2B,)
    chosen, rejected = rewards.chunk(2)  # (B,), (B,)
    loss = reward_model_loss(chosen, rejected, batch.get("margin"), center_rewards_coefficient)
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "mean_reward": rewards.mean(),
            "min_reward": rewards.min(),
            "max_reward": rewards.max(),
        }
    return loss, metrics


def step_fn(config: RewardModelConfig):
    return partial(reward_step, center_rewards_coefficient=config.center_rewards_coefficient)


# ── scoring held-out completions ─────────────────────────────────────────────────────────────────────


def _autocast(model):
    """bf16 autocast in this machine's bf16 mode (``rlcourse.precision``), and wherever the score head is bf16 (a
    model trained in bf16 mode: TRL or our loop cast the head, README pitfall 2, and it then needs bf16 inputs);
    otherwise fp32, as the model was trained."""
    from rlcourse.precision import current

    _, head = _backbone_and_head(model)
    if current().bf16 or any(p.dtype == torch.bfloat16 for p in head.parameters()):
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_pairs(model, tokenizer, rows, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The reward model's scores of the chosen and of the rejected completion of each row: two (n,) arrays."""
    tokenized = [tokenize_pair(tokenizer, row) for row in rows]
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(tokenized), batch_size):
        batch = collate_pairs(tokenized[start:start + batch_size], tokenizer.pad_token_id)
        with _autocast(model):
            r = sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        c, j = r.cpu().chunk(2)
        chosen.append(c)
        rejected.append(j)
    return torch.cat(chosen).numpy(), torch.cat(rejected).numpy()


@dataclass
class HeldOut:
    """A reward model's scores on held-out pairs, beside their gold scores."""

    chosen: np.ndarray
    """RM score of each pair's chosen completion, (n,)."""
    rejected: np.ndarray
    """RM score of each pair's rejected completion, (n,)."""
    gold_chosen: np.ndarray
    """Gold score of each chosen completion, (n,)."""
    gold_rejected: np.ndarray
    """Gold score of each rejected completion, (n,)."""

    @property
    def accuracy(self) -> float:
        """Share of pairs where the RM scores the chosen completion above the rejected one."""
        return float(np.mean(self.chosen > self.rejected))

    @property
    def spearman(self) -> float:
        """Rank correlation between RM score and gold score over all 2n held-out completions."""
        return spearman(np.concatenate([self.chosen, self.rejected]),
                        np.concatenate([self.gold_chosen, self.gold_rejected]))

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "spearman": self.spearman, "n_pairs": len(self.chosen),
                "mean_margin": float(np.mean(self.chosen - self.rejected))}

    def __str__(self) -> str:
        return (f"held-out accuracy {self.accuracy:.3f}, Spearman ρ(RM, gold) {self.spearman:+.3f} "
                f"on {len(self.chosen)} pairs")


def heldout_eval(model, tokenizer, rows, batch_size: int = 16) -> HeldOut:
    """Score the chosen and rejected completions of ``rows`` (with ``score_chosen``/``score_rejected``)."""
    rows = list(rows)
    chosen, rejected = score_pairs(model, tokenizer, rows, batch_size)
    return HeldOut(chosen, rejected, np.array([r["score_chosen"] for r in rows], dtype=float),
                   np.array([r["score_rejected"] for r in rows], dtype=float))


def make_probe(tokenizer, rows, batch_size: int = 16):
    """model -> {"eval_accuracy", "eval_spearman"} on held-out pairs: for ``train``'s and TRL's probes."""
    rows = list(rows)

    def probe(model) -> dict:
        res = heldout_eval(model, tokenizer, rows, batch_size)
        return {"eval_accuracy": res.accuracy, "eval_spearman": res.spearman}

    return probe


def show_pairs(rows, results: dict[str, HeldOut], k: int = 3, width: int = 160) -> None:
    """Print the first ``k`` held-out pairs: each completion with its gold score and every model's RM score."""
    import textwrap

    from rlcourse.tasks.base import message_text

    rows = list(rows)
    for i in range(min(k, len(rows))):
        print(f"── prompt: {message_text(rows[i]['prompt'])}")
        for side in ("chosen", "rejected"):
            scores = "  ".join(f"{name} {getattr(res, side)[i]:+.2f}" for name, res in results.items())
            gold = rows[i][f"score_{side}"]
            text = textwrap.shorten(message_text(rows[i][side]).replace("\n", " "), width=width, placeholder=" …")
            print(f"   {side:>8} gold {gold:.2f} | RM: {scores}\n            {text}")


def plot_scores_vs_gold(results: dict[str, HeldOut], path=None):
    """One scatter panel per model: RM score against gold score of every held-out completion."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        ax.scatter(res.gold_chosen, res.chosen, s=14, label="chosen", alpha=0.7)
        ax.scatter(res.gold_rejected, res.rejected, s=14, marker="x", label="rejected", alpha=0.7)
        ax.set_title(f"{name}: acc {res.accuracy:.2f}, ρ {res.spearman:+.2f}", fontsize=10)
        ax.set_xlabel("gold score")
        ax.set_ylabel("RM score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ── the artifact later lessons load ──────────────────────────────────────────────────────────────────


def run_name(profile: str, config: RewardModelConfig = RewardModelConfig()) -> str:
    """The run's folder name under ``build/04_reward-models/``: the profile, plus the settings that differ
    from ``RewardModelConfig()`` (so a variant never overwrites the default reward model)."""
    default = RewardModelConfig()
    changed = [f"{k}{v}" for k, v in asdict(config).items() if v != getattr(default, k)]
    return "-".join([profile, *changed])


def artifact_dir(profile: str, config: RewardModelConfig = RewardModelConfig()) -> Path:
    """Where the trained reward model lives: ``build/04_reward-models/<run_name>/reward_model``
    (``build/04_reward-models/cpu/reward_model`` for the cpu profile with the default settings)."""
    from rlcourse.paths import build_dir

    return build_dir(SLUG, run_name(profile, config)) / "reward_model"


def save_reward_model(model, folder: str | Path, meta: dict) -> None:
    """The adapter and score head (peft format) plus ``reward_model.json`` (``meta``), written atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "reward_model.json").write_text(json.dumps(meta, indent=1))
    _replace_dir(tmp, folder)


def load_saved_reward_model(folder: str | Path):
    """(model, meta) from a folder written by ``save_reward_model``; the model is frozen and in eval mode."""
    from peft import PeftModel

    from rlcourse.models import load_reward_model

    folder = Path(folder)
    meta = json.loads((folder / "reward_model.json").read_text())
    model = PeftModel.from_pretrained(load_reward_model(seed=meta["seed"]), folder)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def train_reward_model(profile: str = "cpu", seed: int = 0, config: RewardModelConfig = RewardModelConfig(),
                       folder: str | Path | None = None, task_name: str = "concise"):
    """Train a reward model as notebook 04 does (our loop, the profile's size), evaluate it on the held-out
    pairs and save it to ``folder`` (default ``artifact_dir(profile)``). Returns (model, meta).

    The run's checkpoints go to ``<folder>/../ours``; an interrupted run resumes from them.
    """
    from rlcourse.models import LoraSettings, load_reward_model, load_tokenizer
    from rlcourse.profiles import get_profile
    from rlcourse.tasks import get_task
    from rlcourse.train import train

    P = get_profile(profile)
    folder = Path(folder) if folder is not None else artifact_dir(P.name, config)
    task, tok = get_task(task_name), load_tokenizer()
    model = load_reward_model(lora=LoraSettings(), seed=seed, tokenizer=tok)
    held_out = eval_pairs(task, P.n_eval)
    before = heldout_eval(model, tok, held_out, P.eval_batch_size)
    rows = add_margin(training_pairs(task, P.n_train, P.batch_size, seed), config.margin_scale)
    tc = train_config(P, seed)
    log = train(model, batch_fn(tokenize_pairs(rows, tok, config.max_length), P.batch_size, tok.pad_token_id),
                step_fn(config), tc, folder.parent / "ours", resume=True)
    after = heldout_eval(model, tok, held_out, P.eval_batch_size)
    meta = artifact_meta(P.name, seed, config, task_name, tc, before, after, log)
    save_reward_model(model, folder, meta)
    model.eval()
    return model, meta


def eval_pairs(task, n: int):
    """The first ``n`` held-out preference pairs of the task (all of them when there are fewer)."""
    rows = task.preferences("eval")
    return rows.select(range(min(n, len(rows))))


def train_config(P, seed: int):
    """Our loop's settings for a profile (the TRL run gets the same through ``rlcourse.trl_runs.trl_config``)."""
    from rlcourse.train import TrainConfig

    return TrainConfig(steps=P.steps, batch_size=P.batch_size, learning_rate=P.learning_rate, seed=seed,
                       checkpoint_every=P.checkpoint_every)


def artifact_meta(profile: str, seed: int, config: RewardModelConfig, task_name: str, train_cfg,
                  before: HeldOut, after: HeldOut, log) -> dict:
    """What ``reward_model.json`` records: how the model was trained and how well it ranks held-out pairs."""
    return {"profile": profile, "seed": seed, "task": task_name, "config": asdict(config),
            "train": asdict(train_cfg), "heldout_before": before.summary(), "heldout": after.summary(),
            "final_train_loss": log.rows[-1]["loss"] if len(log) else None}


def load_or_train_reward_model(profile: str = "cpu", seed: int = 0, config: RewardModelConfig = RewardModelConfig(),
                               folder: str | Path | None = None, task_name: str = "concise"):
    """The trained reward model of lesson 04, as (model, meta): loaded from ``folder`` (default
    ``build/04_reward-models/<profile>/reward_model``), or trained there first when it is missing.

    Raises a ValueError when the saved model was trained with other settings than those asked for, rather
    than overwriting it.
    """
    from rlcourse.profiles import get_profile

    name = get_profile(profile).name
    folder = Path(folder) if folder is not None else artifact_dir(name, config)
    if (folder / "reward_model.json").exists():
        model, meta = load_saved_reward_model(folder)
        wanted = {"profile": name, "seed": seed, "config": asdict(config), "task": task_name}
        saved = {k: meta.get(k) for k in wanted}
        if saved != wanted:
            raise ValueError(f"{folder} holds a reward model trained with {saved}, not {wanted}. Fix: ask for the "
                             f"saved settings, pass another folder, or move that folder away to train a new one.")
        return model, meta
    print(f"No reward model in {folder}: training one ({name} profile) as notebook {SLUG} does.")
    return train_reward_model(name, seed, config, folder, task_name)
