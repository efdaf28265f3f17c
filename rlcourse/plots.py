"""Figures every notebook draws: our curves over TRL's, gold before/after, and a reward model's scores against
the gold ones. Saved as PNG beside the run."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from rlcourse.metrics import GLOSSARY, MetricsLog


def overlay(runs: dict[str, MetricsLog], metrics: dict[str, dict[str, str]] | list[str], title: str = "",
            path: str | Path | None = None):
    """One panel per metric, one line per run.

    runs: label -> log, e.g. {"ours": ours, "TRL": theirs}. metrics: a list of names shared by all runs, or
    {panel title: {run label: that run's metric name}} when the names differ. Returns the figure.
    """
    if isinstance(metrics, list):
        metrics = {m: {label: m for label in runs} for m in metrics}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, (panel, names) in zip(axes[0], metrics.items()):
        for label, log in runs.items():
            name = names.get(label)
            if name is None or name not in log.keys():
                continue
            rows = [r for r in log.rows if r.get(name) is not None]
            style = "--" if label.lower().startswith("trl") else "-"
            ax.plot([r["step"] for r in rows], [r[name] for r in rows], style, marker=".", label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def gold_bars(results: dict[str, "GoldResult"], title: str = "gold metric on held-out prompts",  # noqa: F821
              path: str | Path | None = None):
    """Mean gold reward with a 95% confidence interval for each model (e.g. base, ours, TRL)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(results), 3.2))
    labels = list(results)
    means = [results[k].mean for k in labels]
    errs = [[results[k].mean - results[k].ci[0] for k in labels], [results[k].ci[1] - results[k].mean for k in labels]]
    ax.bar(labels, means, yerr=errs, capsize=6, color=["#999999"] + ["#4c72b0", "#dd8452", "#55a868"][: len(labels) - 1])
    ax.set_ylabel("mean gold reward")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def gains_by_run(summaries: dict[str, dict], baseline: str, title: str = "", path: str | Path | None = None):
    """Each run's gold gain over ``baseline`` (one dot per seed) beside their mean and its interval, one column per
    method: the picture of run-to-run noise. ``summaries``: name -> ``evaluate.gain_over_runs``' dict."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(summaries), 3.4))
    for x, (name, s) in enumerate(summaries.items()):
        ax.scatter([x - 0.12] * len(s["gains"]), s["gains"], color="#4c72b0", zorder=3,
                   label="one seed's run" if x == 0 else None)
        lo, hi = s["ci"]
        ax.errorbar([x + 0.12], [s["mean"]], yerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o", color="black",
                    capsize=6, label="mean, 95% interval over runs and prompts" if x == 0 else None)
    ax.axhline(0, color="#999999", lw=1)
    ax.set_xticks(range(len(summaries)), list(summaries))
    ax.set_ylabel(f"gold gain over {baseline}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_scores_vs_gold(results: dict[str, "HeldOut"], path: str | Path | None = None):  # noqa: F821
    """One scatter panel per reward model: RM score against gold score of every held-out completion.
    ``results``: name -> ``rlcourse.reward_eval.HeldOut``."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        ax.scatter(res.gold_chosen, res.chosen, s=14, label="chosen", alpha=0.7)
        ax.scatter(res.gold_rejected, res.rejected, s=14, marker="x", label="rejected", alpha=0.7)
        ax.set_title(f"{name}: acc {res.accuracy:.2f}, ρ {res.spearman:+.2f}", fontsize=10)
        ax.set_xlabel("gold score")
        ax.set_ylabel("RM score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def describe(metric: str) -> str:
    """The glossary's definition of a logged metric."""
    return GLOSSARY.get(metric, "(not in the glossary)")
