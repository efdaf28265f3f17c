"""The trained reward model of lesson 04 as a file later lessons load: ``load_or_train_reward_model(profile)``.

Notebook 04 trains a reward model (``rlcourse.methods.reward_model``) and saves its adapter and score head to
``build/04_reward-models/<run_name>/reward_model/`` (peft's format) with ``reward_model.json``: the profile, seed,
settings, and the held-out accuracy and Spearman ρ before and after training (``rlcourse.reward_eval``). Later
lessons (PPO, reward hacking) call ``load_or_train_reward_model``, which loads it, frozen, or trains it first the
way notebook 04 does when it is missing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from rlcourse.methods.reward_model import Settings, add_margin, batches, step_fn, training_pairs
from rlcourse.reward_eval import HeldOut, heldout_eval
from rlcourse.train import _replace_dir

SLUG = "04_reward-models"
"""The lesson's build folder: artifacts live in ``build/04_reward-models/<profile>/``."""


def run_name(profile: str, config: Settings = Settings()) -> str:
    """The run's folder name under ``build/04_reward-models/``: the profile, plus the settings that differ
    from ``Settings()`` (so a variant never overwrites the default reward model)."""
    default = Settings()
    changed = [f"{k}{v}" for k, v in asdict(config).items() if v != getattr(default, k)]
    return "-".join([profile, *changed])


def artifact_dir(profile: str, config: Settings = Settings()) -> Path:
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


def train_reward_model(profile: str = "cpu", seed: int = 0, config: Settings = Settings(),
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
    log = train(model, batches(rows, tok, P.batch_size, config.max_length), step_fn(config), tc, folder.parent / "ours",
                resume=True)
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


def artifact_meta(profile: str, seed: int, config: Settings, task_name: str, train_cfg,
                  before: HeldOut, after: HeldOut, log) -> dict:
    """What ``reward_model.json`` records: how the model was trained and how well it ranks held-out pairs."""
    return {"profile": profile, "seed": seed, "task": task_name, "config": asdict(config),
            "train": asdict(train_cfg), "heldout_before": before.summary(), "heldout": after.summary(),
            "final_train_loss": log.rows[-1]["loss"] if len(log) else None}


def load_or_train_reward_model(profile: str = "cpu", seed: int = 0, config: Settings = Settings(),
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
