"""Lesson 10's KL experiments: an exact toy problem, and the estimators measured on the real policy.

Built on the primitives of ``rlcourse.kl`` (the exact KL, the k1/k2/k3 estimators, the reward penalty, the loss
term and the adaptive controller):

1. ``optimal_policy`` (and its forward-KL counterpart ``optimal_policy_forward_kl``) and ``toy_optimize``: one
   categorical "policy" over a few answers, on which the reward–KL trade-off and the estimators' gradients can
   be computed exactly, without sampling noise.
2. ``sample_token_kl`` and ``estimator_stats``: sample completions from the real policy and measure each
   estimator's bias and spread against the exact KL.

Conventions (the sampler π_θ, log r = ref_logps − logps, nats per sequence) are those of ``rlcourse.kl``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlcourse.kl import ESTIMATORS, AdaptiveKLController, exact_token_kl, kl_loss_term, kl_penalized_rewards
from rlcourse.models import reference_policy

# --------------------------------------------------------------------------------------------------
# 1. An exact toy problem: one categorical "policy" over K answers, a fixed reward per answer
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
# 2. Measuring on the real policy
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
