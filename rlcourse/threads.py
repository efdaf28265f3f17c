"""How a course process uses the CPU's cores: threads that spin only briefly while they wait, and at most one
thread per core the process may use.

PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the Linux wheels). By default a libgomp thread
that has finished its share of an operation spins on its core for about 300,000 iterations (a few milliseconds)
before it sleeps. Alone on the machine that saves a wake-up between operations; beside another busy process it is
ruinous: the spinning threads hold cores the other process needs, and an operation cannot finish until every one
of its threads gets a core back (README pitfall 9). Measured with ``python -m rlcourse.sharing_bench`` on a
2-core machine, a training step (forward + backward, 8 × 96 tokens) beside a busy PyTorch process took 3.5-30×
its idle time with the default; with ``GOMP_SPINCOUNT=3000`` 2.0-2.4×, and no slower alone (within the machine's
run-to-run noise). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) shared as well but made ``generate()`` 1.6-2.0×
slower alone: decoding is thousands of tiny operations, and each wake-up costs more than the operation.

So a course process runs with ``GOMP_SPINCOUNT=3000``, and with ``OMP_NUM_THREADS`` capped where it may use fewer
cores than the machine has (a container's CPU quota or a ``taskset`` mask, which PyTorch does not see). Both must
be in the environment before ``torch`` is imported: libgomp reads them once, when it loads. Hence three places set
them:

- ``import rlcourse`` (``apply()``), when ``torch`` is not imported yet;
- the course's Jupyter kernel: ``make install`` writes them into its kernel spec (``kernel_env_args()``), so a
  notebook cell that imports ``torch`` before ``rlcourse`` gets them too;
- ``make`` exports them to every command it runs.

A variable the user set is never overridden (an ``OMP_WAIT_POLICY`` of theirs also keeps our spin count out).
``RLCOURSE_THREADS=off`` leaves the environment alone.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

ENV_VAR = "RLCOURSE_THREADS"
SPINCOUNT = "3000"
"""libgomp's spin iterations before a waiting thread sleeps (tens of microseconds; libgomp's default is 300,000)."""


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity mask, capped by a cgroup (container) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def environment() -> dict[str, str]:
    """The OpenMP settings of a course process (before any the user set: those win). The thread count only where
    the process may use fewer cores than the machine has: elsewhere PyTorch's default (one thread per physical
    core) is already right, and a count of logical cores would put two threads on each hyper-threaded core."""
    env = {"GOMP_SPINCOUNT": SPINCOUNT}
    if usable_cores() < (os.cpu_count() or 1):
        env["OMP_NUM_THREADS"] = str(usable_cores())
    return env


def apply() -> dict[str, str]:
    """Put ``environment()`` into ``os.environ`` where unset, if ``torch`` is not loaded yet; returns what it set."""
    if os.environ.get(ENV_VAR, "auto").lower() == "off" or "torch" in sys.modules:
        return {}
    added = {k: v for k, v in environment().items() if k not in os.environ}
    if "OMP_WAIT_POLICY" in os.environ:  # the user chose how threads wait: a spin count would override it
        added.pop("GOMP_SPINCOUNT", None)
    os.environ.update(added)
    return added


def kernel_env() -> dict[str, str]:
    """What a Jupyter kernel spec of the course sets: the wait policy (the thread count is the machine's, so
    ``import rlcourse`` sets it where it runs)."""
    return {k: v for k, v in environment().items() if k != "OMP_NUM_THREADS"}


def kernel_env_args() -> str:
    """``--env NAME VALUE`` arguments for ``python -m ipykernel install`` (what ``make install`` runs)."""
    return " ".join(f"--env {k} {v}" for k, v in kernel_env().items())


if __name__ == "__main__":
    print(kernel_env_args())
