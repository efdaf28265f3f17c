"""rlcourse.tokenization: where a completion starts, TRL's extra EOS, the row checks and TRL's drop rule.

Token-for-token agreement with TRL's own trainers is checked by the parity tests; these pin the helpers' contracts.
"""

import pytest

from rlcourse.data import unpair
from rlcourse.tokenization import (chat_ids, common_prefix, split_prompt_completion, tokenize_pair,
                                   tokenize_pairs, tokenize_prompt_completion, tokenize_unpaired, with_eos)

from fixtures import PREFERENCE_ROWS

PROMPT_LENGTHS = (36, 35, 34, 33)
"""Tokens of each PREFERENCE_ROWS prompt with SmolLM2's chat template and its generation prompt."""


def test_completion_mask_covers_exactly_the_completion(tokenizer):
    prompt = [{"role": "user", "content": "Name a colour."}]
    completion = [{"role": "assistant", "content": "Blue."}]
    ex = tokenize_prompt_completion(tokenizer, prompt, completion)
    n_prompt = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    assert ex["completion_mask"] == [0] * n_prompt + [1] * (len(ex["input_ids"]) - n_prompt)
    completion_text = tokenizer.decode([i for i, m in zip(ex["input_ids"], ex["completion_mask"]) if m])
    assert completion_text.startswith("Blue.") and tokenizer.eos_token in completion_text


def test_common_prefix_counts_the_shared_leading_tokens():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([1], [1]) == 1 and common_prefix([], [1]) == 0


def test_standard_rows_are_concatenated_without_special_tokens(tokenizer):
    prompt_ids, completion_ids = split_prompt_completion(tokenizer, "The sky is", " blue.")
    assert tokenizer.decode(prompt_ids + completion_ids) == "The sky is blue."
    assert tokenizer.decode(completion_ids) == " blue." and tokenizer.eos_token_id not in completion_ids


def test_both_completions_of_a_pair_start_at_the_same_token(tokenizer):
    row = PREFERENCE_ROWS[0]
    pair = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
    assert len(pair["prompt_ids"]) == PROMPT_LENGTHS[0]
    for side in ("chosen", "rejected"):
        assert pair["prompt_ids"] + pair[f"{side}_ids"] == chat_ids(tokenizer, row["prompt"] + row[side])
    assert tokenizer.decode(pair["chosen_ids"]).startswith("Air scatters blue light.")


def test_with_eos_appends_one_eos_where_missing(tokenizer):
    eos = tokenizer.eos_token_id
    out = with_eos({"prompt_ids": [1], "chosen_ids": [5, 6], "rejected_ids": [7, eos]}, eos)
    assert out["chosen_ids"] == [5, 6, eos] and out["rejected_ids"] == [7, eos] and out["prompt_ids"] == [1]
    appended = tokenize_pairs(PREFERENCE_ROWS, tokenizer, append_eos=True)
    plain = tokenize_pairs(PREFERENCE_ROWS, tokenizer)
    assert all(a["chosen_ids"] == p["chosen_ids"] + [eos] for a, p in zip(appended, plain))  # SmolLM2: a second EOS


def test_bad_preference_rows_name_the_row_the_column_and_the_fix(tokenizer):
    rows = PREFERENCE_ROWS
    bad = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "rejected"}]
    with pytest.raises(ValueError, match="row 1: missing column 'rejected'. Fix"):
        tokenize_pairs(bad, tokenizer)
    with pytest.raises(ValueError, match="row 0: column 'chosen' must be a non-empty list.*Fix: wrap text"):
        tokenize_pairs([{**rows[0], "chosen": "4"}], tokenizer)
    with pytest.raises(ValueError, match="row 0: 'chosen' and 'rejected' are identical.*Fix: drop the row"):
        tokenize_pairs([{**rows[0], "rejected": rows[0]["chosen"]}], tokenizer)


def test_bad_unpaired_rows_name_the_row_the_column_and_the_fix(tokenizer):
    rows = unpair(PREFERENCE_ROWS)
    with pytest.raises(ValueError, match=r"row 3: 'label' must be True .* Fix"):
        tokenize_unpaired([*rows[:3], {**rows[3], "label": "yes"}], tokenizer)
    with pytest.raises(ValueError, match="row 1: missing column 'label'. Fix: .*unpaired_rows"):
        tokenize_unpaired([rows[0], {k: v for k, v in rows[1].items() if k != "label"}], tokenizer)
    with pytest.raises(ValueError, match="row 0: column 'completion' must be a non-empty list.*Fix"):
        tokenize_unpaired([{**rows[0], "completion": "Hi"}], tokenizer)


def test_rows_whose_prompt_fills_max_length_are_dropped_with_a_warning(tokenizer):
    # max_length = 35: the prompts of rows 0 (36 tokens) and 1 (35) fill it, so no completion token would be left.
    with pytest.warns(UserWarning, match=r"dropped 2 preference rows .* \(rows \[0, 1\]\); raise max_length"):
        kept = tokenize_pairs(PREFERENCE_ROWS, tokenizer, max_length=35)
    assert kept == tokenize_pairs(PREFERENCE_ROWS[2:], tokenizer)  # the others, in order
    unpaired = unpair(PREFERENCE_ROWS)  # the 4 chosen, then the 4 rejected: rows 0, 1, 4, 5 have the long prompts
    with pytest.warns(UserWarning, match=r"dropped 4 unpaired rows .* \(rows \[0, 1, 4, 5\]\)"):
        kept = tokenize_unpaired(unpaired, tokenizer, max_length=35)
    assert [k["label"] for k in kept] == [True, True, False, False]
    with pytest.warns(UserWarning, match="dropped 4 preference rows"), pytest.raises(ValueError, match="no preference"):
        tokenize_pairs(PREFERENCE_ROWS, tokenizer, max_length=5)


def test_unpaired_rows_keep_their_score_when_they_have_one(tokenizer):
    rows = [{**r, "score": 0.5} for r in unpair(PREFERENCE_ROWS[:1])]
    assert [t["score"] for t in tokenize_unpaired(rows, tokenizer)] == [0.5, 0.5]
    assert "score" not in tokenize_unpaired(unpair(PREFERENCE_ROWS[:1]), tokenizer)[0]
