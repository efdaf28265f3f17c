"""Benchmark rows for GRPO: our loop vs TRL's GRPOTrainer on the same prompts (see rlcourse.bench).

``batch_size`` counts completions, as TRL's ``per_device_train_batch_size`` does: batch_size / G prompts
per step, G = 4 completions each, at most 16 new tokens. On a CPU, sampling dominates the step, so the rows
split it: ``.../generation`` is the seconds spent sampling, ``.../update`` the rest of the step (scoring,
forward, backward, optimizer). Each row is its own fresh process, as for every method.
"""

from __future__ import annotations

import time
from functools import partial

from rlcourse.bench import StepTimer

G, MAX_NEW_TOKENS = 4, 16


def _setup(algorithm: str, batch_size: int, steps: int):
    from rlcourse.methods.online import OnlineConfig
    from rlcourse.models import LoraSettings, load_model, load_tokenizer
    from rlcourse.sampling import SamplingSettings
    from rlcourse.tasks import get_task

    if batch_size % G:
        raise ValueError(f"batch_size counts completions and must be a multiple of G={G}; got {batch_size}")
    task = get_task("arithmetic")
    config = OnlineConfig(algorithm=algorithm, num_generations=G, prompts_per_step=batch_size // G,
                          sampling=SamplingSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7),
                          beta=0.05 if algorithm == "rloo" else 0.0)
    rows = task.prompts("train").select(range(config.prompts_per_step * steps))
    return load_tokenizer(), task, rows, config, load_model(lora=LoraSettings(), seed=0)


def _ours(algorithm: str, batch_size: int, steps: int, out) -> dict[str, list[float]]:
    from rlcourse.methods import online
    from rlcourse.train import TrainConfig, train

    tok, task, rows, config, model = _setup(algorithm, batch_size, steps)
    rollouts = online.Rollouts(model, tok, rows, task.reward, config)
    gen_times = []

    def timed(step):
        t0 = time.perf_counter()
        batch = rollouts(step)
        gen_times.append(time.perf_counter() - t0)
        return batch

    train_config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    total = train(model, timed, online.step_fn(config), train_config, out, resume=False, progress=False)["step_time"]
    return {"total": total, "generation": gen_times, "update": [t - g for t, g in zip(total, gen_times)]}


def _trl(algorithm: str, batch_size: int, steps: int, out) -> dict[str, list[float]]:
    from rlcourse.methods import online
    from rlcourse.train import TrainConfig
    from rlcourse.trl_runs import run_trl

    tok, task, rows, config, model = _setup(algorithm, batch_size, steps)
    train_config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4)
    args = online.trl_online_config(config, train_config, out)
    if algorithm == "grpo":
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOTrainer as Trainer
    timer = StepTimer()
    trainer = Trainer(model=model, reward_funcs=task.reward, args=args, train_dataset=rows, processing_class=tok,
                      callbacks=[timer])
    gen_times, generate = [], trainer._generate

    def timed(*a, **k):
        t0 = time.perf_counter()
        result = generate(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return result

    trainer._generate = timed
    run_trl(trainer)
    return {"total": timer.times, "generation": gen_times, "update": [t - g for t, g in zip(timer.times, gen_times)]}


def _part(impl, algorithm: str, part: str, batch_size: int, steps: int, out) -> list[float]:
    return impl(algorithm, batch_size, steps, out)[part]


def rows_for(algorithm: str) -> dict:
    """The BENCH dict of one algorithm: total step time, and its generation and update parts, per impl.
    (functools.partial of module functions, so that rlcourse.bench can send them to a spawned process.)"""
    return {f"{name}{suffix}": partial(_part, impl, algorithm, part)
            for name, impl in (("ours", _ours), ("TRL", _trl))
            for suffix, part in (("", "total"), ("/generation", "generation"), ("/update", "update"))}


BENCH = rows_for("grpo")
