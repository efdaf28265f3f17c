"""Benchmark (not a test): median step time of our loop vs TRL's trainer on the same batches and model,
and each run's peak memory, under this machine's measured ceiling (``rlcourse.ceiling``: matmul GFLOP/s per
dtype, memory bandwidth, the CPU features, the floors they imply). Prints a table and writes it to build/bench/.

    python -m rlcourse.bench [--methods sft dpo] [--steps 8] [--batch-size 4]

Every method comes from one table, ``METHODS``, and runs through the interface every method module has
(``Settings``, ``batches``, ``step_fn``, ``trl_kwargs``, ``trl_classes``; see CONTRIBUTING.md): a new method is
one row. Each (method, implementation) runs in a fresh process, so peak RSS belongs to that run alone and one
run's caches don't speed up the next. The first step (warm-up: allocations, kernel selection) is left out of
the median. The online methods run at the ``cpu`` profile's size and their step is split into the same parts on
both sides (``PHASES``: weight sync, prefill, decode, reward, reference forward, policy forward, backward,
optimizer, and the rest), ours from our training log, TRL's by wrapping what its trainer calls (``TRLPhases``),
beside the floor this machine's measured matmul rate sets for such a step. TRL's online trainers run twice: with their
own ``model.generate`` ("TRL", the ratio's reference) and sampling through the rollout engine ("TRL-engine",
``rlcourse.trl_rollouts``, as the online lessons run them).
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
PROMPT_TOKENS = 46
"""An arithmetic prompt's length in tokens (45 to 47) with SmolLM2's chat template and the online lessons' system
message (``rlcourse.online_runs.SYSTEM``: the template's default): the floor's."""


@dataclass(frozen=True)
class Bench:
    """One benchmarked method: its module under ``rlcourse.methods`` and the rows it trains on."""

    module: str
    data: str
    """"sft" (demonstrations), "pairs" (preferences), "unpaired" (KTO's rows), "reward_pairs" (a reward model's
    pairs) or "prompts" (online: the ``cpu`` profile's prompts per step and G completions each)."""


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


PHASES = ("sync", "prefill", "decode", "reward", "reference_forward", "policy_forward", "backward", "optimizer")
"""The parts of an online step, in the order they happen; ``other`` is the step minus their sum (TRL's bookkeeping,
our logging, tokenisation)."""


def _our_phases(row: dict) -> dict[str, float]:
    """One step's parts from our training log (``rlcourse.train`` and the rollouts log them as ``time/*``)."""
    parts = {k: row.get(f"time/{k}", 0.0) for k in ("sync", "prefill", "decode", "reward", "reference_forward",
                                                    "backward", "optimizer")}
    parts["policy_forward"] = row["time/forward"] - parts["reference_forward"]
    return parts


class TRLPhases:
    """Times the same parts inside a TRL online trainer by wrapping what it calls: ``_generate`` (its model's
    forwards there: prompt-length inputs are prefill, one-token inputs decode; through the rollout engine, the
    engine's own sync, prefill and decode seconds), the reward function, the log-prob
    forwards (without gradient: the reference's, or the old policy's; with it: the policy's), the backward and the
    optimizer (the callback's ``on_pre_optimizer_step`` / ``on_optimizer_step``)."""

    def __init__(self, trainer, reward_fn):
        self.steps: list[dict[str, float]] = []
        self.current = dict.fromkeys(PHASES, 0.0)
        self.generating = False
        generate = trainer._generate

        def generating(*args, **kwargs):  # its forwards are timed one by one, as prefill or decode
            self.generating = True
            try:
                return generate(*args, **kwargs)
            finally:
                self.generating = False
                for timings in trainer.__dict__.pop("rollout_timings", []):  # through the rollout engine: its own
                    for phase, seconds in timings.items():
                        self.current[phase] += seconds

        trainer._generate = generating
        self._wrap(trainer, "_get_per_token_logps_and_entropies", self._logps)
        self._wrap(trainer.accelerator, "backward", lambda: "backward")
        model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        model.register_forward_pre_hook(self._forward_start, with_kwargs=True)
        model.register_forward_hook(self._forward_end)
        self.reward_fn = self._timed(reward_fn, lambda: "reward")

    def _timed(self, fn, phase):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase()] += time.perf_counter() - t0
        return call

    def _wrap(self, obj, attr, phase):
        setattr(obj, attr, self._timed(getattr(obj, attr), phase))

    def _logps(self):
        import torch

        return "policy_forward" if torch.is_grad_enabled() else "reference_forward"

    def _forward_start(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        self._phase = None if torch.is_grad_enabled() or ids is None else ("decode" if ids.shape[1] == 1 else
                                                                              "prefill")
        self._t0 = time.perf_counter()

    def _forward_end(self, module, args, output):
        # forwards outside generation are timed by _logps; inside it, every no-grad forward is prefill or decode
        if self._phase and self.generating:
            self.current[self._phase] += time.perf_counter() - self._t0

    # TrainerCallback events (duck-typed; every other event is a no-op)
    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, *args, **kwargs):
        self.current, self._step0 = dict.fromkeys(PHASES, 0.0), time.perf_counter()

    def on_pre_optimizer_step(self, *args, **kwargs):
        self._opt0 = time.perf_counter()

    def on_optimizer_step(self, *args, **kwargs):
        self.current["optimizer"] += time.perf_counter() - self._opt0

    def on_step_end(self, *args, **kwargs):
        self.steps.append(self.current | {"step": time.perf_counter() - self._step0})


def _online(bench: Bench, impl: str, batch_size: int, steps: int, out) -> dict[str, list[float]]:
    """An online method at the ``cpu`` profile's size (lessons 11 and 12: G completions of each prompt), from the base
    model, whose completions mostly run to ``max_new_tokens``: the costliest sampling. Its step split into
    ``PHASES``; ``batch_size`` is unused (the profile sets it)."""
    from rlcourse.methods.rollouts import RolloutSettings, Rollouts, trl_online_config
    from rlcourse.models import LoraSettings, load_model, load_tokenizer
    from rlcourse.online_runs import SYSTEM
    from rlcourse.profiles import get_profile
    from rlcourse.sampling import SamplingSettings
    from rlcourse.tasks import get_task
    from rlcourse.train import TrainConfig, train
    from rlcourse.trl_rollouts import trl_trainer_class
    from rlcourse.trl_runs import run_trl

    method = importlib.import_module(f"rlcourse.methods.{bench.module}")
    sizes = getattr(get_profile("cpu"), bench.module)
    tok, task = load_tokenizer(), get_task("arithmetic", system=SYSTEM)
    rollout = RolloutSettings(num_generations=sizes.num_generations, prompts_per_step=sizes.prompts_per_step,
                              sampling=SamplingSettings(max_new_tokens=sizes.max_new_tokens))
    rows = task.prompts("train").select(range(rollout.prompts_per_step * steps))
    settings = method.Settings(**({"beta": 0.05} if bench.module == "rloo" else {}))  # the lessons' settings
    model = load_model(lora=LoraSettings(), seed=0)
    config = TrainConfig(steps=steps, batch_size=rollout.completions_per_step, learning_rate=sizes.learning_rate,
                         checkpoint_every=10**9)
    if impl == "ours":
        log = train(model, Rollouts(model, tok, rows, task.reward, rollout), method.step_fn(settings, rollout), config,
                    out, resume=False, progress=False)
        parts = [_our_phases(r) | {"step": r["step_time"]} for r in log.rows]
    else:
        trainer_cls = trl_trainer_class(method, "engine" if impl == "TRL-engine" else "transformers")
        reward = task.reward
        trainer = trainer_cls(model=model, reward_funcs=reward, train_dataset=rows, processing_class=tok,
                              args=trl_online_config(method, settings, rollout, config, out))
        timer = TRLPhases(trainer, reward)
        trainer.reward_funcs = [timer.reward_fn]
        trainer.add_callback(timer)
        run_trl(trainer)
        parts = timer.steps
    return {"": [p["step"] for p in parts]} | {f"/{k}": [p[k] for p in parts] for k in PHASES} | {
        "/other": [p["step"] - sum(p[k] for k in PHASES) for p in parts]}


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


def _impls(method: str) -> tuple[str, ...]:
    """What runs for ``method``: ours and TRL's trainer; for an online method also TRL's trainer sampling through the
    rollout engine (``rlcourse.trl_rollouts``, as the online lessons run it). The ratio is always to TRL's own."""
    return ("ours", "TRL", "TRL-engine") if METHODS[method].data == "prompts" else ("ours", "TRL")


def _ratios(rows: list[dict]) -> dict[str, float]:
    """method -> our median step / TRL's."""
    step = {(r["method"], r["impl"]): r["median_step_s"] for r in rows}
    return {m: step[(m, "ours")] / step[(m, "TRL")] for m, i in step if i == "ours" and (m, "TRL") in step}


def online_floor(ceiling, sizes, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, float]:
    """Seconds an online step of ``sizes`` (an ``OnlineSizes``) cannot beat at this machine's fp32 matmul rate, with
    completions at their full length: sampling (a forward per prompt and completion token) and training (forward and
    backward, ~3 forwards' work: the backward of frozen weights still needs the input gradients), each prompt's
    tokens counted G times (TRL's layout) or once (a shared prompt, ours)."""
    B, G, C = sizes.prompts_per_step, sizes.num_generations, sizes.max_new_tokens
    repeated, shared = B * G * (prompt_tokens + C), B * prompt_tokens + B * G * C
    return {"prompt per sample": 4 * ceiling.forward_seconds(repeated),
            "prompt once per group": 4 * ceiling.forward_seconds(shared)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="offline methods' batch (online: the cpu profile's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from rlcourse.profiles import get_profile

    ceiling = measure_ceiling()  # first, alone: the runs below are separate processes that have finished
    rows = [row for method in args.methods for impl in _impls(method)
            for row in measure(method, impl, args.batch_size, args.steps)]
    precision = current_precision()
    device = f"{precision.device}: {precision.hardware}"
    whole = [r for r in rows if "/" not in r["impl"]]
    ratios = _ratios(whole)
    lines = [f"Benchmark on {device}, {args.steps} steps (first step excluded), SmolLM2-135M NF4 + LoRA r=16, "
             f"{precision.name} ({precision.reason}); offline batch {args.batch_size}, online the cpu profile's "
             f"size", "", ceiling.describe(), "",
             "| method | impl | median step (s) | ours / TRL | peak RSS (MB) |", "|---|---|---:|---:|---:|"]
    for r in whole:
        ratio = f"{ratios[r['method']]:.2f}" if r["impl"] == "ours" and r["method"] in ratios else ""
        lines.append(f"| {r['method']} | {r['impl']} | {r['median_step_s']:.2f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    online = [m for m in args.methods if METHODS[m].data == "prompts"]
    if online:
        parts = {(r["method"], r["impl"]): r["median_step_s"] for r in rows}
        lines += ["", "Online step breakdown, median seconds per step (" + ", ".join(
            f"{m}: {getattr(get_profile('cpu'), METHODS[m].module).prompts_per_step} prompts × "
            f"{getattr(get_profile('cpu'), METHODS[m].module).num_generations} completions" for m in online) + ")", "",
                  "| method | impl | step | " + " | ".join(p.replace("_", " ") for p in PHASES) + " | other |",
                  "|---|---|" + "---:|" * (len(PHASES) + 2)]
        for m in online:
            for impl in _impls(m):
                cells = [parts[(m, impl)]] + [parts[(m, f"{impl}/{p}")] for p in (*PHASES, "other")]
                lines.append(f"| {m} | {impl} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
            floor = online_floor(ceiling, getattr(get_profile("cpu"), METHODS[m].module))
            lines.append(f"| {m} | floor at {ceiling.matmul_gflops.get('float32', 0):.0f} GFLOP/s | " + ", ".join(
                f"{k}: {v:.2f}" for k, v in floor.items()) + " |" + " |" * (len(PHASES) + 1))
    text = "\n".join(lines)
    print(text)
    out = build_dir("bench")
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({"device": device, "precision": precision.name,
                                                "ceiling": asdict(ceiling), "rows": rows, "ratios": ratios},
                                               indent=1))
    return rows


if __name__ == "__main__":
    main()
