"""Compare our run with TRL's, number for number, and say how far apart they are.

Two runs that start from the same adapters on the same batches must log the same first-step loss up to
floating-point noise, and how much noise depends on the precision the machine computes in
(``rlcourse.precision``), so the notebooks take their tolerances from ``tolerance()``: one row per precision in
``TOLERANCES``, each argued below from the arithmetic, none fitted to one CPU's kernels. Later steps drift
apart slowly (parameters and optimizer states amplify tiny differences); the curves are compared by eye and by
the largest difference, not asserted.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlcourse.metrics import MetricsLog


@dataclass(frozen=True)
class Tolerance:
    """How far our numbers may be from TRL's in one precision (relative unless the name says atol).

    Where the noise comes from. bf16 keeps 8 significant bits (unit roundoff 2⁻⁸ ≈ 3.9e-3): under bf16 autocast
    every matmul rounds its output to that, and the two sides round at different places (TRL fuses the LM head
    with the log-softmax, we do not; DPO concatenates chosen and rejected into one forward). fp32 keeps 24 bits
    (6e-8): what is left is the order of summation, which differs between our code and TRL's and between CPUs
    (AVX2 and AVX-512 kernels split a reduction differently; README pitfall 11). A sum of n terms in a different
    order moves by about √n·u relative; the longest sums here are the log-softmax over V = 49,152 tokens and the
    hidden size 576 over 30 layers: √49152 · 6e-8 ≈ 1.3e-5. The fp32 tolerances sit several times above that.
    """

    values: float
    """First-step loss, log-probs and rewards of two runs on the 4-bit model, averaged over a batch. bf16: 1e-3, a
    quarter of bf16's unit roundoff (the average over tokens and rows cancels most of the rounding). fp32: 1e-4."""
    grad_norm: float
    """First-step gradient norm: the backward adds 30 layers of rounding in the other order. bf16: 2e-2;
    fp32: 1e-3."""
    recomputed: float
    """A loss computed twice on the same batch and adapters, ours and TRL's own method (every DPO loss_type,
    bco_pair). bf16: 2e-3; fp32: 1e-4, the same arithmetic as ``values``."""
    rl_loss: float
    """A policy-gradient loss on fixed completions (lessons 11, 12): a small number (advantages average to ~0)
    made of ratios exp(log π − log π_old), so it is relative to a cancelling sum. bf16: 2e-2; fp32: 1e-3."""
    rewards_atol: float
    """Absolute difference of a reward model's first-step margin and mean reward (scores of order 1, the score head
    reads one hidden state in the compute dtype). bf16: 1e-2; fp32: 1e-4."""
    sampler_gap: float
    """Largest |log π_sampler − log π_policy| of a sampled token over an online run (lessons 11, 12): the rollout
    engine's merged copy against the 4-bit policy on the same tokens (not TRL, but the same kind of bound). fp32:
    summation order only, measured ≤ 7.5e-5 on the AVX2 CPU; bound 1e-2. bf16: the merged weight W + ΔW is rounded
    to 8 bits once more and every matmul rounds, measured mean 0.036, max 0.22 over 128 tokens (the same CPU,
    bf16 forced); bound 2 (a probability ratio of e² ≈ 7.4; a sampler left unsynced for a run drifts well beyond)."""


TOLERANCES = {
    "bf16": Tolerance(values=1e-3, grad_norm=2e-2, recomputed=2e-3, rl_loss=2e-2, rewards_atol=1e-2,
                      sampler_gap=2.0),
    "fp32": Tolerance(values=1e-4, grad_norm=1e-3, recomputed=1e-4, rl_loss=1e-3, rewards_atol=1e-4,
                      sampler_gap=1e-2),
}


def tolerance(precision: str | None = None) -> Tolerance:
    """The tolerances of ``precision`` ("bf16" or "fp32"; None: the precision this machine computes in)."""
    if precision is None:
        from rlcourse.precision import current

        precision = current().name
    return TOLERANCES[precision]


@dataclass
class ParityRow:
    metric: str
    step: int
    ours: float
    theirs: float

    @property
    def abs_diff(self) -> float:
        return abs(self.ours - self.theirs)

    @property
    def rel_diff(self) -> float:
        return self.abs_diff / max(abs(self.theirs), 1e-12)


def compare_logs(ours: MetricsLog, theirs: MetricsLog, metrics: dict[str, str], steps: int | None = None
                 ) -> list[ParityRow]:
    """Row per (metric, step) for the first ``steps`` steps; ``metrics`` maps our name -> TRL's name."""
    rows = []
    common = sorted({r["step"] for r in ours.rows} & {r["step"] for r in theirs.rows})
    for ours_name, trl_name in metrics.items():
        for step in common[: steps or None]:
            a, b = ours.at(step).get(ours_name), theirs.at(step).get(trl_name)
            if a is not None and b is not None:
                rows.append(ParityRow(ours_name, step, float(a), float(b)))
    return rows


def print_parity(rows: list[ParityRow]) -> None:
    print(f"{'metric':<22}{'step':>5}{'ours':>14}{'TRL':>14}{'|diff|':>12}{'rel':>10}")
    for r in rows:
        print(f"{r.metric:<22}{r.step:>5}{r.ours:>14.6f}{r.theirs:>14.6f}{r.abs_diff:>12.2e}{r.rel_diff:>10.2e}")


def assert_first_step(ours: MetricsLog, theirs: MetricsLog, metrics: dict[str, str], rtol: float,
                      atol: float = 0.0) -> list[ParityRow]:
    """Print the comparison table, then assert every metric's first step agrees within atol + rtol·|TRL|."""
    rows = compare_logs(ours, theirs, metrics)
    print_parity(rows)
    first = [r for r in rows if r.step == 1]
    missing = set(metrics) - {r.metric for r in first}
    if missing:
        raise AssertionError(f"no first-step value for {sorted(missing)} in one of the logs")
    bad = [r for r in first if r.abs_diff > atol + rtol * abs(r.theirs)]
    if bad:
        raise AssertionError("first step differs beyond the tolerance "
                             f"(atol={atol}, rtol={rtol}): " + ", ".join(
                                 f"{r.metric}: ours {r.ours:.6f} vs TRL {r.theirs:.6f}" for r in bad))
    print(f"✓ first step agrees within rtol={rtol}" + (f", atol={atol}" if atol else ""))
    return rows
