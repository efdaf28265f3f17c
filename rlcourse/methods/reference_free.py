"""CPO, SimPO (lesson 07) and ORPO (lesson 08) on preference pairs: no reference model, one forward per step.

The losses live in ``rlcourse.losses.cpo`` and ``rlcourse.losses.orpo``; this module turns preference rows into
batches and a batch into (loss, metrics) for ``rlcourse.train.train``, as TRL 1.16's ``trl.experimental.cpo.CPOTrainer``
and ``trl.experimental.orpo.ORPOTrainer`` do:

- ``tokenize_pair``: DPO's tokenisation (``rlcourse.methods.dpo.tokenize_pair``) plus one EOS token appended to each
  completion. Departure we reproduce for parity: both trainers tokenise the chat-templated *text* and then call
  ``add_eos_token_if_needed``, which appends ``eos_token_id`` unless the completion already ends with it. SmolLM2's
  template ends a turn with ``<|im_end|>\\n``, so the last token is "\\n" and every completion gets a second
  ``<|im_end|>``: the policy learns to emit ``<|im_end|>\\n<|im_end|>``. Harmless for generation (the first
  ``<|im_end|>`` already stops it), but it changes the log-probs, so a parity check must include it.
- Batches are DPO's: one (2B, T) tensor, the B chosen sequences first (``rlcourse.methods.dpo.collate_pairs``).
- ``cpo_step`` (``loss_type`` "sigmoid" is CPO, "simpo" is SimPO): one policy forward, no reference forward. CPO's
  NLL term is the token mean over the chosen completions, SimPO's log-probs are per-token averages.
- ``orpo_step``: the NLL term covers prompt *and* completion tokens of the chosen sequence, as TRL's does (the
  paper's covers the completion only; see ``rlcourse.losses.orpo``), and the odds ratio uses per-token averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from rlcourse.logprobs import masked_mean, masked_sum, shift_mask, to_model_device, token_entropy, token_logprobs
from rlcourse.losses.cpo import cpo_loss, simpo_loss
from rlcourse.losses.orpo import log_odds, odds_ratio_loss, orpo_loss
from rlcourse.losses.sft import sft_loss
from rlcourse.methods import dpo

CPO_LOSS_TYPES = ("sigmoid", "simpo")
"""The ``CPOTrainer`` loss types built here: CPO's reference-free sigmoid and SimPO."""


@dataclass(frozen=True)
class CPOSettings:
    """CPO and SimPO options; the TRL names are in brackets (``CPOConfig`` fields)."""

    loss_type: str = "sigmoid"
    """"sigmoid" (CPO) or "simpo" [``loss_type``]."""
    beta: float = 0.1
    """β [``beta``]: scales the log-prob margin (SimPO's paper uses 2.0–10 with its averaged log-probs)."""
    simpo_gamma: float = 0.5
    """γ [``simpo_gamma``]: SimPO's target reward margin (ignored by "sigmoid")."""
    cpo_alpha: float = 1.0
    """α [``cpo_alpha``]: weight of the NLL term on the chosen completions; 0 for the paper's SimPO."""
    label_smoothing: float = 0.0
    """ε [``label_smoothing``]: conservative smoothing of the preference term (TRL's addition; 0: the papers)."""

    def __post_init__(self):
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {list(CPO_LOSS_TYPES)}")
        if self.beta <= 0 or self.cpo_alpha < 0:
            raise ValueError(f"beta={self.beta} must be positive and cpo_alpha={self.cpo_alpha} non-negative")


@dataclass(frozen=True)
class ORPOSettings:
    """ORPO's one option; TRL calls λ ``beta`` (``ORPOConfig.beta``, default 0.1)."""

    lambda_: float = 0.1
    """λ: weight of the odds-ratio term against the NLL term (the paper's λ, TRL's ``beta``)."""

    def __post_init__(self):
        if self.lambda_ <= 0:
            raise ValueError(f"lambda_={self.lambda_} must be positive (0 is plain SFT: use rlcourse.methods.sft)")


# ── data ─────────────────────────────────────────────────────────────────────────────────────────────────────


def tokenize_pair(tokenizer, prompt, chosen, rejected) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` as CPOTrainer / ORPOTrainer build them: DPO's, plus EOS
    appended to a completion that does not already end with it (see the module docstring)."""
    tokens = dpo.tokenize_pair(tokenizer, prompt, chosen, rejected)
    eos = tokenizer.eos_token_id
    for side in ("chosen_ids", "rejected_ids"):
        if not tokens[side] or tokens[side][-1] != eos:
            tokens[side] = tokens[side] + [eos]
    return tokens


def tokenize_dataset(dataset, tokenizer, max_length: int | None = None) -> list[dict]:
    """Each preference row tokenised by ``tokenize_pair``, in order: DPO's row checks and truncation rule
    (``rlcourse.methods.dpo.tokenize_dataset``) with this module's tokeniser."""
    return dpo.tokenize_dataset(dataset, tokenizer, max_length, tokenize=tokenize_pair)


batch_fn = dpo.batch_fn
"""step -> the (2B, T) batch of that step, pairs in order: DPO's batching, unchanged."""


# ── one step ─────────────────────────────────────────────────────────────────────────────────────────────────


def _forward(model, batch: dict) -> dict[str, torch.Tensor]:
    """Per-token log-probs (2B, T-1), completion mask, real-token mask and the logits of a (2B, T) batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    return {"logps": token_logprobs(logits, batch["input_ids"]),  # (2B, T-1)
            "mask": shift_mask(batch["completion_mask"], batch["attention_mask"]),  # (2B, T-1) completion tokens
            "real": batch["attention_mask"][:, 1:].to(logits.dtype),  # (2B, T-1) prompt + completion tokens
            "logits": logits}


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, scale: float, out: dict) -> dict:
    """TRL's ``rewards/*`` (scale × log-prob, summed or averaged as the loss uses them) and ``logps/*``."""
    r_chosen, r_rejected = scale * chosen.detach(), scale * rejected.detach()  # (B,)
    mask = out["mask"]
    return {
        "rewards/chosen": r_chosen.mean(),
        "rewards/rejected": r_rejected.mean(),
        "rewards/margins": (r_chosen - r_rejected).mean(),
        "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
        "entropy": (token_entropy(out["logits"].detach()) * mask).sum() / mask.sum().clamp(min=1),
    }


def cpo_step(model, batch: dict, settings: CPOSettings = CPOSettings()) -> tuple[torch.Tensor, dict]:
    """One CPO or SimPO step: the loss and the metrics CPOTrainer logs (``rewards/*``, ``logps/*``, ``nll_loss``).

    batch: (2B, T) tensors from ``batch_fn``, chosen rows first. No reference model: one forward of the policy.
    """
    batch = to_model_device(model, batch)
    out = _forward(model, batch)
    mask = out["mask"]
    summed = masked_sum(out["logps"], mask)  # (2B,) log π_θ(y|x)
    chosen, rejected = summed.chunk(2)  # (B,), (B,)
    chosen_mask = mask.chunk(2)[0]  # (B, T-1)
    # TRL computes (and logs) the NLL only when α > 0
    nll = sft_loss(out["logps"].chunk(2)[0], chosen_mask) if settings.cpo_alpha else torch.zeros((), device=mask.device)
    if settings.loss_type == "sigmoid":
        loss = cpo_loss(chosen, rejected, nll, settings.beta, settings.cpo_alpha, settings.label_smoothing)
        logged_w, logged_l = chosen, rejected  # TRL logs what the loss compares: summed log-probs
    else:
        lengths = mask.sum(-1)  # (2B,)
        len_w, len_l = lengths.chunk(2)
        loss = simpo_loss(chosen, rejected, len_w, len_l, settings.beta, settings.simpo_gamma,
                          settings.label_smoothing) + settings.cpo_alpha * nll
        logged_w, logged_l = chosen / len_w, rejected / len_l  # per-token averages
    metrics = _pair_metrics(logged_w, logged_l, settings.beta, out)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def orpo_step(model, batch: dict, settings: ORPOSettings = ORPOSettings()) -> tuple[torch.Tensor, dict]:
    """One ORPO step: L = NLL + λ·L_OR, and the metrics ORPOTrainer logs.

    ``log_odds_ratio`` is TRL's name for mean log σ(log odds_w − log odds_l) (= −L_OR, a log-*sigmoid*, not the
    log odds ratio); ``log_odds_chosen`` is the mean log odds ratio itself. ``or_loss`` is L_OR (ours, added).
    """
    batch = to_model_device(model, batch)
    out = _forward(model, batch)
    averaged = masked_mean(out["logps"], out["mask"])  # (2B,) per-token average log π_θ(y|x)
    chosen, rejected = averaged.chunk(2)
    nll = sft_loss(out["logps"].chunk(2)[0], out["real"].chunk(2)[0])  # prompt + completion tokens, as TRL
    loss = orpo_loss(chosen, rejected, nll, settings.lambda_)
    with torch.no_grad():
        or_loss = odds_ratio_loss(chosen, rejected)  # (B,)
        metrics = _pair_metrics(chosen, rejected, settings.lambda_, out)
        metrics |= {"nll_loss": nll.detach(), "or_loss": or_loss.mean(), "log_odds_ratio": -or_loss.mean(),
                    "log_odds_chosen": (log_odds(chosen.float()) - log_odds(rejected.float())).mean()}
    return loss, metrics


def cpo_step_fn(settings: CPOSettings = CPOSettings()):
    """``cpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(cpo_step, settings=settings)


def orpo_step_fn(settings: ORPOSettings = ORPOSettings()):
    """``orpo_step`` with its settings bound, for ``rlcourse.train.train``."""
    return partial(orpo_step, settings=settings)


def trl_cpo_kwargs(settings: CPOSettings, max_length: int | None) -> dict:
    """The ``CPOConfig`` options that make TRL's run match ours (for ``rlcourse.trl_runs.trl_config``).

    Set explicitly: the loss, β, γ, α, ε; AlphaPO's reward shaping off (``alpha=0``); the same ``max_length``;
    dropout off. ``max_prompt_length`` is not applied by TRL 1.16's CPO tokenisation, so it is left alone.
    """
    return dict(loss_type=settings.loss_type, beta=settings.beta, simpo_gamma=settings.simpo_gamma,
                cpo_alpha=settings.cpo_alpha, label_smoothing=settings.label_smoothing, alpha=0.0,
                max_length=max_length, disable_dropout=True)


def trl_orpo_kwargs(settings: ORPOSettings, max_length: int | None) -> dict:
    """The ``ORPOConfig`` options that make TRL's run match ours: λ (TRL's ``beta``), ``max_length``, no dropout."""
    return dict(beta=settings.lambda_, max_length=max_length, disable_dropout=True)
