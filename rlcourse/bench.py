"""Benchmark (not a test): median step time of our loop vs TRL's trainer on the same batches and model,
and each run's peak memory, under this machine's measured ceiling (``rlcourse.ceiling``: matmul GFLOP/s per
dtype, memory bandwidth, the CPU features, the floors they imply). Prints a table and writes it to build/bench/.

    python -m rlcourse.bench [--methods sft dpo] [--steps 8] [--batch-size 4]

Every method comes from one table, ``METHODS``, and runs through the interface every method module has
(``Settings``, ``batches``, ``step_fn``, ``trl_kwargs``, ``trl_classes``; see CONTRIBUTING.md): a new method is
one row. Each (method, implementation) runs in a fresh process, so peak RSS belongs to that run alone and one
run's caches don't speed up the next. The first step (warm-up: allocations, kernel selection) is left out of
the median. For the online methods, where sampling dominates a CPU step, ``.../generation`` rows give the
seconds spent producing the batch and ``.../update`` the rest of the step. The split is not quite like for like:
ours times the whole ``Rollouts`` call (sampling, decoding, the reward), TRL's its ``_generate`` (sampling and
decoding; it scores afterwards, in ``.../update``). Compare the totals; read the parts as where the time goes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

from rlcourse.ceiling import measure as measure_ceiling
from rlcourse.paths import build_dir
from rlcourse.precision import current as current_precision

MAX_LENGTH = 256
"""Longest prompt + completion of the offline methods; the concise task's rows fit, so neither side truncates."""
G, MAX_NEW_TOKENS = 4, 16
"""Online methods: completions per prompt, and the longest completion."""


@dataclass(frozen=True)
class Bench:
    """One benchmarked method: its module under ``rlcourse.methods`` and the rows it trains on."""

    module: str
    data: str
    """"sft" (demonstrations), "pairs" (preferences), "unpaired" (KTO's rows), "reward_pairs" (a reward model's
    pairs) or "prompts" (online: ``batch_size`` counts completions, G per prompt)."""


METHODS = {
    "sft": Bench("sft", "sft"),
    "reward": Bench("reward_model", "reward_pairs"),
    "dpo": Bench("dpo", "pairs"),
    "ipo": Bench("ipo", "pairs"),
    "cpo": Bench("cpo", "pairs"),
    "simpo": Bench("simpo", "pairs"),
    "orpo": Bench("orpo", "pairs"),
    "kto": Bench("kto", "unpaired"),
    "rloo": Bench("rloo", "prompts"),
    "grpo": Bench("grpo", "prompts"),
}
"""Every benchmarked method with a TRL trainer to compare with (BCO and DRO have none)."""


class StepTimer:
    """A TrainerCallback (duck-typed to keep transformers out of the parent process) timing each step."""

    def __init__(self):
        self.times: list[float] = []

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, *args, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def _rows(data: str, n: int, batch_size: int):
    """The first ``n`` training rows of the concise task (arithmetic prompts for online methods), as ``data`` says."""
    from datasets import Dataset

    from rlcourse.data import unpaired_rows
    from rlcourse.methods.reward_model import training_pairs
    from rlcourse.tasks import get_task

    if data == "prompts":
        return get_task("arithmetic").prompts("train").select(range(n // G))
    task = get_task("concise")
    if data == "sft":
        return task.sft("train").select(range(n))
    if data == "reward_pairs":
        return training_pairs(task, n, batch_size)
    pairs = task.preferences("train").select(range(n))
    return pairs if data == "pairs" else Dataset.from_list(unpaired_rows(pairs)[:n])  # n pairs: 2n unpaired rows


def _offline(bench: Bench, impl: str, batch_size: int, steps: int, out) -> dict[str, list[float]]:
    from rlcourse.models import LoraSettings, load_model, load_reward_model, load_tokenizer
    from rlcourse.train import TrainConfig, train
    from rlcourse.trl_runs import run_trl, trl_config

    method = importlib.import_module(f"rlcourse.methods.{bench.module}")
    tok = load_tokenizer()
    rows = _rows(bench.data, batch_size * steps, batch_size)
    model = (load_reward_model(lora=LoraSettings(), seed=0, tokenizer=tok) if bench.data == "reward_pairs"
             else load_model(lora=LoraSettings(), seed=0))
    settings = method.Settings()
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    if impl == "ours":
        batches = method.batches(rows, tok, batch_size, MAX_LENGTH)
        log = train(model, batches, method.step_fn(settings), config, out, resume=False, progress=False)
        return {"": log["step_time"]}
    trainer_cls, config_cls = method.trl_classes()
    args = trl_config(config_cls, config, out, disable_tqdm=True, **method.trl_kwargs(settings, MAX_LENGTH))
    timer = StepTimer()
    run_trl(trainer_cls(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[timer]))
    return {"": timer.times}


def _online(bench: Bench, impl: str, batch_size: int, steps: int, out) -> dict[str, list[float]]:
    from rlcourse.methods.rollouts import RolloutSettings, Rollouts, trl_online_config
    from rlcourse.models import LoraSettings, load_model, load_tokenizer
    from rlcourse.sampling import SamplingSettings
    from rlcourse.tasks import get_task
    from rlcourse.train import TrainConfig, train
    from rlcourse.trl_runs import run_trl

    if batch_size % G:
        raise ValueError(f"batch_size counts completions and must be a multiple of G={G}; got {batch_size}")
    method = importlib.import_module(f"rlcourse.methods.{bench.module}")
    tok, task = load_tokenizer(), get_task("arithmetic")
    rollout = RolloutSettings(num_generations=G, prompts_per_step=batch_size // G,
                              sampling=SamplingSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7))
    rows, settings = _rows("prompts", batch_size * steps, batch_size), method.Settings()
    model = load_model(lora=LoraSettings(), seed=0)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=1e-4, checkpoint_every=10**9)
    generation: list[float] = []

    def timed(generate):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            result = generate(*args, **kwargs)
            generation.append(time.perf_counter() - t0)
            return result
        return call

    if impl == "ours":
        batches = timed(Rollouts(model, tok, rows, task.reward, rollout))
        total = train(model, batches, method.step_fn(settings, rollout), config, out, resume=False,
                      progress=False)["step_time"]
    else:
        trainer_cls, _ = method.trl_classes()
        timer = StepTimer()
        trainer = trainer_cls(model=model, reward_funcs=task.reward, train_dataset=rows, processing_class=tok,
                              args=trl_online_config(method, settings, rollout, config, out), callbacks=[timer])
        trainer._generate = timed(trainer._generate)
        run_trl(trainer)
        total = timer.times
    return {"": total, "/generation": generation, "/update": [t - g for t, g in zip(total, generation)]}


def _child(method: str, impl: str, batch_size: int, steps: int, out: str, queue) -> None:
    bench = METHODS[method]
    run = _online if bench.data == "prompts" else _offline
    times = run(bench, impl, batch_size, steps, out)
    queue.put({"times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(method: str, impl: str, batch_size: int, steps: int) -> list[dict]:
    """Rows of one (method, impl) run in a fresh process: the step time, and its parts where a method has them."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = build_dir("bench", "runs", f"{method}-{impl}")
    proc = ctx.Process(target=_child, args=(method, impl, batch_size, steps, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    rows = []
    for part, times in result["times"].items():
        times = times[1:] or times  # drop the warm-up step
        rows.append({"method": method, "impl": impl + part, "median_step_s": statistics.median(times),
                     "steps_timed": len(times), "peak_rss_mb": result["peak_rss_mb"]})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    ceiling = measure_ceiling()  # first, alone: the runs below are separate processes that have finished
    rows = [row for method in args.methods for impl in ("ours", "TRL")
            for row in measure(method, impl, args.batch_size, args.steps)]
    precision = current_precision()
    device = f"{precision.device}: {precision.hardware}"
    lines = [f"Benchmark on {device}, batch {args.batch_size}, {args.steps} steps (first step excluded), "
             f"SmolLM2-135M NF4 + LoRA r=16, {precision.name} ({precision.reason})", "", ceiling.describe(), "",
             "| method | impl | median step (s) | peak RSS (MB) |", "|---|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['impl']} | {r['median_step_s']:.2f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = build_dir("bench")
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({"device": device, "precision": precision.name,
                                                "ceiling": asdict(ceiling), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
