"""Benchmark rows for RLOO: our loop vs TRL's RLOOTrainer on the same prompts (see rlcourse.bench).

The same set-up as ``rlcourse.benchmarks.grpo`` (batch_size counts completions, G = 4, 16 new tokens), with
β = 0.05, so each step also runs a reference forward; ``.../generation`` and ``.../update`` split the step.
"""

from rlcourse.benchmarks.grpo import rows_for

BENCH = rows_for("rloo")
