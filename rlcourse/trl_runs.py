"""Run a TRL trainer configured like our loop, and get its per-step log back.

``trl_config`` fills any TRL config (SFTConfig, DPOConfig, GRPOConfig, ...) with the settings that make
TRL's run comparable with ours, each chosen on purpose:
- the same seed, steps, batch size, constant learning rate, clipping and weight decay;
- the same data order: TRL walks the dataset sequentially; both sides get the same pre-shuffled rows;
- bf16 autocast on CPU via ``use_cpu=True`` (TRL's default ``bf16=True`` fails on CPU otherwise,
  README pitfall 3), and no gradient checkpointing (slower here, README pitfall 4);
- logging every step, no external loggers, no checkpoints of TRL's own (ours are enough).
"""

from __future__ import annotations

import os

import torch

from rlcourse.metrics import MetricsLog, from_trl_history
from rlcourse.train import TrainConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def trl_config(config_cls, train: TrainConfig, output_dir, **method_kwargs):
    """A TRL ``config_cls`` instance matching ``train``; ``method_kwargs`` add the method's own options."""
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
        bf16=train.bf16 and (not on_gpu or torch.cuda.is_bf16_supported()),
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


def run_trl(trainer) -> MetricsLog:
    """Train and return TRL's per-step log history (one row per step, as TRL names the metrics)."""
    trainer.train()
    return from_trl_history(trainer.state.log_history)
