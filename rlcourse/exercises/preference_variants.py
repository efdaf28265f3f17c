"""Exercises of lessons 07–09: CPO, SimPO, ORPO, KTO, BCO and DRO, each checked against the package on random tensors.

Every checker passes its arguments positionally, in the order its docstring lists them, so the learner may name them
freely. Where a stop-gradient is part of the method (KTO's reference point, DRO's advantage), the checker also
compares gradients.
"""

from __future__ import annotations

import torch

from rlcourse.exercises._check import compare
from rlcourse.losses.bco import bco_loss
from rlcourse.losses.cpo import cpo_loss, simpo_loss, simpo_reward
from rlcourse.losses.dro import dro_policy_loss, dro_value_loss
from rlcourse.losses.kto import kto_loss, kto_reference_point
from rlcourse.losses.orpo import log_odds, orpo_loss


def _beta(g: torch.Generator, low: float = 0.05, high: float = 0.5) -> float:
    return low + float(torch.rand(1, generator=g)) * (high - low)


def _seq_logps(g: torch.Generator, B: int = 6, scale: float = 40.0) -> torch.Tensor:
    """Summed completion log-probs, shape (B,), all ≤ 0."""
    return -torch.rand(B, generator=g) * scale


def _labels(g: torch.Generator, B: int = 6) -> torch.Tensor:
    labels = torch.rand(B, generator=g) > 0.5
    labels[0], labels[1] = True, False  # both kinds in every batch
    return labels


def _grad_wrt(loss_fn, position: int):
    """A function with loss_fn's arguments that returns d loss / d (argument at ``position``)."""
    def run(*args):
        args = list(args)
        args[position] = args[position].clone().requires_grad_(True)
        loss_fn(*args).backward()
        return args[position].grad
    return run


# ---------------------------------------------------------------- lesson 07: CPO and SimPO

def check_cpo_loss(fn) -> None:
    """fn(policy_chosen_logps (B,), policy_rejected_logps (B,), nll_loss (), beta, cpo_alpha) -> scalar:
    the mean of −log σ(β(log π_θ(y_w|x) − log π_θ(y_l|x))) plus cpo_alpha × nll_loss."""
    def inputs(g):
        return {"policy_chosen_logps": _seq_logps(g), "policy_rejected_logps": _seq_logps(g),
                "nll_loss": torch.rand((), generator=g) * 3, "beta": _beta(g), "cpo_alpha": _beta(g, 0.5, 1.5)}

    compare("cpo_loss", fn, cpo_loss, inputs)


def check_simpo_reward(fn) -> None:
    """fn(logps (B, T), mask (B, T), beta) -> (B,): β times the average log-prob over each completion's tokens."""
    def inputs(g):
        mask = (torch.rand(5, 9, generator=g) > 0.4).float()
        mask[:, 0] = 1.0  # every completion has a token
        return {"logps": -torch.rand(5, 9, generator=g) * 5, "mask": mask, "beta": _beta(g, 1.0, 5.0)}

    compare("simpo_reward", fn, simpo_reward, inputs)


def check_simpo_loss(fn) -> None:
    """fn(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta, gamma) -> scalar:
    the mean of −log σ(β·log π_θ(y_w|x)/|y_w| − β·log π_θ(y_l|x)/|y_l| − γ)."""
    def inputs(g):
        return {"policy_chosen_logps": _seq_logps(g), "policy_rejected_logps": _seq_logps(g),
                "chosen_lengths": torch.randint(1, 30, (6,), generator=g).float(),
                "rejected_lengths": torch.randint(1, 30, (6,), generator=g).float(),
                "beta": _beta(g, 1.0, 5.0), "gamma": _beta(g, 0.3, 1.5)}

    compare("simpo_loss", fn, simpo_loss, inputs)


# ---------------------------------------------------------------- lesson 08: ORPO

def check_log_odds(fn) -> None:
    """fn(logps (B,)) -> (B,): log(P / (1 − P)) with P = exp(logps), finite for logps close to 0."""
    def inputs(g):
        logps = -torch.rand(8, generator=g) * 4
        logps[0] = -1e-3
        return {"logps": logps}

    compare("log_odds", fn, log_odds, inputs, atol=1e-4)


def check_orpo_loss(fn) -> None:
    """fn(policy_chosen_logps (B,), policy_rejected_logps (B,), nll_loss (), lambda_) -> scalar:
    nll_loss + λ · mean of −log σ(log odds(y_w) − log odds(y_l)), the log-probs being per-token averages."""
    def inputs(g):
        return {"policy_chosen_logps": -torch.rand(6, generator=g) * 3 - 0.01,
                "policy_rejected_logps": -torch.rand(6, generator=g) * 3 - 0.01,
                "nll_loss": torch.rand((), generator=g) * 3, "lambda_": _beta(g)}

    compare("orpo_loss", fn, orpo_loss, inputs)


# ---------------------------------------------------------------- lesson 09: KTO, BCO, DRO

def _kto_inputs(g: torch.Generator) -> dict:
    ref = _seq_logps(g)
    return {"policy_logps": ref + torch.randn(6, generator=g) * 3, "ref_logps": ref, "labels": _labels(g),
            "reference_point": torch.rand((), generator=g) * 2, "beta": _beta(g),
            "desirable_weight": _beta(g, 0.5, 1.5), "undesirable_weight": _beta(g, 0.5, 1.5)}


def check_kto_reference_point(fn) -> None:
    """fn(policy_kl_logps (B,), ref_kl_logps (B,)) -> scalar: the batch mean of the log-ratios, clamped at 0,
    with no gradient flowing through it."""
    def inputs(g):
        ref = _seq_logps(g)
        return {"policy_kl_logps": ref + torch.randn(6, generator=g) + float(torch.randn(1, generator=g)),
                "ref_kl_logps": ref}

    compare("kto_reference_point", fn, kto_reference_point, inputs)

    def grad_of(f):  # the estimate must be detached: its gradient is None, reported here as zeros
        def run(policy_kl_logps, ref_kl_logps):
            x = policy_kl_logps.clone().requires_grad_(True)
            out = f(x, ref_kl_logps)
            if out.requires_grad:
                out.backward()
            return x.grad if x.grad is not None else torch.zeros_like(x)
        return run

    compare("kto_reference_point gradient (must be stopped)", grad_of(fn), grad_of(kto_reference_point), inputs)


def check_kto_loss(fn) -> None:
    """fn(policy_logps, ref_logps, labels, reference_point, beta, desirable_weight, undesirable_weight) -> scalar:
    the mean over examples of λ_y (1 − σ(±β(log π_θ/π_ref − z₀))), + for desirable, − for undesirable."""
    compare("kto_loss", fn, kto_loss, _kto_inputs)


def check_bco_loss(fn) -> None:
    """fn(policy_logps, ref_logps, labels, beta, delta) -> scalar: the mean over examples of
    −log σ(±(β log π_θ/π_ref − δ)), + for desirable, − for undesirable."""
    def inputs(g):
        d = _kto_inputs(g)
        return {"policy_logps": d["policy_logps"], "ref_logps": d["ref_logps"], "labels": d["labels"],
                "beta": d["beta"], "delta": float(torch.randn(1, generator=g)) * 0.3}

    compare("bco_loss", fn, bco_loss, inputs)


def _dro_inputs(g: torch.Generator) -> dict:
    ref = _seq_logps(g)
    return {"policy_logps": ref + torch.randn(6, generator=g), "ref_logps": ref,
            "rewards": torch.rand(6, generator=g), "values": torch.rand(6, generator=g) * 0.5,
            "tau": _beta(g, 0.05, 1.0)}


def check_dro_value_loss(fn) -> None:
    """fn(values, rewards, policy_logps, ref_logps, tau) -> scalar: ½ mean (r − V − τ sg(log π_θ/π_ref))²,
    and its gradient with respect to the values."""
    def inputs(g):
        d = _dro_inputs(g)
        return {"values": d["values"], "rewards": d["rewards"], "policy_logps": d["policy_logps"],
                "ref_logps": d["ref_logps"], "tau": d["tau"]}

    compare("dro_value_loss", fn, dro_value_loss, inputs)
    compare("dro_value_loss gradient", _grad_wrt(fn, 0), _grad_wrt(dro_value_loss, 0), inputs)


def check_dro_policy_loss(fn) -> None:
    """fn(policy_logps, ref_logps, rewards, values, tau) -> scalar: −mean[log π_θ · sg(r − V) − (τ/2)(log π_θ/π_ref)²],
    and its gradient with respect to the policy log-probs."""
    compare("dro_policy_loss", fn, dro_policy_loss, _dro_inputs)
    compare("dro_policy_loss gradient", _grad_wrt(fn, 0), _grad_wrt(dro_policy_loss, 0), _dro_inputs)
