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
6. ``optimal_policy`` (and its forward-KL counterpart) and ``toy_optimize``: an exact toy problem (one categorical "policy" over a few answers)
   on which the reward–KL trade-off and the estimators' gradients can be computed without sampling noise.
7. ``sample_token_kl`` and ``estimator_stats``: sample completions from the real policy and measure each
   estimator's bias and spread against the exact KL; ``sequence_kl``: the exact per-token KL the probes log.

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

from rlcourse.logprobs import collate, to_model_device, tokenize_prompt_completion
from rlcourse.models import reference_policy

# --------------------------------------------------------------------------------------------------
# 1. Exact KL over the vocabulary
# --------------------------------------------------------------------------------------------------


def exact_token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p(v) [log p(v) − log q(v)] over the last axis, in nats.

    logp: (..., V) log-probabilities of the sampling distribution p (π_θ's next-token distribution, a
    ``log_softmax`` output); logq: (..., V) those of q (π_ref). Returns (...), e.g. (B, T-1) for per-token
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

    logps, ref_logps: (B, T-1) log-probs of the sampled tokens under π_θ and π_ref (any equal shapes).
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

    rewards: (B,) task rewards r(x, y) of B sampled completions; logps, ref_logps: (B, T-1) log-probs of
    the sampled tokens under π_θ (the policy that sampled them) and π_ref; mask: (B, T-1), 1 on completion
    tokens. beta: β ≥ 0, a float or a (B,) tensor (one β per completion). estimator: "k1" (Ziegler et al., InstructGPT, TRL's RLOO), "k2" or "k3".

    - ``per_token=False`` returns (B,): r − β Σ_t m_t k_t, one number per completion, as TRL 1.16's RLOO
      does before its leave-one-out baseline.
    - ``per_token=True`` returns (B, T-1) token rewards: −β k_t on every completion token, with r added on
      the last one (PPO's layout, lesson 13). Its row sums equal the per-sequence version.

    The result is detached: a penalty in the reward is a number the policy gradient multiplies with
    ∇ log π, never differentiated itself. With k1 the expected update is then exactly the gradient of
    E[r] − β KL(π_θ ‖ π_ref).
    """
    if rewards.dim() != 1 or logps.dim() != 2 or rewards.shape[0] != logps.shape[0]:
        raise ValueError(f"kl_penalized_rewards: rewards must be (B,) and logps (B, T-1) with the same B; got "
                         f"rewards {tuple(rewards.shape)}, logps {tuple(logps.shape)}.")
    if mask.shape != logps.shape:
        raise ValueError(f"kl_penalized_rewards: mask has shape {tuple(mask.shape)} but logps {tuple(logps.shape)}.")
    beta = torch.as_tensor(beta, dtype=logps.dtype, device=logps.device)
    if (beta < 0).any():
        raise ValueError(f"kl_penalized_rewards: beta={beta.tolist()} is negative; a KL *penalty* needs beta >= 0.")
    beta = beta.reshape(-1, 1) if beta.dim() else beta  # (B, 1) or a scalar
    mask = mask.to(logps.dtype)
    with torch.no_grad():
        penalty = beta * _estimator(estimator)(logps, ref_logps) * mask  # (B, T-1)
        if not per_token:
            return rewards.to(logps.dtype) - penalty.sum(-1)  # (B,)
        lengths = mask.sum(-1)  # (B,)
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        if empty:
            raise ValueError(f"kl_penalized_rewards: rows {empty} have no completion token (mask all zero), so "
                             f"there is no token to put their reward on; drop those rows or fix their mask.")
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T-1)
        last = (positions * (mask > 0)).amax(-1)  # (B,): column of each row's last completion token
        token_rewards = -penalty  # (B, T-1)
        token_rewards[torch.arange(mask.shape[0]), last] += rewards.to(logps.dtype)
        return token_rewards


def kl_loss_term(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    old_logps: torch.Tensor | None = None,
    estimator: str = "k3",
) -> torch.Tensor:
    """KL as a loss term: β · k_t per token, added to the per-token policy loss  (GRPO, Shao et al. 2024).

    logps: (B, T-1) log π_θ of the sampled tokens, *with* gradient; ref_logps: (B, T-1) log π_ref (no
    gradient); old_logps: (B, T-1) log π_θ_old of the policy that sampled them, or None; beta: β.
    Returns (B, T-1), unmasked: the caller adds it to its per-token loss and aggregates with its mask,
    exactly as TRL's GRPOTrainer adds ``beta * per_token_kl`` before its ``loss_type`` aggregation.

    ``old_logps`` given: the term is multiplied by the importance ratio ρ_t = exp(logps − old_logps), as
    TRL 1.16 does by default (``use_bias_correction_kl=True``). On-policy (``old_logps = logps.detach()``)
    ρ_t = 1 in value, but not in gradient. With samples from π_θ, the expected gradient of Σ_t k3_t is
    that of the *forward* KL(π_ref ‖ π_θ); that of Σ_t ρ_t k3_t is that of the *reverse* KL(π_θ ‖ π_ref),
    the one the reward-penalty form optimises. (k1 as a loss has zero expected gradient: it does not
    regularise at all. k2's gradient is the reverse KL's.)
    """
    _check_pair("kl_loss_term", logps, ref_logps)
    term = beta * _estimator(estimator)(logps, ref_logps.detach())  # (B, T-1)
    if old_logps is not None:
        _check_pair("kl_loss_term (old_logps)", logps, old_logps)
        term = term * torch.exp(logps - old_logps.detach())
    return term


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
# 6. An exact toy problem: one categorical "policy" over K answers, a fixed reward per answer
# --------------------------------------------------------------------------------------------------


def optimal_policy(ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """π*(a) ∝ π_ref(a) · exp(r(a) / β): the maximiser of E_π[r] − β KL(π ‖ π_ref).

    ref_logprobs: (..., K) log π_ref; rewards: (K,) or (..., K); beta: β > 0. Returns (..., K) log π*.
    (The closed form DPO starts from: Rafailov et al. 2023, Eq. 4.)
    """
    return torch.log_softmax(ref_logprobs + rewards / beta, dim=-1)


def optimal_policy_forward_kl(ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta, iters: int = 200
                              ) -> torch.Tensor:
    """The maximiser of E_π[r] − β KL(π_ref ‖ π), the *forward* KL: where GRPO's plain k3 loss term leads.

    Setting the gradient of the Lagrangian to zero gives π(a) = β π_ref(a) / (λ − r(a)), with λ > max r chosen
    so that the probabilities sum to 1 (found by bisection; Σ_a is decreasing in λ). ref_logprobs: (K,);
    rewards: (K,); beta: float or (N, 1). Returns (N, K) (or (K,)) log-probabilities.
    """
    ref = ref_logprobs.exp().double()
    r = rewards.double()
    beta = torch.as_tensor(beta, dtype=torch.float64)
    total = lambda lam: (beta * ref / (lam - r)).sum(-1, keepdim=True)  # noqa: E731  (N, 1), decreasing in λ
    lo = torch.full_like(total(r.max() + 1.0), r.max().item())  # Σ → ∞ as λ → max r from above
    hi = lo + 1.0
    while (total(hi) > 1).any():
        hi = torch.where(total(hi) > 1, lo + 2 * (hi - lo), hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = total(mid) > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    probs = beta * ref / ((lo + hi) / 2 - r)  # (N, K) or (K,)
    return torch.log(probs / probs.sum(-1, keepdim=True))


TOY_MODES = ("reward_k1", "loss_k1", "loss_k2", "loss_k3", "loss_k3_ratio")
"""Where the KL goes in ``toy_optimize``: in the reward (k1), or in the loss with k1, k2, k3, or k3 × ratio (TRL 1.16)."""


def toy_surrogate(logits: torch.Tensor, ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta, mode: str
                  ) -> torch.Tensor:
    """The loss whose gradient is the *expected* policy-gradient update, summed exactly over the K answers.

    logits: (N, K) policy logits θ (N independent problems, e.g. one per β); ref_logprobs: (K,) log π_ref;
    rewards: (K,) r(a); beta: float or (N,) tensor. Each answer a is one "completion" of one token, so the
    estimators get (N·K, 1) tensors. Sampling is replaced by weighting with sg(π(a)): no noise, the same
    expectation. Returns a scalar to minimise.
    """
    if mode not in TOY_MODES:
        raise ValueError(f"unknown toy mode {mode!r}; choose one of {TOY_MODES}")
    n, k = logits.shape
    logp = torch.log_softmax(logits, -1)  # (N, K)
    weight = logp.detach().exp()  # (N, K): sg(π), the sampling probability
    beta = torch.as_tensor(beta, dtype=logp.dtype).reshape(-1, 1).expand(n, 1)  # (N, 1)
    flat = logp.reshape(n * k, 1)  # (N·K, 1): each answer a one-token completion
    ref = ref_logprobs.expand(n, k).reshape(n * k, 1)  # (N·K, 1)
    r = rewards.expand(n, k).reshape(n * k)  # (N·K,)
    beta_rows = beta.expand(n, k).reshape(n * k)  # (N·K,): each answer carries its problem's β
    if mode == "reward_k1":
        shaped = kl_penalized_rewards(r, flat, ref, torch.ones_like(flat), beta_rows, estimator="k1")  # (N·K,)
        return -(weight * shaped.reshape(n, k) * logp).sum()  # REINFORCE: −Σ_a sg(π(a)) R(a) log π(a)
    estimator = mode.split("_")[1]
    old = flat.detach() if mode == "loss_k3_ratio" else None
    term = kl_loss_term(flat, ref, beta=1.0, old_logps=old, estimator=estimator).reshape(n, k)  # (N, K): k(a)
    return -(weight * rewards * logp).sum() + (weight * beta * term).sum()  # REINFORCE + β·E[k]


def toy_optimize(ref_logprobs: torch.Tensor, rewards: torch.Tensor, betas, mode: str, steps: int = 3000,
                 lr: float = 0.05, controller: AdaptiveKLController | None = None) -> dict:
    """Optimise N = len(betas) categorical policies from π_ref with Adam on ``toy_surrogate``; exact, no sampling.

    ref_logprobs: (K,); rewards: (K,); betas: N values of β. With ``controller`` (then N must be 1) β is
    updated after every step from the exact KL, with n_steps = 1. Returns tensors: "logprobs" (N, K) at the
    end, "reward" and "kl" (steps+1, N) along the way (E_π[r] and KL(π ‖ π_ref) exactly), "beta" (steps+1, N).
    """
    betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)  # (N,)
    if controller is not None and betas.numel() != 1:
        raise ValueError("toy_optimize: with a controller, pass a single beta (the controller owns it).")
    ref = ref_logprobs.double()
    logits = ref.expand(betas.numel(), -1).clone().requires_grad_(True)  # (N, K): start at π_ref
    opt = torch.optim.Adam([logits], lr=lr)
    history = {"reward": [], "kl": [], "beta": []}

    def record(beta_now):
        with torch.no_grad():
            logp = torch.log_softmax(logits, -1)
            history["reward"].append((logp.exp() * rewards.double()).sum(-1))
            history["kl"].append(exact_token_kl(logp, ref.expand_as(logp)))
            history["beta"].append(beta_now.clone())

    beta_now = betas.clone() if controller is None else torch.tensor([controller.beta], dtype=torch.float64)
    record(beta_now)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: worker threads only add waiting (20x slower on a busy 2-core machine)
    try:
        for _ in range(steps):
            opt.zero_grad()
            toy_surrogate(logits, ref, rewards.double(), beta_now, mode).backward()
            opt.step()
            if controller is not None:
                with torch.no_grad():
                    logp = torch.log_softmax(logits, -1)
                    kl = exact_token_kl(logp, ref.expand_as(logp)).item()
                beta_now = torch.tensor([controller.update(kl, n_steps=1)], dtype=torch.float64)
            record(beta_now)
    finally:
        torch.set_num_threads(threads)
    return {"logprobs": torch.log_softmax(logits.detach(), -1),
            **{k: torch.stack(v) for k, v in history.items()}}


# --------------------------------------------------------------------------------------------------
# 7. Measuring on the real policy
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_token_kl(model, tokenizer, prompts: list, num_samples: int, max_new_tokens: int, seed: int = 0,
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Sample ``num_samples`` completions per prompt from π_θ (temperature 1, no top-k/top-p) and score each token.

    Works on token ids throughout (no decode/re-encode), so every scored token really was drawn from π_θ,
    which the estimators' unbiasedness needs. A completion ends at its first EOS (which counts) or after
    ``max_new_tokens``. Returns, with N = len(prompts) · num_samples completions (prompt i's k-th sample at
    row i·num_samples + k, as in course/notation.md) and L = max_new_tokens:

    - ``logps``, ``ref_logps``: (N, L) log π_θ and log π_ref of each sampled token;
    - ``exact_kl``: (N, L) the exact KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) over the vocabulary at each position;
    - ``mask``: (N, L) 1 on completion tokens; ``prompt_index``: (N,) which prompt each row answers;
    - ``completion_ids``: (N, L) the sampled token ids (padding after the first EOS is the pad token).
    """
    from rlcourse.sampling import prompt_text

    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_token_kl: num_samples ({num_samples}) and max_new_tokens ({max_new_tokens}) "
                         f"must be at least 1.")
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    out = {k: [] for k in ("logps", "ref_logps", "exact_kl", "mask", "completion_ids")}
    torch.manual_seed(seed)
    try:
        for prompt in prompts:
            enc = tokenizer(prompt_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
            ids = enc["input_ids"].to(model.device)  # (1, P)
            n_prompt = ids.shape[1]
            # top_k=0, explicit: the estimators are unbiased only for samples from π (unset, generate() cuts at 50)
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                  num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id)
            completion = seqs[:, n_prompt:]  # (S, L') with L' ≤ L
            is_eos = (completion == eos).long()
            before = torch.cumsum(is_eos, 1) - is_eos  # EOS tokens strictly before each position
            mask = (before == 0).float()  # (S, L'): up to and including the first EOS
            for start in range(0, num_samples, batch_size):
                chunk = seqs[start : start + batch_size]  # (b, P + L')
                logits = model(input_ids=chunk).logits[:, n_prompt - 1 : -1].float()  # (b, L', V)
                with reference_policy(model):
                    ref_logits = model(input_ids=chunk).logits[:, n_prompt - 1 : -1].float()  # (b, L', V)
                logp, logq = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)  # (b, L', V)
                target = chunk[:, n_prompt:].unsqueeze(-1)  # (b, L', 1)
                out["logps"].append(logp.gather(-1, target).squeeze(-1))  # (b, L')
                out["ref_logps"].append(logq.gather(-1, target).squeeze(-1))
                out["exact_kl"].append(exact_token_kl(logp, logq))
                out["mask"].append(mask[start : start + batch_size])
                out["completion_ids"].append(chunk[:, n_prompt:])
    finally:
        model.train(was_training)

    def pad(t: torch.Tensor, value) -> torch.Tensor:  # (b, L') -> (b, L)
        return F.pad(t, (0, max_new_tokens - t.shape[1]), value=value).cpu()

    result = {k: torch.cat([pad(t, tokenizer.pad_token_id if k == "completion_ids" else 0) for t in v])
              for k, v in out.items()}  # each (N, L)
    result["prompt_index"] = torch.arange(len(prompts)).repeat_interleave(num_samples)  # (N,)
    return result


def estimator_stats(logps: torch.Tensor, ref_logps: torch.Tensor, exact_kl: torch.Tensor, mask: torch.Tensor,
                    prompt_index: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Bias and spread of k1, k2, k3 against the exact KL, per token and per sequence.

    Inputs as ``sample_token_kl`` returns them: (N, L) tensors and prompt_index (N,).

    - **token** level, over the M masked tokens: the error e_t = k_t − KL_t, where KL_t is the exact KL at
      that prefix (the estimator's conditional mean if it is unbiased). "bias" = mean e, "bias_se" its
      standard error, "std" = std of e (the noise one token adds).
    - **sequence** level: K_i = Σ_t m k_t per completion, and "exact" E_i = Σ_t m KL_t. "bias" = mean of
      K_i − E_i over completions (0 in expectation for k1, k3: at each prefix they average to KL_t);
      "std" = the spread of K_i between completions of the same prompt (pooled over prompts), i.e. the
      noise of a one-sample KL estimate; "mean" = the mean of K_i.
    """
    mask = mask.double()
    exact_kl = exact_kl.double()
    n_tokens = mask.sum()
    estimates = {name: fn(logps.double(), ref_logps.double()) for name, fn in ESTIMATORS.items()}  # each (N, L)
    sums = {name: (v * mask).sum(-1) for name, v in estimates.items()}  # each (N,)
    exact_sum = (exact_kl * mask).sum(-1)  # (N,)

    def pooled_std(x: torch.Tensor) -> float:
        groups = [x[prompt_index == p] for p in prompt_index.unique()]
        var = [g.var(unbiased=True) for g in groups if g.numel() > 1]
        return float(torch.stack(var).mean().sqrt()) if var else float("nan")

    def se(x: torch.Tensor, n) -> float:
        return float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    token, sequence = {}, {}
    for name, est in estimates.items():
        err = (est - exact_kl)[mask > 0]  # (M,)
        token[name] = {"bias": float(err.mean()), "bias_se": se(err, err.numel()), "std": float(err.std())}
        diff = sums[name] - exact_sum  # (N,)
        sequence[name] = {"bias": float(diff.mean()), "bias_se": se(diff, diff.numel()),
                          "std": pooled_std(sums[name]), "mean": float(sums[name].mean())}
    token["exact"] = {"bias": 0.0, "bias_se": 0.0, "std": 0.0}
    sequence["exact"] = {"bias": 0.0, "bias_se": 0.0, "std": pooled_std(exact_sum), "mean": float(exact_sum.mean())}
    return {"token": token, "sequence": sequence,
            "counts": {"completions": int(mask.shape[0]), "tokens": int(n_tokens),
                       "exact_kl_per_token": float((exact_kl * mask).sum() / n_tokens.clamp(min=1))}}


@torch.no_grad()
def sequence_kl(model, tokenizer, prompts: list, completions: list[str], batch_size: int = 8) -> list[float]:
    """Σ_t KL(π_θ ‖ π_ref) at each completion token, one value (nats) per completion.

    The exact per-token KL (``exact_token_kl``) summed over the completion's tokens: the lower-variance
    counterpart of summing k1 over the same tokens. The completions are text, re-tokenized with the chat
    template (the probes log this during training).
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
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logp = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)  # (B, T-1, V)
        with reference_policy(model):
            logq = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)  # (B, T-1, V)
        token_kl = exact_token_kl(logp, logq)  # (B, T-1)
        mask = batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]
        out.extend((token_kl * mask).sum(-1).tolist())
    model.train(was_training)
    return out
