"""Run a TRL trainer configured like our loop, and get its per-step log back.

``trl_config`` fills any TRL config (SFTConfig, DPOConfig, GRPOConfig, ...) with the settings that make
TRL's run comparable with ours, each chosen on purpose:
- the same seed, steps, batch size, constant learning rate, clipping and weight decay;
- the same data order: TRL walks the dataset sequentially; both sides get the same pre-shuffled rows;
- the same precision (``rlcourse.precision``): where bf16 is native, bf16 autocast (on CPU via ``use_cpu=True``:
  TRL's default ``bf16=True`` fails on CPU otherwise, README pitfall 3); elsewhere ``bf16=False`` and, once the
  trainer is built, its adapters cast back to fp32 (``match_precision``: TRL casts a quantized model's LoRA
  parameters to bf16 whatever ``bf16`` says, README pitfall 12);
- no gradient checkpointing (slower here, README pitfall 4);
- logging every step, no external loggers, no checkpoints of TRL's own (ours are enough).
"""

from __future__ import annotations

import os

import torch

from rlcourse.metrics import MetricsLog, from_trl_history
from rlcourse.models import as_trl_trains, is_quantized
from rlcourse.train import TrainConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def trl_config(config_cls, train: TrainConfig, output_dir, **method_kwargs):
    """A TRL ``config_cls`` instance matching ``train`` (its precision too: ``train.bf16``); ``method_kwargs`` add the
    method's own options. Pass the trainer built from it through ``match_precision`` (``run_trl`` does)."""
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=train.steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=train.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim="adamw_torch",
        seed=train.seed,
        data_seed=train.seed,
        train_sampling_strategy="sequential",
        bf16=train.bf16,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    kwargs.update(method_kwargs)
    return config_cls(**kwargs)


def match_precision(trainer):
    """Undo TRL's bf16 cast of a quantized model's adapters when the run is fp32 (``bf16=False``), so TRL trains
    what our loop trains (README pitfall 12; twice as slow otherwise, and not comparable): ``as_trl_trains``, the
    same rounding our loop applies, also to adapters restored after the trainer was built. Returns the trainer."""
    if is_quantized(trainer.model):
        as_trl_trains(trainer.model, trainer.args.bf16)
    return trainer


def run_trl(trainer) -> MetricsLog:
    """Train and return TRL's per-step log history (one row per step, as TRL names the metrics), in the precision
    of the trainer's config (``match_precision``)."""
    match_precision(trainer).train()
    return from_trl_history(trainer.state.log_history)
