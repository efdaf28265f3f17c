"""Compare our run with TRL's, number for number, and say how far apart they are.

Two runs that start from the same adapters on the same batches must log the same first-step loss up to
floating-point noise: bf16 autocast and a different (fused vs plain) log-softmax put that noise near
1e-3 relative, so tolerances are stated per metric and asserted by the notebooks. Later steps drift
apart slowly (bf16 parameters and optimizer states amplify tiny differences); the curves are compared
by eye and by the largest difference, not asserted.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlcourse.metrics import MetricsLog


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
