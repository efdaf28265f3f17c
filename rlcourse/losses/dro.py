"""DRO: direct reward optimisation from single (prompt, completion, scalar reward) triples (lesson 09).

Richemond, Tang, Guo, Calandriello, Azar, Rafailov, Pires, Tarassov, Spangher, Ellsworth, Severyn, Mallinson,
Shani, Shamir, Joshi, Liu, Munos & Piot 2024, "Offline Regularised Reinforcement Learning for Large Language Models
Alignment" (arXiv:2405.19107). No pairs, no labels: each example is (x, y, r) with a scalar reward. KL-regularised
RL, max_π E[r] − τ KL(π ‖ π_ref), has the optimum π*(y|x) = π_ref(y|x) exp(r(x, y)/τ) / Z(x), whose log-partition
V*(x) = τ log Z(x) is a *value*: for every completion y of every prompt x,

    r(x, y) − V*(x) = τ log π*(y|x)/π_ref(y|x).

DRO fits this identity by least squares, on offline data, jointly over a policy π_θ and a value V_φ(x):

    L_DRO(θ, φ) = ½ E_{(x,y,r)} [ ( r(x, y) − V_φ(x) − τ log π_θ(y|x)/π_ref(y|x) )² ]          (``dro_loss``)

The paper (DRO-V) optimises it with two losses that share its minimiser:

- ``dro_value_loss``: ½ E[(r − V_φ(x) − τ sg(ρ))²], ρ = log π_θ(y|x)/π_ref(y|x): a regression of the value on the
  regularised return, the policy held fixed.
- ``dro_policy_loss``: −E[ log π_θ(y|x) · sg(r − V_φ(x)) − (τ/2) ρ² ]: a policy gradient with the value as
  baseline, plus a squared log-ratio that keeps π_θ near π_ref. Its gradient in θ is the gradient of L_DRO divided
  by τ (the ladder step from REINFORCE with a baseline: one quadratic regulariser).

There is no TRL counterpart. Departures and choices, stated:

- Log-probs are sums over completion tokens (``masked_sum``), the sequence-level log π(y|x) of the paper.
- The policy loss is scaled by 1/τ relative to ∂L_DRO/∂θ: the REINFORCE term carries no τ and the penalty τ/2, the
  form in which DRO's policy update is usually implemented (e.g. Tinker's DRO loss); the paper's own scaling of
  the two updates was not checked offline. Only the step size differs. The value loss is ∂L_DRO/∂φ itself.
- V_φ(x) is whatever the caller provides, shape (B,) (one value per row, the same for rows that share a prompt);
  the paper uses a separate value network. Lesson 09 uses a small head or a per-prompt table.
- Each loss is a mean over the B rows, a scalar.
"""

from __future__ import annotations

import torch

from rlcourse.losses._validate import same_shape_1d


def dro_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """L_DRO = ½ mean_B ( r − V(x) − τ log π_θ(y|x)/π_ref(y|x) )²   (Richemond et al. 2024, the DRO objective).

    policy_logps, ref_logps: (B,) log π_θ(y|x), log π_ref(y|x) summed over completion tokens.
    rewards: (B,) r(x, y), one scalar per completion. values: (B,) V(x) of each row's prompt.
    tau: τ, the KL-regularisation strength (the role β plays in DPO). Returns a scalar; its gradients reach both
    the policy log-probs and the values.
    """
    same_shape_1d(policy_logps=policy_logps, ref_logps=ref_logps, rewards=rewards, values=values)
    residual = rewards - values - tau * (policy_logps - ref_logps)  # (B,)
    return 0.5 * (residual ** 2).mean()


def dro_value_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """L_V = ½ mean_B ( r − V(x) − τ sg(log π_θ(y|x)/π_ref(y|x)) )²: the value's half of DRO, the policy held fixed.

    For a fixed policy its minimiser is V(x) = mean over x's completions of r − τρ, the regularised return.
    values: (B,) V(x), the only input that receives a gradient. rewards, policy_logps, ref_logps, tau: as in
    ``dro_loss``. Returns a scalar.
    """
    same_shape_1d(values=values, rewards=rewards, policy_logps=policy_logps, ref_logps=ref_logps)
    target = rewards - tau * (policy_logps - ref_logps).detach()  # (B,) regularised return
    return 0.5 * ((target - values) ** 2).mean()


def dro_policy_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    tau: float = 1.0,
) -> torch.Tensor:
    """L_π = −mean_B [ log π_θ(y|x) · sg(r − V(x)) − (τ/2) (log π_θ(y|x)/π_ref(y|x))² ]: the policy's half of DRO.

    A REINFORCE term with the value as baseline (the advantage r − V gets no gradient) plus a quadratic penalty on
    the log-ratio. ∂L_π/∂θ = (1/τ) ∂L_DRO/∂θ. policy_logps: (B,), the only input that receives a gradient;
    ref_logps, rewards, values: (B,); tau: τ. Returns a scalar.
    """
    same_shape_1d(policy_logps=policy_logps, ref_logps=ref_logps, rewards=rewards, values=values)
    advantages = (rewards - values).detach()  # (B,) r − V(x)
    logratios = policy_logps - ref_logps  # (B,) ρ
    return -(policy_logps * advantages - 0.5 * tau * logratios ** 2).mean()
