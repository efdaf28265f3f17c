"""The from-scratch training loop shared by every offline method: short on purpose.

    for step in range(start, steps):
        batch = batches(step)                 # the same data order TRL sees (sequential over a seeded shuffle)
        loss, metrics = step_fn(model, batch) # the method: a pure loss function on log-probs
        loss.backward(); clip; optimizer.step()

Everything else here is bookkeeping a real run needs: seeding (same seed -> identical CPU metrics), this
machine's precision (``rlcourse.precision``: where bf16 is native, bf16 autocast with bf16 LoRA parameters, what
TRL does for a quantized model, README pitfall 2; elsewhere fp32 throughout, and TRL's side follows), and atomic
checkpoints (adapter, optimizer state, RNG state, metrics) every ``checkpoint_every`` steps, so an interrupted run
resumes where it stopped and never loses its outputs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from rlcourse.metrics import MetricsLog
from rlcourse.models import as_trl_trains, is_quantized
from rlcourse.precision import current as current_precision

if TYPE_CHECKING:  # rlcourse.batches loads TRL's collation helpers: not needed to import the loop
    from rlcourse.batches import Batch


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of our loop; ``rlcourse.trl_runs.trl_config`` builds TRL's matching config."""

    steps: int
    """Optimizer steps."""
    batch_size: int
    """Examples per step (no gradient accumulation)."""
    learning_rate: float
    """Constant AdamW learning rate (no warm-up, no decay: easier to compare and to reason about)."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold on the global L2 norm (TRL's default)."""
    weight_decay: float = 0.0
    """AdamW weight decay (TRL's default)."""
    seed: int = 0
    """Seeds Python, NumPy and torch at the start of the run."""
    bf16: bool = field(default_factory=lambda: current_precision().bf16)
    """bf16 autocast, and bf16 trainable parameters for a quantized model (as TRL does); False: fp32 throughout.
    Default: this machine's precision, bf16 only where it is native (``rlcourse.precision``, ``$RLCOURSE_DTYPE``)."""
    checkpoint_every: int = 10
    """Steps between checkpoints (a final checkpoint is always written)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into ``final`` so that at every instant one complete copy exists on disk."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, folder: Path) -> None:
    """The trained LoRA adapter (peft format: ``PeftModel.from_pretrained`` reloads it), written atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _replace_dir(tmp, folder)


def _save_checkpoint(out_dir: Path, model, optimizer, log: MetricsLog, step: int, config: TrainConfig,
                     step_fn=None) -> None:
    tmp = out_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter")  # every adapter: "default" at the top, others (e.g. "ref") in subfolders
    state = {"optimizer": optimizer.state_dict(), "rng": _rng_state()}
    if hasattr(step_fn, "state_dict"):  # a step with state of its own (BCO's δ, DRO's values)
        state["step_fn"] = step_fn.state_dict()
    torch.save(state, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "config": asdict(config)}))
    _replace_dir(tmp, out_dir / "checkpoint")
    log.save(out_dir)  # metrics also live beside the checkpoint, readable while the run goes on


def _load_checkpoint(out_dir: Path, model, optimizer, config: TrainConfig,
                     step_fn=None) -> tuple[int, MetricsLog] | None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = out_dir / "checkpoint"
    if not folder.exists() and (out_dir / "checkpoint.old").exists():  # crashed between the two renames
        folder = out_dir / "checkpoint.old"
    if not folder.exists():
        return None
    progress = json.loads((folder / "progress.json").read_text())
    saved = {k: v for k, v in progress["config"].items() if k not in ("steps", "checkpoint_every")}
    wanted = {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every")}
    if saved != wanted:
        raise ValueError(
            f"{out_dir} holds a checkpoint of a run with a different configuration ({saved}), not {wanted}. "
            f"Fix: pass another out_dir, or resume=False to start over (the old run is kept under a .bak name)."
        )
    if progress["step"] > config.steps:
        raise ValueError(f"{out_dir} holds a run of {progress['step']} steps, more than the {config.steps} asked; "
                         f"pass another out_dir or resume=False.")
    set_peft_model_state_dict(model, load_file(folder / "adapter" / "adapter_model.safetensors"))
    for name in getattr(model, "peft_config", {}):  # e.g. a TR-DPO reference that moved during training
        other = folder / "adapter" / name / "adapter_model.safetensors"
        if name != "default" and other.exists():
            set_peft_model_state_dict(model, load_file(other), adapter_name=name)
    state = torch.load(folder / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if "step_fn" in state:
        if not hasattr(step_fn, "load_state_dict"):
            raise ValueError(f"{out_dir} holds a checkpoint whose step function had state, and this one cannot take "
                             "it back. Fix: resume with the same step function, or resume=False to start over.")
        step_fn.load_state_dict(state["step_fn"])
    _set_rng_state(state["rng"])
    log = MetricsLog([r for r in json.loads((out_dir / "metrics.json").read_text()) if r["step"] <= progress["step"]])
    return progress["step"], log


def train(
    model,
    batches: Callable[[int], Batch],
    step_fn: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict]],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    probe: Callable[[torch.nn.Module], dict] | None = None,
    probe_at: set[int] = frozenset(),
) -> MetricsLog:
    """Train ``model``'s trainable parameters; return the per-step metrics (also saved under ``out_dir``).

    batches(step) -> the batch of that step (``rlcourse.batches``; a method module's ``batches``).
    step_fn(model, batch) -> (loss, metrics dict); a step with state of its own (a class: BCO's, DRO's) exposes
    ``state_dict()`` / ``load_state_dict()``, which checkpoints save and restore.
    Checkpoints hold every adapter of the model, so a reference adapter that training moves resumes too.
    With ``resume`` an unfinished run in ``out_dir`` continues from its last checkpoint, and a finished one
    is returned as is; ``resume=False`` moves an existing run aside (``out_dir.bak-<time>``), never deletes it.
    The final adapter is saved to ``out_dir/adapter``. ``probe(model) -> dict`` (e.g. gold reward and KL,
    see ``rlcourse.probe``) runs before the steps in ``probe_at`` (0 = before training); its results are
    merged into the log's rows of those steps.
    """
    out_dir = Path(out_dir)
    if not resume and out_dir.exists():
        os.replace(out_dir, out_dir.with_name(f"{out_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    if is_quantized(model):
        as_trl_trains(model, config.bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    start, log = 0, MetricsLog()
    restored = _load_checkpoint(out_dir, model, optimizer, config, step_fn) if resume else None
    if restored is not None:
        start, log = restored
        if start:
            print(f"Resuming from the checkpoint at step {start} in {out_dir}")

    device_type = next(model.parameters()).device.type
    if probe is not None and start == 0 and 0 in probe_at:
        log.merge([{"step": 0, **probe(model)}])
    model.train()
    bar = tqdm(range(start, config.steps), desc="training (ours)", disable=not progress,
               initial=start, total=config.steps)
    for step in bar:
        t0 = time.perf_counter()
        batch = batches(step)
        t1 = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, metrics = step_fn(model, batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        # where the step's time went (the bench's breakdown): the batch, the loss's forward, backward, optimizer
        timings = {"time/batch": t1 - t0, "time/forward": t2 - t1, "time/backward": t3 - t2, "time/optimizer": t4 - t3}
        log.append(step=step + 1, loss=loss.detach(), grad_norm=grad_norm, learning_rate=config.learning_rate,
                   **metrics, **timings, step_time=t4 - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if probe is not None and step + 1 in probe_at:
            log.merge([{"step": step + 1, **probe(model)}])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save_checkpoint(out_dir, model, optimizer, log, step + 1, config, step_fn)
    if start < config.steps or not (out_dir / "adapter").exists():
        save_adapter(model, out_dir / "adapter")
    log.save(out_dir)
    return log
