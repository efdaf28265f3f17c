"""Our CPO, SimPO, ORPO, KTO and BCO (bco_pair) losses equal TRL 1.16's on the same tensors and on the same batch.

Two levels, each with a stated tolerance:

1. Same tensors: where TRL exposes the loss as a method that takes log-probs (``CPOTrainer.cpo_loss``,
   ``ORPOTrainer.odds_ratio_loss``), we call it and ours on the same random log-probs. Same fp32 operations up to
   their order, so the tolerance is float rounding (``TENSOR_RTOL``).
2. Same batch: where TRL's loss is buried in a bigger method (its NLL term, KTO's KL pass, DPO's ``bco_pair``), we
   take the batch from TRL's own dataloader, compute TRL's loss with its trainer, and ours from the tiny model's
   logits with ``rlcourse.logprobs`` and our loss functions. This checks the conventions the functions' docstrings
   state: summed vs averaged log-probs, which tokens the NLL covers, how z₀ is estimated. TRL computes log-probs
   through its own code path (a fused LM head for KTO and DPO, one concatenated chosen+rejected forward for CPO and
   ORPO); ``BATCH_RTOL`` covers that difference in summation order.

The tiny random 2-layer model with LoRA, fp32 (``bf16=False``). LoRA B matrices are randomised *after* the trainer is
built, so the policy differs from the reference (TRL's "ref" adapter keeps the fresh copy: π_ref = the base model,
the same reference as ours, adapters disabled).
"""

import pytest
import torch

from rlcourse.batches import Sequences, mismatched_completions
from rlcourse.data import flip_pairs, unpair, unpaired_rows
from rlcourse.logprobs import masked_mean, masked_sum, sequence_logps, token_logprobs
from rlcourse.losses.bco import bco_pair_loss
from rlcourse.losses.cpo import cpo_loss, simpo_loss
from rlcourse.losses.kto import kto_loss, kto_reference_point
from rlcourse.losses.orpo import log_odds, odds_ratio_loss, orpo_loss
from rlcourse.losses.sft import sft_loss
from rlcourse.methods import cpo, dpo, kto, orpo, simpo
from rlcourse.models import reference_policy

from fixtures import MAX_LENGTH, PREFERENCE_ROWS as ROWS

TENSOR_RTOL = 1e-6
"""Same tensors, same fp32 operations (up to their order), absolute floor TENSOR_RTOL·1e-3. Seen: CPO and SimPO
bit-identical; ORPO's odds-ratio term 1.5e-8 absolute (we form log odds(y_w) − log odds(y_l), TRL
(log P_w − log P_l) − (log(1−P_w) − log(1−P_l)): the same sum, associated differently)."""
BATCH_RTOL = 1e-5
"""Same batch, log-probs through TRL's forward vs ours. Largest relative difference seen: 1.1e-7 (CPO with
cpo_alpha=0; KTO 1.05e-7); SimPO, ORPO and bco_pair came out bit-identical."""
Z0_RTOL = 1e-6
"""z₀ (TRL's logged ``kl``) is a difference of two sums of log-probs (mean magnitude ~85 on the tiny model) that nearly
cancel (z₀ ≈ 0.1): its rounding error follows the sums, not z₀, so the tolerance is relative to the mean |log-prob
sum| subtracted. Summation order differs between CPUs: on batch 1, bit-identical with AVX-512 kernels, 6.7e-6 apart
with AVX2 ones (7.5e-8 of the sums, 6e-5 of z₀ itself, which failed the old 1e-5-of-z₀ check). fp32's unit roundoff
is 6e-8; 1e-6 of the sums leaves a margin of 13 over the AVX2 case."""
GRAD_RTOL = 1e-4
"""LoRA gradients (KTO), ‖ours − TRL's‖ / ‖TRL's‖ per parameter: the backward's summation order differs too. Seen: 8.2e-7
(with z₀ not detached it would be 1.0)."""


def _random_pair_logps(B=8, seed=0, scale=40.0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(B, generator=g) * scale, -torch.rand(B, generator=g) * scale


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=rtol * 1e-3)


def _pair_side(model, batch, side: str) -> dict:
    """Per-token log-probs and the completion mask of TRL's CPO/ORPO batch, one side: (B, T-1) each."""
    logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
    return {"logps": token_logprobs(logits, batch[f"{side}_input_ids"]),  # (B, T-1)
            "mask": (batch[f"{side}_labels"][:, 1:] != -100).float(),  # (B, T-1): completion tokens
            "attention": batch[f"{side}_attention_mask"][:, 1:].float()}  # (B, T-1): prompt + completion


def _sums(model, batch: dict, prefix: str = "") -> torch.Tensor:
    """log π(y|x) of each sequence of TRL's batch, (B,): its own sequences, or KTO's mismatched ones (prefix "KL_")."""
    seqs = Sequences.from_dict({k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)})
    return sequence_logps(model, seqs)[0]


# ---------------------------------------------------------------- CPO and SimPO

@pytest.fixture(scope="module")
def cpo_trainer(make_trainer):
    return make_trainer(cpo, cpo.Settings())


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_cpo_sigmoid_term_matches_trl_on_the_same_tensors(cpo_trainer, beta, label_smoothing):
    chosen, rejected = _random_pair_logps()
    cpo_trainer.loss_type, cpo_trainer.beta, cpo_trainer.label_smoothing = "sigmoid", beta, label_smoothing
    theirs, chosen_rewards, _ = cpo_trainer.cpo_loss(chosen, rejected)
    ours = cpo_loss(chosen, rejected, beta=beta, cpo_alpha=0, label_smoothing=label_smoothing)
    _close(ours, theirs.mean(), TENSOR_RTOL)
    _close(beta * chosen, chosen_rewards, TENSOR_RTOL)  # TRL's rewards/chosen: β log π_θ(y_w|x), summed log-probs


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (10.0, 1.6)])
def test_simpo_matches_trl_on_the_same_tensors(cpo_trainer, beta, gamma):
    chosen, rejected = _random_pair_logps()
    g = torch.Generator().manual_seed(1)
    lw, ll = torch.randint(1, 40, (8,), generator=g).float(), torch.randint(1, 40, (8,), generator=g).float()
    cpo_trainer.loss_type, cpo_trainer.beta, cpo_trainer.simpo_gamma, cpo_trainer.label_smoothing = \
        "simpo", beta, gamma, 0.0
    theirs, _, _ = cpo_trainer.cpo_loss(chosen / lw, rejected / ll)  # TRL feeds SimPO average log-probs
    _close(simpo_loss(chosen, rejected, lw, ll, beta=beta, gamma=gamma), theirs.mean(), TENSOR_RTOL)


@pytest.mark.parametrize("loss_type,cpo_alpha", [("sigmoid", 1.0), ("sigmoid", 0.0), ("simpo", 0.0), ("simpo", 0.5)])
def test_cpo_and_simpo_match_trl_on_the_same_batch(cpo_trainer, loss_type, cpo_alpha):
    tr = cpo_trainer
    tr.loss_type, tr.cpo_alpha, tr.beta, tr.label_smoothing, tr.simpo_gamma = loss_type, cpo_alpha, 0.2, 0.0, 0.5
    batch = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        theirs, metrics = tr.get_batch_loss_metrics(tr.model, batch)
        w, l = _pair_side(tr.model, batch, "chosen"), _pair_side(tr.model, batch, "rejected")
        nll = sft_loss(w["logps"], w["mask"])  # token mean over the chosen completions
        if loss_type == "sigmoid":
            ours = cpo_loss(masked_sum(w["logps"], w["mask"]), masked_sum(l["logps"], l["mask"]), nll,
                            beta=0.2, cpo_alpha=cpo_alpha)
        else:
            ours = simpo_loss(masked_sum(w["logps"], w["mask"]), masked_sum(l["logps"], l["mask"]),
                              w["mask"].sum(-1), l["mask"].sum(-1), beta=0.2, gamma=0.5) + cpo_alpha * nll
    _close(ours, theirs, BATCH_RTOL)
    if cpo_alpha:
        assert nll.item() == pytest.approx(metrics["nll_loss"], rel=BATCH_RTOL)
    else:
        assert metrics["nll_loss"] == 0.0  # TRL skips the NLL (logs 0) when cpo_alpha == 0


def _our_pair_batch(tokenizer):
    """Our tokenisation and batch of ROWS (CPOTrainer's and ORPOTrainer's are the same code, and so are ours)."""
    batches = cpo.batches(ROWS, tokenizer, len(ROWS), MAX_LENGTH)
    return batches.tokenized, batches(0)


@pytest.mark.parametrize("trainer_name", ["cpo_trainer", "orpo_trainer"])
def test_our_pair_tokenisation_is_trls_with_its_extra_eos(trainer_name, tokenizer, request):
    data = request.getfixturevalue(trainer_name).train_dataset
    tokenized, _ = _our_pair_batch(tokenizer)
    for i, ours in enumerate(tokenized):
        for side in ("chosen", "rejected"):
            assert ours["prompt_ids"] + ours[f"{side}_ids"] == data[i][f"{side}_input_ids"]
            n_prompt = sum(1 for label in data[i][f"{side}_labels"] if label == -100)
            assert n_prompt == len(ours["prompt_ids"])
            assert tokenizer.decode(ours[f"{side}_ids"][-3:]).endswith("<|im_end|>\n<|im_end|>")  # TRL's extra EOS


@pytest.mark.parametrize("loss_type,cpo_alpha", [("sigmoid", 1.0), ("simpo", 0.0)])
def test_cpo_step_matches_trl_batch_loss_and_metrics(cpo_trainer, tokenizer, loss_type, cpo_alpha):
    tr = cpo_trainer
    tr.loss_type, tr.cpo_alpha, tr.beta, tr.label_smoothing, tr.simpo_gamma = loss_type, cpo_alpha, 0.2, 0.0, 0.5
    method, settings = ((cpo, cpo.Settings(beta=0.2, cpo_alpha=cpo_alpha)) if loss_type == "sigmoid" else
                        (simpo, simpo.Settings(beta=0.2, gamma=0.5, cpo_alpha=cpo_alpha)))
    assert method.trl_kwargs(settings, MAX_LENGTH)["loss_type"] == loss_type
    _, batch = _our_pair_batch(tokenizer)
    with torch.no_grad():
        theirs, their_metrics = tr.get_batch_loss_metrics(tr.model, next(iter(tr.get_train_dataloader())))
        ours, our_metrics = method.step_fn(settings)(tr.model, batch)
    _close(ours, theirs, BATCH_RTOL)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"):
        assert our_metrics[name].item() == pytest.approx(their_metrics[name], rel=BATCH_RTOL, abs=1e-6), name


# ---------------------------------------------------------------- ORPO

@pytest.fixture(scope="module")
def orpo_trainer(make_trainer):
    return make_trainer(orpo, orpo.Settings())


def test_odds_ratio_term_matches_trl_on_the_same_tensors(orpo_trainer):
    g = torch.Generator().manual_seed(2)
    chosen = -torch.rand(8, generator=g) * 6
    rejected = -torch.rand(8, generator=g) * 6
    chosen[0], rejected[1] = -1e-4, -70.0  # both branches of log1mexp
    orpo_trainer.beta = 0.25
    theirs, _, _, mean_logsigmoid, mean_log_odds = orpo_trainer.odds_ratio_loss(chosen, rejected)
    _close(-0.25 * odds_ratio_loss(chosen, rejected), theirs, TENSOR_RTOL)  # TRL returns +λ log σ, subtracted later
    _close((log_odds(chosen) - log_odds(rejected)).mean(), mean_log_odds, TENSOR_RTOL)  # logged "log_odds_chosen"
    _close(-odds_ratio_loss(chosen, rejected).mean(), mean_logsigmoid, TENSOR_RTOL)  # logged "log_odds_ratio"


def test_orpo_matches_trl_on_the_same_batch_with_its_nll_over_prompt_and_completion(orpo_trainer):
    tr = orpo_trainer
    tr.beta = 0.1
    batch = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        theirs, metrics = tr.get_batch_loss_metrics(tr.model, batch)
        w, l = _pair_side(tr.model, batch, "chosen"), _pair_side(tr.model, batch, "rejected")
        nll_trl = sft_loss(w["logps"], w["attention"])  # every real token of the chosen sequence
        nll_paper = sft_loss(w["logps"], w["mask"])  # completion tokens only
        ours = orpo_loss(masked_mean(w["logps"], w["mask"]), masked_mean(l["logps"], l["mask"]), nll_trl, lambda_=0.1)
    _close(ours, theirs, BATCH_RTOL)
    assert nll_trl.item() == pytest.approx(metrics["nll_loss"], rel=BATCH_RTOL)
    assert abs(nll_paper.item() - metrics["nll_loss"]) > 1e-3  # the departure is real on this batch


def test_orpo_step_matches_trl_batch_loss_and_metrics(orpo_trainer, tokenizer):
    tr = orpo_trainer
    tr.beta = 0.1
    _, batch = _our_pair_batch(tokenizer)
    with torch.no_grad():
        theirs, their_metrics = tr.get_batch_loss_metrics(tr.model, next(iter(tr.get_train_dataloader())))
        ours, our_metrics = orpo.orpo_step(tr.model, batch, orpo.Settings(lambda_=0.1))
    _close(ours, theirs, BATCH_RTOL)
    for name in ("rewards/chosen", "rewards/margins", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert our_metrics[name].item() == pytest.approx(their_metrics[name], rel=BATCH_RTOL, abs=1e-6), name


# ---------------------------------------------------------------- KTO

KTO = kto.Settings(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
WEIGHTS = dict(beta=KTO.beta, desirable_weight=KTO.desirable_weight, undesirable_weight=KTO.undesirable_weight)


def _unpaired_rows():
    """The preference rows unpaired (rlcourse.data.unpair), reordered so the first batch of 4 mixes labels
    unevenly (3 desirable, 1 undesirable) and the second the other way round."""
    rows = unpair(ROWS)  # 4 chosen (True), then 4 rejected (False)
    return [rows[i] for i in (0, 5, 2, 3, 4, 1, 6, 7)]


@pytest.fixture(scope="module")
def kto_trainer(make_trainer):
    return make_trainer(kto, KTO, _unpaired_rows())


def test_trl_builds_kl_pairs_by_rotating_completions_within_each_batch(kto_trainer):
    data = kto_trainer.train_dataset
    for start in (0, 4):
        completions = data["completion_ids"][start:start + 4]
        assert data["KL_completion_ids"][start:start + 4] == mismatched_completions(completions)


@pytest.mark.parametrize("batch_index", [0, 1])
def test_kto_matches_trl_on_the_same_batch(kto_trainer, batch_index):
    tr = kto_trainer
    batch = list(tr.get_train_dataloader())[batch_index]  # with its (x_i, y_{i-1}) sequences under "KL_"
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, dict(batch))
        policy, policy_kl = _sums(tr.model, batch), _sums(tr.model, batch, "KL_")
        with reference_policy(tr.model):
            ref, ref_kl = _sums(tr.model, batch), _sums(tr.model, batch, "KL_")
        kl_logratios = policy_kl - ref_kl
        z0 = kto_reference_point(policy_kl, ref_kl)
        ours = kto_loss(policy, ref, batch["label"].bool(), z0, **WEIGHTS)
        unclamped = kto_loss(policy, ref, batch["label"].bool(), kl_logratios.mean(), **WEIGHTS)
    _close(ours, theirs, BATCH_RTOL)
    if batch_index == 0:  # this batch's KL estimate is negative: the clamp at 0 is what makes us match
        assert z0.item() == 0.0 and abs(unclamped.item() - theirs.item()) > 1e-3
    else:  # this one's is positive: z₀ is the mean mismatched log-ratio itself
        assert z0.item() > 0.05 and z0.item() == pytest.approx(kl_logratios.mean().item())
    mode = "train" if tr.model.training else "eval"
    assert z0.item() == pytest.approx(tr._metrics[mode]["kl"][-1], rel=0, abs=_z0_atol(policy_kl, ref_kl))
    assert batch["label"].sum().item() == (3 if batch_index == 0 else 1)  # the uneven mixes meant above


def _z0_atol(policy_kl_sums: torch.Tensor, ref_kl_sums: torch.Tensor) -> float:
    """Z0_RTOL of the mean |log-prob sum| that z₀ is the difference of (its rounding error is relative to them)."""
    return Z0_RTOL * (policy_kl_sums.abs() + ref_kl_sums.abs()).mean().item() / 2


def _lora_grads(model) -> dict:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_kto_gradient_matches_trl_so_z0_carries_no_gradient(kto_trainer):
    # Batch 1 has z₀ > 0. Were our z₀ not detached, the loss would match but the gradient would not: TRL runs its KL
    # forward under no_grad.
    tr = kto_trainer
    batch = list(tr.get_train_dataloader())[1]
    tr.model.zero_grad(set_to_none=True)
    tr.compute_loss(tr.model, dict(batch)).backward()
    theirs = _lora_grads(tr.model)
    policy, policy_kl = _sums(tr.model, batch), _sums(tr.model, batch, "KL_")
    with torch.no_grad(), reference_policy(tr.model):
        ref, ref_kl = _sums(tr.model, batch), _sums(tr.model, batch, "KL_")
    kto_loss(policy, ref, batch["label"].bool(), kto_reference_point(policy_kl, ref_kl), **WEIGHTS).backward()
    ours = _lora_grads(tr.model)
    assert theirs.keys() == ours.keys() and len(ours) > 0
    assert all(".default." in n for n in ours)  # only the trained adapter, never TRL's "ref" copy
    for name in ours:  # relative to the size of the whole gradient: single entries can be ~0
        assert (ours[name] - theirs[name]).norm() <= GRAD_RTOL * theirs[name].norm(), name


def test_kto_with_a_zero_reference_point_is_trl_apo_zero_unpaired(kto_trainer):
    tr = kto_trainer
    batch = list(tr.get_train_dataloader())[1]
    tr.loss_type, tr.calculate_KL = "apo_zero_unpaired", False  # what KTOTrainer sets for this loss_type
    try:
        with torch.no_grad():
            theirs = tr.compute_loss(tr.model, dict(batch))
            policy = _sums(tr.model, batch)
            with reference_policy(tr.model):
                ref = _sums(tr.model, batch)
    finally:
        tr.loss_type, tr.calculate_KL = "kto", True
    _close(kto_loss(policy, ref, batch["label"].bool(), 0.0, **WEIGHTS), theirs, BATCH_RTOL)


# ---------------------------------------------------------------- BCO (DPO's bco_pair)

@pytest.fixture(scope="module")
def bco_trainer(make_trainer):
    return make_trainer(dpo, dpo.Settings(beta=0.3), loss_type=["bco_pair"])  # a DPOConfig loss our DPO lacks


def test_bco_pair_matches_trl_dpo_on_the_same_batch_with_no_reward_shift(bco_trainer):
    tr = bco_trainer
    batch = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, dict(batch))
        policy_w, policy_l = _sums(tr.model, batch).chunk(2)  # (B,) each: chosen rows first, then rejected
        with reference_policy(tr.model):
            ref_w, ref_l = _sums(tr.model, batch).chunk(2)
        ours = bco_pair_loss(policy_w, policy_l, ref_w, ref_l, beta=0.3, delta=0.0)
        shifted = bco_pair_loss(policy_w, policy_l, ref_w, ref_l, beta=0.3, delta=0.5)
    _close(ours, theirs, BATCH_RTOL)
    assert abs(shifted.item() - theirs.item()) > 1e-3  # TRL 1.16's bco_pair has no reward shift: δ = 0


# ---------------------------------------------------------------- our KTO step and data (rlcourse.methods.kto)

def test_our_unpaired_tokenisation_and_kl_pairs_are_trls(kto_trainer, tokenizer):
    data = kto_trainer.train_dataset
    batches = kto.batches(_unpaired_rows(), tokenizer, 4, MAX_LENGTH)
    for step, trl_batch in zip((0, 1), kto_trainer.get_train_dataloader()):
        ours = batches(step)
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(getattr(ours.sequences, key), trl_batch[key]), key
            assert torch.equal(getattr(ours.mismatched, key), trl_batch[f"KL_{key}"]), f"KL_{key}"
        assert torch.equal(ours.label, trl_batch["label"].bool())
    assert [t["completion_ids"] for t in batches.tokenized] == data["completion_ids"]


@pytest.mark.parametrize("batch_index", [0, 1])
def test_kto_step_matches_trl_loss_and_reference_point(kto_trainer, tokenizer, batch_index):
    tr = kto_trainer
    trl_batch = list(tr.get_train_dataloader())[batch_index]
    ours_batch = kto.batches(_unpaired_rows(), tokenizer, 4, MAX_LENGTH)(batch_index)
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, dict(trl_batch))
        ours, metrics = kto.kto_step(tr.model, ours_batch, KTO)
    _close(ours, theirs, BATCH_RTOL)
    mode = "train" if tr.model.training else "eval"
    with torch.no_grad():
        policy_kl = _sums(tr.model, trl_batch, "KL_")
        with reference_policy(tr.model):
            ref_kl = _sums(tr.model, trl_batch, "KL_")
    assert metrics["z0"].item() == pytest.approx(tr._metrics[mode]["kl"][-1], rel=0, abs=_z0_atol(policy_kl, ref_kl))


def test_flipped_pairs_flip_both_unpaired_labels_and_keep_the_scores_with_their_completions():
    pairs = [{**r, "score_chosen": 1.0, "score_rejected": 0.0} for r in ROWS]
    flipped = flip_pairs(pairs, 0.5, seed=0)
    assert sum(r["flipped"] for r in flipped) == 2
    for before, after in zip(pairs, flipped):
        if after["flipped"]:
            assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
            assert (after["score_chosen"], after["score_rejected"]) == (0.0, 1.0)
    rows = unpaired_rows(flipped, seed=0)
    assert len(rows) == 8 and all((r["score"] == 1.0) != r["flipped"] for r in rows if r["label"])
