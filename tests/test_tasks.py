"""Tests of rlcourse.tasks: gold rewards on hand-written answers, the shipped JSONL files, the splits.

Fast: no model is loaded.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcourse.tasks import SPLITS, TASKS, get_task
from rlcourse.tasks import arithmetic, concise
from rlcourse.tasks.base import KIND_COLUMNS, Task, read_jsonl

TRL_EXTRAS = {"completion_ids": [[1, 2, 3]], "trainer_state": object(), "log_extra": None, "log_metric": None}
"""Keyword arguments TRL's GRPO/RLOO trainers pass to every reward function."""

VOLCANO = "What is a volcano?"
GOOD = "A volcano is an opening in the crust where molten rock, ash and gas escape."
VERBOSE_50 = "A volcano is an opening in the hard crust " + "where hot molten rock rises " * 8 + "today."
assert len(VERBOSE_50.split()) == 50


# --- registry -------------------------------------------------------------------------------------

def test_get_task_and_unknown_name():
    assert set(TASKS) == {"concise", "arithmetic"}
    for name, task in TASKS.items():
        assert get_task(name) is task and task.name == name and task.description
    with pytest.raises(ValueError, match="arithmetic.*concise"):
        get_task("gsm8k")


def test_reward_names_for_trl_logging():
    assert get_task("concise").reward.__name__ == "concise_gold"
    assert get_task("arithmetic").reward.__name__ == "arithmetic_gold"


# --- concise gold reward --------------------------------------------------------------------------

def gold(prompt: str, answer: str) -> float:
    return concise.concise_gold([prompt], [answer])[0]


@pytest.mark.parametrize(
    ("prompt", "answer", "expected"),
    [
        (VOLCANO, GOOD, 1.0),  # short, finished, on topic
        ("Explain photosynthesis.", "Plants turn sunlight, water and carbon dioxide into sugar: photosynthesis!", 1.0),
        ("Give me a tip for learning to cook.", "Start by cooking simple recipes you enjoy eating.", 1.0),  # cook~cooking
        (VOLCANO, GOOD.rstrip("."), 0.5),  # unfinished last sentence
        (VOLCANO, VERBOSE_50, 25 / 50),  # finished but 50 words
        (VOLCANO, VERBOSE_50.rstrip("."), 0.5 * 25 / 50),  # 50 words, cut off
        (VOLCANO, "", 0.0),
        (VOLCANO, "   ", 0.0),
        (VOLCANO, "Yes.", 0.0),
        (VOLCANO, "Volcanoes erupt.", 0.0),  # fewer than 3 words
        (VOLCANO, "Paris is the capital of France.", 0.0),  # off topic
        (VOLCANO, "A volcano is a volcano.", 0.0),  # echoes the prompt, adds nothing
        (VOLCANO, "A volcano is a volcano is a volcano is a volcano", 0.0),
    ],
)
def test_concise_gold_values(prompt, answer, expected):
    assert gold(prompt, answer) == pytest.approx(expected)


def test_concise_decays_smoothly_with_length():
    values = [gold(VOLCANO, "A volcano erupts molten rock " + "and ash " * k + "often.") for k in range(0, 40)]
    assert values[0] == 1.0
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rewards more words
    assert values[-1] == pytest.approx(25 / len(("A volcano erupts molten rock " + "and ash " * 39 + "often.").split()))


def test_concise_score_parts():
    s = concise.score_answer(VOLCANO, GOOD)
    assert (s.n_words, s.on_topic, s.ends_sentence, s.value) == (15, True, True, 1.0)
    assert s.new_words >= 2
    assert concise.score_answer(VOLCANO, "Paris is lovely in spring.").on_topic is False


@pytest.mark.parametrize(
    "constant",
    ["Yes.", "That is a great question, thank you for asking!", "It depends on many factors and your situation.",
     "I am sorry, but I cannot help with that request."],
)
def test_constant_string_cannot_game_concise(constant):
    prompts = [r["prompt"] for r in get_task("concise").rows("prompts", "eval")]
    scores = concise.concise_gold(prompts, [constant] * len(prompts))
    assert max(scores) == 0.0


def test_concise_accepts_messages_and_ignores_extras():
    as_text = concise.concise_gold([VOLCANO], [GOOD])
    as_messages = concise.concise_gold(
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": VOLCANO}]],
        [[{"role": "assistant", "content": GOOD}]],
        **TRL_EXTRAS, answer=[3],
    )
    assert as_text == as_messages == [1.0]


def test_same_word_stemming():
    assert concise.same_word("cook", "cooking")
    assert concise.same_word("volcano", "volcanic")
    assert concise.same_word("photosynthesis", "photosynthetic")
    assert concise.same_word("bee", "bees")
    assert not concise.same_word("sun", "sunday")  # short words must match exactly
    assert not concise.same_word("cell", "cold")


def test_leading_sentences():
    assert concise.leading_sentences("One two three. Four five six. Seven", max_words=6) == "One two three. Four five six."
    assert concise.leading_sentences("One two three. Four five six.", max_words=4) == "One two three."
    assert concise.leading_sentences("One two three four five six.", max_words=4) == ""
    assert concise.leading_sentences("no sentence end", max_words=10) == ""


def test_every_prompt_has_topic_words():
    for p in concise.all_prompts():
        assert concise.topic_words(p.text), p.text
    assert len({p.text for p in concise.all_prompts()}) == len(concise.all_prompts()) >= 600


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(max_size=80), answer=st.text(max_size=300))
def test_concise_gold_in_unit_interval_and_deterministic(prompt, answer):
    first = gold(prompt, answer)
    assert 0.0 <= first <= 1.0
    assert gold(prompt, answer) == first


@settings(max_examples=100, deadline=None)
@given(answer=st.text(max_size=300))
def test_concise_gold_bounded_on_real_prompts(answer):
    prompt = concise.all_prompts()[len(answer) % 750].text
    assert 0.0 <= gold(prompt, answer) <= 1.0


# --- arithmetic checker ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("12", 12), ("12.", 12), ("7 + 5 = 12", 12), ("7 + 5 is 12 and 12 is 12.", 12), ("The answer is 12!", 12),
        ("12.0", 12), ("12.5", 12.5), ("-3", -3), ("7-5", 5), ("7 - 5 = 2", 2), ("1,200", 200),
        ("twelve", None), ("", None), ("12\n\nI'm glad you found the answer 3 times", 3),
    ],
)
def test_parse_answer_takes_the_last_number(text, parsed):
    assert arithmetic.parse_answer(text) == parsed


def test_arithmetic_gold_values_and_inputs():
    prompt = "What is 7 + 5? Reply with the number only."
    completions = ["12", "7 + 5 = 12", "12 is the answer, not 13", "13", "", "twelve"]
    expected = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert arithmetic.arithmetic_gold([prompt] * 6, completions, answer=[12] * 6) == expected
    # without the answer column the prompt is parsed; message lists and TRL extras are accepted
    messages = [[{"role": "user", "content": prompt}]] * 6
    replies = [[{"role": "assistant", "content": c}] for c in completions]
    assert arithmetic.arithmetic_gold(messages, replies, **TRL_EXTRAS) == expected


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-10**6, 10**6), prefix=st.text(alphabet="abc =+*?", max_size=20))
def test_a_trailing_number_is_what_is_read(n, prefix):
    assert arithmetic.is_correct(f"{prefix} {n}", n)
    assert not arithmetic.is_correct(f"{prefix} {n}", n + 1)


def test_answer_column_matches_the_prompt():
    task = get_task("arithmetic")
    for split in SPLITS:
        for row in task.rows("prompts", split):
            assert isinstance(row["answer"], int)
            assert arithmetic.answer_from_prompt(row["prompt"][-1]["content"]) == row["answer"]


# --- shipped files --------------------------------------------------------------------------------

EXPECTED_COLUMNS = {
    ("concise", "sft"): ["prompt", "completion"],
    ("concise", "pref"): ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"],
    ("concise", "prompts"): ["prompt"],
    ("arithmetic", "sft"): ["prompt", "completion"],
    ("arithmetic", "pref"): ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"],
    ("arithmetic", "prompts"): ["prompt", "answer"],
}
LOADERS = {"sft": "sft", "pref": "preferences", "prompts": "prompts"}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("name", "kind"), sorted(EXPECTED_COLUMNS))
def test_every_file_loads_with_documented_columns(name, kind, split):
    task = get_task(name)
    assert task.path(kind, split).stat().st_size < 1_000_000
    ds = getattr(task, LOADERS[kind])(split)
    assert ds.column_names == EXPECTED_COLUMNS[(name, kind)]
    assert len(ds) >= 40
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    for column in ("completion", "chosen", "rejected"):
        if column in row:
            assert [m["role"] for m in row[column]] == ["assistant"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_preference_scores_are_the_gold_reward(name):
    task = get_task(name)
    for split in SPLITS:
        rows = task.rows("pref", split)
        prompts = [r["prompt"] for r in rows]
        extra = {"answer": [arithmetic.answer_from_prompt(p[-1]["content"]) for p in prompts]} if name == "arithmetic" else {}
        chosen = task.reward(prompts, [r["chosen"] for r in rows], **extra)
        rejected = task.reward(prompts, [r["rejected"] for r in rows], **extra)
        assert chosen == pytest.approx([r["score_chosen"] for r in rows], abs=1e-4)
        assert rejected == pytest.approx([r["score_rejected"] for r in rows], abs=1e-4)
        assert all(c > r for c, r in zip(chosen, rejected))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sft_demonstrations_score_high(name):
    task = get_task(name)
    for split in SPLITS:
        rows = task.rows("sft", split)
        scores = task.reward([r["prompt"] for r in rows], [r["completion"] for r in rows])
        assert min(scores) >= (0.9 if name == "concise" else 1.0)


def _prompt_texts(task: Task, split: str) -> set[str]:
    return {row["prompt"][-1]["content"] for kind in KIND_COLUMNS for row in task.rows(kind, split)}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_prompts_never_appear_in_train(name):
    task = get_task(name)
    train, held_out = _prompt_texts(task, "train"), _prompt_texts(task, "eval")
    assert not train & held_out
    assert len(task.rows("prompts", "eval")) == 100


def test_concise_eval_topics_are_unseen():
    split = concise.split_prompts(0)
    assert not {p.topic for p in split["train"]} & {p.topic for p in split["eval"]}
    shipped = [r["prompt"][0]["content"] for r in get_task("concise").rows("prompts", "eval")]
    assert shipped == [p.text for p in split["eval"][:100]]  # the files are the seed-0 split


def test_arithmetic_eval_pairs_are_unseen_in_either_order():
    split = arithmetic.split_problems(0)
    train = {(p.op, p.a, p.b) for p in split["train"]}
    for p in split["eval"]:
        assert (p.op, p.a, p.b) not in train
        if p.op in "+*":
            assert (p.op, p.b, p.a) not in train
    shipped = [r["prompt"][0]["content"] for r in get_task("arithmetic").rows("prompts", "eval")]
    assert shipped == [p.text for p in split["eval"]]


def test_splits_are_seeded():
    assert concise.split_prompts(1) == concise.split_prompts(1) != concise.split_prompts(2)
    assert arithmetic.split_problems(1) == arithmetic.split_problems(1) != arithmetic.split_problems(2)


# --- malformed files ------------------------------------------------------------------------------

def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


GOOD_ROW = json.dumps({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": [{"role": "user", "content": "q"}]}), r"missing column\(s\) \['completion'\]"),
        (json.dumps({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}), "list of messages"),
        (json.dumps({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}),
         "role 'assistant'"),
        ("", "empty line"),
    ],
)
def test_malformed_file_errors_name_file_and_line(tmp_path, bad_line, message):
    task = Task(name="toy", description="", reward=concise.concise_gold, data_dir=tmp_path)
    _write(task.path("sft", "train"), [GOOD_ROW, bad_line])
    with pytest.raises(ValueError, match=message) as err:
        task.sft("train")
    assert f"sft_train.jsonl:2" in str(err.value)


def test_missing_file_and_bad_split(tmp_path):
    task = Task(name="toy", description="", reward=concise.concise_gold, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="make_data.py"):
        task.prompts("train")
    with pytest.raises(ValueError, match="train.*eval"):
        task.prompts("test")
    assert read_jsonl.__doc__  # the reader documents its checks


# --- the system message ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KIND_COLUMNS))
def test_a_system_message_leads_every_prompt_and_the_reward_still_reads_the_question(kind):
    plain, short = get_task("arithmetic"), get_task("arithmetic", system="")
    assert plain.system is None and short.system == ""
    for row, row_with in zip(plain.rows(kind, "eval")[:5], short.rows(kind, "eval")[:5], strict=True):
        assert row_with["prompt"] == [{"role": "system", "content": ""}] + row["prompt"]
        assert {k: v for k, v in row_with.items() if k != "prompt"} == {k: v for k, v in row.items() if k != "prompt"}
    row = short.rows("prompts", "eval")[0]
    right = [{"role": "assistant", "content": str(row["answer"])}]
    assert short.reward([row["prompt"]], [right], **TRL_EXTRAS) == [1.0]  # the answer comes from the user turn


def test_an_empty_system_message_is_16_tokens_shorter_than_the_templates_default(tokenizer):
    """SmolLM2's template adds its default system prompt to a prompt without one: 16 tokens more than an empty system
    message (the figures in rlcourse.online_runs.SYSTEM's docstring and lesson 11); rlcourse.bench.PROMPT_TOKENS is
    the online lessons' prompt length."""
    from rlcourse.bench import PROMPT_TOKENS
    from rlcourse.online_runs import SYSTEM

    def tokens(task):
        prompt = task.rows("prompts", "train")[0]["prompt"]
        return len(tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
                   ["input_ids"])

    default, empty = tokens(get_task("arithmetic")), tokens(get_task("arithmetic", system=""))
    assert default - empty == 16
    assert abs(tokens(get_task("arithmetic", system=SYSTEM)) - PROMPT_TOKENS) <= 1
