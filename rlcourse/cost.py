"""What one training step costs: seconds and peak memory of step functions on the same batch (lesson 07).

Lesson 07 asks what dropping the reference model saves. ``step_cost`` runs each step function (forward and
backward, in the training loop's precision, no optimizer update) on the same batch and reports

- ``seconds``: the median wall-clock time of ``repeats`` steps, after one warm-up step;
- ``peak_mb``: how much memory the step needed above what was held before it. On CUDA, the peak allocated memory
  (``torch.cuda.max_memory_allocated`` after a reset) minus the memory allocated before. On Linux CPUs, the peak
  resident memory of the process (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) minus the resident
  memory before. Elsewhere it is not measured (None).

Timings depend on the machine: they are printed by notebooks and benchmarks, never asserted by tests.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident memory to its current value (Linux ≥ 4.0); False where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def step_cost(model, batch: dict, step_fns: dict[str, Callable], repeats: int = 3,
              bf16: bool | None = None) -> dict[str, dict]:
    """{name: {"seconds": median seconds per step, "peak_mb": extra peak memory or None, "memory": what it is}}.

    step_fns: name -> step_fn(model, batch) -> (loss, metrics). ``bf16``: autocast as ``TrainConfig.bf16`` does
    (None: this machine's precision, ``rlcourse.precision``). Gradients are cleared after each step; the
    model's weights are not changed.
    """
    device = next(model.parameters()).device
    if bf16 is None:
        from rlcourse.precision import current

        bf16 = current().bf16
    cuda = device.type == "cuda"
    model.train()
    results = {}
    for name, step in step_fns.items():
        def one_step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = step(model, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)

        one_step()  # warm-up: first-call allocations and kernel selection
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        else:
            measured = _reset_peak_rss()
            held = _proc_kib("VmRSS") * 1024 if measured else None
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            one_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if cuda:
            peak, memory = (torch.cuda.max_memory_allocated() - held) / 2**20, "CUDA peak allocated above the model"
        elif held is not None:
            peak, memory = (_proc_kib("VmHWM") * 1024 - held) / 2**20, "peak resident memory above the model (CPU)"
        else:
            peak, memory = None, "not measured on this OS"
        results[name] = {"seconds": statistics.median(times), "peak_mb": peak, "memory": memory}
    return results
