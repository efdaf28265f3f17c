"""KL(π_θ ‖ π_ref) between the policy and its reference: exact, estimated from samples, and as a brake.

What this module implements (lesson 10; the RLOO, GRPO and PPO lessons import it):

1. ``exact_token_kl``: the exact KL between two next-token distributions, summed over the vocabulary.
2. ``kl_k1``, ``kl_k2``, ``kl_k3``: the single-sample estimators of John Schulman's note "Approximating KL
   Divergence" (2020, joschu.net/blog/kl-approx.html), as functions of the log-probs of the *sampled* token.
3. ``kl_penalized_rewards``: KL as a penalty in the reward (Ziegler et al. 2019; RLOO and PPO), per sequence
   or per token.
4. ``kl_loss_term``: KL as a term added to the loss (GRPO, Shao et al. 2024), with TRL 1.16's optional
   importance-ratio correction.
5. ``AdaptiveKLController``: Ziegler et al.'s controller that adapts β to hit a target KL.
6. ``sequence_kl``: the exact per-token KL summed over a text completion, what the probes log.

Lesson 10's experiments with these pieces (an exact toy problem, the estimators measured on sampled completions)
are in ``rlcourse.kl_study``.

**Convention.** Schulman samples x ~ q and estimates KL[q, p] with the ratio r = p(x)/q(x). Here the sampler
q is the policy π_θ and p is the reference π_ref, so for a sampled token y_t

    log r_t = log π_ref(y_t | s_t) − log π_θ(y_t | s_t) = ref_logps − logps,

and k1 = −log r, k2 = ½ (log r)², k3 = (r − 1) − log r. All three are functions of two numbers per token,
which is why online trainers use them: the exact KL needs both full (V,) distributions at every position.

**Departures and choices.** The estimators are per token; a sequence's KL is their masked sum over
completion tokens (the notation page's convention: nats per sequence). TRL 1.16's GRPO multiplies its k3
term by the importance ratio π_θ/π_old by default (``use_bias_correction_kl=True``, after the DeepSeek-V3.2
report, arXiv:2512.02556); ``kl_loss_term`` does the same when given ``old_logps``. That factor equals 1 in
value on-policy but changes the gradient from the forward KL's to the reverse KL's (see ``kl_loss_term``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlcourse.batches import collate
from rlcourse.logprobs import shift_mask, to_model_device
from rlcourse.tokenization import tokenize_prompt_completion
from rlcourse.models import reference_policy

# --------------------------------------------------------------------------------------------------
# 1. Exact KL over the vocabulary
# --------------------------------------------------------------------------------------------------


def exact_token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p(v) [log p(v) − log q(v)] over the last axis, in nats.

    logp: (..., V) log-probabilities of the sampling distribution p (π_θ's next-token distribution, a
    ``log_softmax`` output); logq: (..., V) those of q (π_ref). Returns (...), e.g. (N, T-1) for per-token
    distributions. Terms with p(v) = 0 count 0 (the limit of p log p), so a -inf in ``logp`` is fine.
    """
    if logp.shape != logq.shape:
        raise ValueError(f"exact_token_kl: logp has shape {tuple(logp.shape)} but logq {tuple(logq.shape)}; "
                         f"pass both distributions over the same vocabulary (..., V).")
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)  # (..., V) -> (...)


# --------------------------------------------------------------------------------------------------
# 2. Single-sample estimators (Schulman 2020), in the sampler's convention: tokens are drawn from π_θ
# --------------------------------------------------------------------------------------------------


def _check_pair(name: str, logps: torch.Tensor, ref_logps: torch.Tensor) -> None:
    if logps.shape != ref_logps.shape:
        raise ValueError(f"{name}: logps has shape {tuple(logps.shape)} but ref_logps {tuple(ref_logps.shape)}; "
                         f"both must be log-probs of the same sampled tokens.")


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = −log r = log π_θ(y_t|s_t) − log π_ref(y_t|s_t)  (Schulman 2020, "the naive estimator").

    logps, ref_logps: (N, T-1) log-probs of the sampled tokens under π_θ and π_ref (any equal shapes).
    Returns the same shape. Unbiased for KL(π_θ ‖ π_ref) when y_t ~ π_θ(·|s_t), but negative for about
    half the tokens, so its variance is high. This is RLOO's penalty in TRL 1.16 (summed over tokens).
    """
    _check_pair("kl_k1", logps, ref_logps)
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log r)² = ½ (log π_ref − log π_θ)²  (Schulman 2020).

    Shapes as ``kl_k1``. Never negative and low-variance, but *biased*: its expectation under π_θ is an
    f-divergence that agrees with the KL only to second order in log r. Its gradient, though, is the
    reverse-KL score-function gradient (see ``kl_loss_term``).
    """
    _check_pair("kl_k2", logps, ref_logps)
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r, r = π_ref(y_t|s_t) / π_θ(y_t|s_t)  (Schulman 2020; GRPO's KL, Shao et al. 2024).

    Shapes as ``kl_k1``. k1 plus the control variate r − 1, whose expectation under π_θ is 0: still unbiased,
    never negative (log r ≤ r − 1), and ≈ ½ (log r)² when log r is small. TRL writes it
    ``exp(ref − logp) − (ref − logp) − 1``; ``expm1`` gives the same value without losing the small ones to
    rounding (exp(x) − 1 − x cancels to 0 for |x| below ~1e-8).
    """
    _check_pair("kl_k3", logps, ref_logps)
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Estimator name -> function(logps, ref_logps) -> per-token estimate."""


def _estimator(name: str):
    if name not in ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


# --------------------------------------------------------------------------------------------------
# 3. KL in the reward vs 4. KL in the loss
# --------------------------------------------------------------------------------------------------


def kl_penalized_rewards(
    rewards: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float | torch.Tensor,
    per_token: bool = False,
    estimator: str = "k1",
) -> torch.Tensor:
    """KL as a penalty in the reward: R(x, y) = r(x, y) − β · KL̂(y)  (Ziegler et al. 2019, Section 2.2).

    rewards: (N,) task rewards r(x, y) of N sampled completions; logps, ref_logps: (N, T-1) log-probs of
    the sampled tokens under π_θ (the policy that sampled them) and π_ref; mask: (N, T-1), 1 on completion
    tokens. beta: β ≥ 0, a float or a (N,) tensor (one β per completion). estimator: "k1" (Ziegler et al.,
    InstructGPT, TRL's RLOO), "k2" or "k3".

    - ``per_token=False`` returns (N,): r − β Σ_t m_t k_t, one number per completion, as TRL 1.16's RLOO
      does before its leave-one-out baseline.
    - ``per_token=True`` returns (N, T-1) token rewards: −β k_t on every completion token, with r added on
      the last one (PPO's layout, lesson 13). Its row sums equal the per-sequence version.

    The result is detached: a penalty in the reward is a number the policy gradient multiplies with
    ∇ log π, never differentiated itself. With k1 the expected update is then exactly the gradient of
    E[r] − β KL(π_θ ‖ π_ref).
    """
    if rewards.dim() != 1 or logps.dim() != 2 or rewards.shape[0] != logps.shape[0]:
        raise ValueError(f"kl_penalized_rewards: rewards must be (N,) and logps (N, T-1) with the same N; got "
                         f"rewards {tuple(rewards.shape)}, logps {tuple(logps.shape)}.")
    if mask.shape != logps.shape:
        raise ValueError(f"kl_penalized_rewards: mask has shape {tuple(mask.shape)} but logps {tuple(logps.shape)}.")
    beta = torch.as_tensor(beta, dtype=logps.dtype, device=logps.device)
    if (beta < 0).any():
        raise ValueError(f"kl_penalized_rewards: beta={beta.tolist()} is negative; a KL *penalty* needs beta >= 0.")
    beta = beta.reshape(-1, 1) if beta.dim() else beta  # (N, 1) or a scalar
    mask = mask.to(logps.dtype)
    with torch.no_grad():
        penalty = beta * _estimator(estimator)(logps, ref_logps) * mask  # (N, T-1)
        if not per_token:
            return rewards.to(logps.dtype) - penalty.sum(-1)  # (N,)
        lengths = mask.sum(-1)  # (N,)
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        if empty:
            raise ValueError(f"kl_penalized_rewards: rows {empty} have no completion token (mask all zero), so "
                             f"there is no token to put their reward on; drop those rows or fix their mask.")
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (N, T-1)
        last = (positions * (mask > 0)).amax(-1)  # (N,): column of each row's last completion token
        token_rewards = -penalty  # (N, T-1)
        token_rewards[torch.arange(mask.shape[0]), last] += rewards.to(logps.dtype)
        return token_rewards


def kl_loss_term(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    old_logps: torch.Tensor | None = None,
    estimator: str = "k3",
    ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL as a loss term: β · k_t per token, added to the per-token policy loss  (GRPO, Shao et al. 2024).

    logps: (N, C) log π_θ of the sampled tokens, *with* gradient; ref_logps: (N, C) log π_ref (no
    gradient); old_logps: (N, C) log π_θ_old of the policy that sampled them, or None; beta: β.
    Returns (N, C), unmasked: the caller adds it to its per-token loss and aggregates with its mask,
    exactly as TRL's GRPOTrainer adds ``beta * per_token_kl`` before its ``loss_type`` aggregation
    (``rlcourse.losses.grpo.grpo_loss`` does).

    ``old_logps`` given: the term is multiplied by the importance ratio ρ_t = exp(logps − old_logps), as
    TRL 1.16 does by default (``use_bias_correction_kl=True``). On-policy (``old_logps = logps.detach()``)
    ρ_t = 1 in value, but not in gradient. With samples from π_θ, the expected gradient of Σ_t k3_t is
    that of the *forward* KL(π_ref ‖ π_θ); that of Σ_t ρ_t k3_t is that of the *reverse* KL(π_θ ‖ π_ref),
    the one the reward-penalty form optimises. (k1 as a loss has zero expected gradient: it does not
    regularise at all. k2's gradient is the reverse KL's.) ``ratio``: an importance ratio the caller already
    has, used instead of the per-token one, e.g. GSPO's per-sequence ratio, (N, 1).
    """
    _check_pair("kl_loss_term", logps, ref_logps)
    k = _estimator(estimator)(logps, ref_logps.detach())  # (N, C)
    if ratio is None and old_logps is not None:
        _check_pair("kl_loss_term (old_logps)", logps, old_logps)
        ratio = torch.exp(logps - old_logps.detach())
    if ratio is not None:
        k = k * ratio  # then β, in TRL's order
    return beta * k


# --------------------------------------------------------------------------------------------------
# 5. The adaptive KL controller (Ziegler et al. 2019, Section 2.2)
# --------------------------------------------------------------------------------------------------


@dataclass
class AdaptiveKLController:
    """β that adapts to keep the measured KL near a target  (Ziegler et al. 2019, Section 2.2).

    After each batch: e = clip(KL / target − 1, −clip, clip) and β ← β · (1 + e · n_steps / horizon).
    The paper writes the gain as K_β = 0.1 per update; its code (lm-human-preferences) and every port since
    write it as n_steps / horizon, with n_steps the samples in the batch, so that the speed of adaptation does
    not depend on the batch size. The clip keeps one noisy KL estimate from moving β by more than a factor
    (1 ± clip · n_steps / horizon).
    """

    init_beta: float
    """β at the start (the paper's β_0)."""
    target: float
    """The KL to aim for, in the same units as the KL passed to ``update`` (here: nats per sequence)."""
    horizon: int = 10000
    """Samples over which a persistent error of 100% changes β by a factor about e^clip; larger is slower."""
    clip: float = 0.2
    """Largest proportional error one update acts on (the paper's ±0.2)."""
    beta: float = field(init=False)
    """The current β; starts at ``init_beta``."""

    def __post_init__(self):
        if not (self.init_beta > 0 and self.target > 0 and self.horizon > 0 and self.clip > 0):
            raise ValueError(f"AdaptiveKLController needs init_beta, target, horizon and clip all > 0; got "
                             f"init_beta={self.init_beta}, target={self.target}, horizon={self.horizon}, "
                             f"clip={self.clip}.")
        self.beta = float(self.init_beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Fold in the KL measured on the last batch of ``n_steps`` samples; return the new β."""
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl={current_kl} is not finite; check the KL "
                             f"estimate (a NaN here usually means a log-prob of -inf).")
        error = min(max(current_kl / self.target - 1.0, -self.clip), self.clip)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# --------------------------------------------------------------------------------------------------
# 6. The exact KL of text completions (what the probes log)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_kl(model, tokenizer, prompts: list, completions: list[str], batch_size: int = 8) -> list[float]:
    """Σ_t KL(π_θ ‖ π_ref) at each completion token, one value (nats) per completion.

    The exact per-token KL (``exact_token_kl``) summed over the completion's tokens: the lower-variance
    counterpart of summing k1 over the same tokens. The completions are text, re-tokenized with the chat
    template (the probes log this during training). Without gradient, and with logits only from the first
    position that predicts a completion token on: no vocabulary-wide logits for positions inside the prompts.
    """
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            tokenize_prompt_completion(tokenizer, p, [{"role": "assistant", "content": c}] if isinstance(p, list) else c)
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])
        ]
        batch = to_model_device(model, collate(rows, tokenizer.pad_token_id))
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        mask = shift_mask(batch.completion_mask, batch.attention_mask)  # (N, T-1): position t predicts token t+1
        if not bool(mask.any()):  # every completion empty
            out.extend([0.0] * mask.size(0))
            continue
        first = int(mask.any(0).nonzero()[0])  # the first position that predicts a completion token
        keep = mask.size(1) - first + 1  # logits of positions first..T-1; the last one predicts nothing
        with torch.no_grad():
            # (N, T-1-first, V): from the first completion-predicting position on
            logp = F.log_softmax(model(**inputs, logits_to_keep=keep).logits[:, :-1].float(), -1)
            with reference_policy(model):
                logq = F.log_softmax(model(**inputs, logits_to_keep=keep).logits[:, :-1].float(), -1)
        token_kl = exact_token_kl(logp, logq)  # (N, T-1-first)
        out.extend((token_kl * mask[:, first:]).sum(-1).tolist())
    model.train(was_training)
    return out
