"""Benchmark (not a test): median step time of our loop vs TRL's trainer on the same batches and model,
and each run's peak memory. Prints a table and writes it to build/bench/.

    python -m rlcourse.bench [--methods sft] [--steps 8] [--batch-size 4]

Each (method, implementation) runs in a fresh process, so peak RSS belongs to that run alone and one
run's caches don't speed up the next. The first step (warm-up: allocations, kernel selection) is left
out of the median. A method is added by a module in ``rlcourse/benchmarks/`` (see ``methods``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

from rlcourse.paths import build_dir
from rlcourse.precision import current as current_precision


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


def methods() -> dict[str, dict]:
    """Every benchmarked method: each module of ``rlcourse.benchmarks`` defines ``BENCH = {"ours": fn, "TRL": fn}``
    with ``fn(batch_size, steps, out_dir) -> list of per-step seconds``; the module's name is the method's."""
    import importlib
    import pkgutil

    import rlcourse.benchmarks as pkg

    found = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        found[info.name] = importlib.import_module(f"rlcourse.benchmarks.{info.name}").BENCH
    return found


def _child(fn, batch_size, steps, out, queue):
    times = fn(batch_size, steps, out)
    queue.put({"times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(method: str, impl: str, batch_size: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = build_dir("bench", "runs", f"{method}-{impl}")
    proc = ctx.Process(target=_child, args=(methods()[method][impl], batch_size, steps, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    times = result["times"][1:] or result["times"]  # drop the warm-up step
    return {"method": method, "impl": impl, "median_step_s": statistics.median(times), "steps_timed": len(times),
            "peak_rss_mb": result["peak_rss_mb"]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = methods()
    parser.add_argument("--methods", nargs="+", default=list(available), choices=list(available))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    rows = [measure(m, impl, args.batch_size, args.steps) for m in args.methods for impl in available[m]]
    precision = current_precision()
    device = f"{precision.device}: {precision.hardware}"
    lines = [f"Benchmark on {device}, batch {args.batch_size}, {args.steps} steps (first step excluded), "
             f"SmolLM2-135M NF4 + LoRA r=16, {precision.name} ({precision.reason})", "",
             "| method | impl | median step (s) | peak RSS (MB) |", "|---|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['impl']} | {r['median_step_s']:.2f} | {r['peak_rss_mb']:.0f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = build_dir("bench")
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({"device": device, "precision": precision.name, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
