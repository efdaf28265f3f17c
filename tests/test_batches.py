"""rlcourse.batches: typed batches move whole to a device, collation pads and cuts, walkers go in order and wrap.

Token-for-token agreement of the batches with TRL's collators is checked by the parity tests.
"""

import pytest
import torch

from rlcourse.batches import (PairBatch, PairBatches, RolloutBatch, Sequences, UnpairedBatch, UnpairedBatches,
                              batch_indices, collate, collate_pairs, mismatched_completions)
from rlcourse.data import unpair
from rlcourse.tokenization import tokenize_pairs, tokenize_unpaired

from fixtures import PREFERENCE_ROWS


def _ids(*shape):
    return torch.arange(torch.Size(shape).numel()).view(*shape)


def test_to_moves_every_tensor_and_keeps_the_type_and_the_rest():
    # The meta device stands in for a GPU.
    seqs = Sequences(_ids(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    rollout = RolloutBatch(prompt_ids=_ids(2, 2), prompt_mask=torch.ones(2, 2), completion_ids=_ids(2, 3),
                           completion_mask=torch.ones(2, 3), rewards=torch.tensor([1.0, 0.0]), completions=["a", "b"])
    moved = rollout.to("meta")
    assert type(moved) is RolloutBatch and moved.completions == ["a", "b"]
    assert all(getattr(moved, f).device.type == "meta" for f in ("prompt_ids", "completion_mask", "rewards"))
    assert rollout.prompt_ids.device.type == "cpu"  # a new batch: the caller's stays where it was

    pair = PairBatch(seqs, step=7).to("meta")
    assert type(pair) is PairBatch and type(pair.sequences) is Sequences  # nested batches move whole
    assert pair.step == 7 and pair.sequences.input_ids.device.type == "meta"

    unpaired = UnpairedBatch(seqs, seqs, label=torch.tensor([True, False]), prompt_index=torch.tensor([0, 1]))
    moved = unpaired.to("meta")
    assert moved.score is None and moved.label.dtype == torch.bool and moved.mismatched.input_ids.is_meta
    assert unpaired.to("cpu").sequences.input_ids is seqs.input_ids  # no copy where the data already is


def test_collate_truncates_keeping_the_start(tokenizer):
    row = {"input_ids": list(range(10)), "completion_mask": [0] * 4 + [1] * 6}
    batch = collate([row], tokenizer.pad_token_id, max_length=6)
    assert isinstance(batch, Sequences)
    assert batch.input_ids.tolist() == [list(range(6))]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 0, 1, 1]]


def test_collate_pairs_puts_the_chosen_sequences_first_right_padded():
    pairs = [{"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4]},
             {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]}]
    seqs = collate_pairs(pairs, pad_token_id=0)
    assert seqs.input_ids.tolist() == [[1, 2, 3, 0, 0], [5, 6, 7, 0, 0], [1, 4, 0, 0, 0], [5, 6, 8, 9, 10]]
    assert seqs.completion_mask.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert seqs.attention_mask.sum(-1).tolist() == [3, 3, 2, 5]


def test_batch_indices_walk_in_order_and_wrap():
    assert batch_indices(0, 3, 7) == [0, 1, 2] and batch_indices(2, 3, 7) == [6, 0, 1]


def test_pair_batches_walk_the_pairs_in_order_and_wrap(tokenizer):
    tokenized = tokenize_pairs(PREFERENCE_ROWS, tokenizer)
    batches = PairBatches(tokenized, 3, tokenizer.pad_token_id, 64)
    for step, rows in [(0, [0, 1, 2]), (1, [3, 0, 1]), (4, [0, 1, 2])]:
        batch = batches(step)
        expected = collate_pairs([tokenized[i] for i in rows], tokenizer.pad_token_id, 64)
        assert batch.step == step and torch.equal(batch.sequences.input_ids, expected.input_ids), step
        assert torch.equal(batch.sequences.completion_mask, expected.completion_mask), step


def test_unpaired_batches_walk_in_order_wrap_and_mismatch_within_the_batch(tokenizer):
    rows = [{**r, "score": float(i)} for i, r in enumerate(unpair(PREFERENCE_ROWS))]  # 4 chosen, then 4 rejected
    batches = UnpairedBatches(tokenize_unpaired(rows, tokenizer), 4, tokenizer.pad_token_id, 64)
    assert batches.n_prompts == 4  # each prompt twice: once chosen, once rejected
    first, second, wrapped = batches(0), batches(1), batches(2)
    assert first.label.tolist() == [True] * 4 and second.label.tolist() == [False] * 4
    assert second.score.tolist() == [4.0, 5.0, 6.0, 7.0] and second.prompt_index.tolist() == [0, 1, 2, 3]
    assert torch.equal(wrapped.sequences.input_ids, first.sequences.input_ids)
    tokens = batches.tokenized[:4]
    expected = [t["prompt_ids"] + c for t, c in zip(tokens, mismatched_completions([t["completion_ids"]
                                                                                     for t in tokens]))]
    mismatched = first.mismatched
    assert [ids[m.bool()].tolist() for ids, m in zip(mismatched.input_ids, mismatched.attention_mask)] == expected
    no_scores = UnpairedBatches(tokenize_unpaired(unpair(PREFERENCE_ROWS), tokenizer), 4, tokenizer.pad_token_id)
    assert no_scores(0).score is None


def test_unpaired_batches_refuse_rows_that_do_not_fill_whole_batches(tokenizer):
    tokenized = tokenize_unpaired(unpair(PREFERENCE_ROWS), tokenizer)[:7]
    with pytest.raises(ValueError, match="7 rows in batches of 4: .*divisible by it. Fix: keep the first 4 rows"):
        UnpairedBatches(tokenized, 4, tokenizer.pad_token_id)


@pytest.mark.parametrize("n,batch_size,fix", [(8, 1, "use batch_size ≥ 2"), (3, 4, "use batch_size ≤ 3")])
def test_unpaired_batches_name_a_fix_that_works_for_too_small_batches_or_too_few_rows(tokenizer, n, batch_size, fix):
    tokenized = tokenize_unpaired(unpair(PREFERENCE_ROWS), tokenizer)[:n]
    with pytest.raises(ValueError, match=f"{n} rows in batches of {batch_size}: .*Fix: {fix}"):
        UnpairedBatches(tokenized, batch_size, tokenizer.pad_token_id)


def test_pair_prompt_layout_holds_each_prompt_once_and_rebuilds_every_sequence(tokenizer):
    from rlcourse.batches import pair_prompt_layout
    from rlcourse.methods import cpo

    seqs = cpo.batches(PREFERENCE_ROWS, tokenizer, 4, None)(0).sequences  # (8, T), chosen rows first
    prompt_ids, prompt_mask, completion_ids, completion_mask = pair_prompt_layout(seqs)
    assert prompt_ids.shape[0] == 4 and completion_ids.shape[0] == 8
    assert (prompt_mask[:, -1] == 1).all() and (completion_mask[:, 0] == 1).all()  # left- and right-padded
    for row in range(8):
        pair, side = row % 4, row // 4  # row of the sequences -> its pair and side (0 chosen, 1 rejected)
        rebuilt = torch.cat([prompt_ids[pair][prompt_mask[pair].bool()],
                             completion_ids[2 * pair + side][completion_mask[2 * pair + side].bool()]])
        assert torch.equal(rebuilt, seqs.input_ids[row][seqs.attention_mask[row].bool()])
    other = seqs.input_ids.clone()
    other[4, 0] += 1  # pair 0's rejected row no longer has its chosen row's prompt
    assert pair_prompt_layout(Sequences(other, seqs.attention_mask, seqs.completion_mask)) is None
