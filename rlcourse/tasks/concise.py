"""The ``concise`` task: answer an everyday question in one short, complete, on-topic sentence or two.

SmolLM2-135M-Instruct rambles: asked "Explain photosynthesis." it writes 50+ words and is cut off
mid-sentence by any sensible token limit. The gold reward prefers a short, finished answer that is
still about the question. It is a pure function of the prompt text and the answer text; see
:func:`score_answer` for the exact rule and :data:`TEMPLATES`/:data:`TOPICS` for the prompts.

Prompts are templates × topics; the train/eval split is by *topic*, so an eval prompt is about a
topic no training prompt mentions (a check of style transfer, not of memorised answers).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlcourse.tasks.base import Task, message_text

MAX_WORDS = 25
"""Answers up to this many words get the full length factor; longer ones get MAX_WORDS / n_words."""
MIN_WORDS = 3
"""Answers shorter than this score 0 ("Yes." is not an answer)."""
MIN_NEW_WORDS = 2
"""An answer must add this many distinct content words that the prompt does not contain."""
UNFINISHED_FACTOR = 0.5
"""Multiplier for an answer that does not end a sentence (typically cut off by the token limit)."""

TEMPLATES = {
    "concept": (
        "Explain {topic}.",
        "What is {topic}?",
        "Tell me about {topic}.",
        "Why does {topic} matter?",
        "What should I know about {topic}?",
    ),
    "activity": (
        "Give me a tip for {topic}.",
        "How can I get better at {topic}?",
        "What is a good way to start {topic}?",
        "What mistakes do beginners make when {topic}?",
        "Do you have any advice on {topic}?",
    ),
}
"""Prompt templates per topic kind; a concept is a noun phrase, an activity a gerund phrase."""

TOPICS = {
    "concept": (
        "photosynthesis", "gravity", "inflation", "the water cycle", "a black hole", "democracy",
        "evolution", "the immune system", "climate change", "electricity", "the stock market",
        "a volcano", "an earthquake", "the internet", "a vaccine", "DNA", "the moon", "the sun",
        "a rainbow", "recycling", "compound interest", "a credit score", "the Roman Empire",
        "the printing press", "the Renaissance", "the Industrial Revolution", "the French Revolution",
        "the Great Wall of China", "the Amazon rainforest", "the ocean tide", "a hurricane",
        "a tornado", "magnetism", "friction", "nuclear energy", "solar power", "wind power",
        "a battery", "a computer virus", "encryption", "a password manager", "artificial intelligence",
        "machine learning", "a search engine", "a spreadsheet", "a mortgage", "insurance",
        "supply and demand", "a recession", "the United Nations", "the Olympic Games", "chess",
        "jazz", "opera", "poetry", "meditation", "caffeine", "protein", "vitamin C", "the heart",
        "the brain", "a muscle", "a fever", "an allergy", "an antibiotic", "a telescope",
        "a microscope", "a satellite", "the speed of light", "an atom", "a molecule", "a cell",
        "a bacterium", "the periodic table", "a fossil", "a dinosaur", "a glacier", "a desert",
        "a coral reef", "an ecosystem", "biodiversity", "pollination", "a honeybee", "composting",
        "the metric system", "a prime number", "probability", "geometry", "algebra", "a compass",
        "GPS", "a bridge", "a rocket", "the International Space Station", "Mars", "a comet",
        "an eclipse", "a leap year", "a time zone", "a bank loan", "a smartphone", "the ozone layer",
    ),
    "activity": (
        "learning to cook", "saving money", "running a marathon", "studying for exams",
        "public speaking", "learning a language", "gardening", "writing an essay", "staying focused",
        "getting enough sleep", "making friends", "learning to play the guitar", "drawing",
        "swimming", "cycling to work", "meal planning", "preparing for a job interview",
        "managing stress", "waking up early", "drinking more water", "reading more books",
        "keeping a journal", "learning to code", "taking photos", "camping", "hiking",
        "baking bread", "growing tomatoes", "knitting", "playing chess", "training a puppy",
        "caring for houseplants", "decluttering a room", "budgeting", "traveling on a budget",
        "writing a resume", "negotiating a salary", "working from home", "taking notes in class",
        "memorizing vocabulary", "doing yoga", "lifting weights", "stretching", "brewing tea",
        "fixing a flat tire", "painting a room", "cleaning the kitchen", "saving energy at home",
    ),
}
"""Topics per kind: 102 concepts and 48 activities, so 750 distinct prompts."""

EVAL_TOPIC_FRACTION = 0.2
"""Share of topics (of each kind) held out for evaluation."""

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing don down during each even few for from further
    had has have having he her here hers him his how however i if in into is it its itself just like
    many may me might more most much must my no nor not now of off often on once one only or other our
    out over own same she should so some such than that the their them then there these they this those
    through to too under until up upon very was we were what when where which while who whom why will
    with would yes you your""".split()
)
"""Function words: never topic words, never "new content" words."""

TEMPLATE_WORDS = frozenset(
    w for ts in TEMPLATES.values() for t in ts for w in re.findall(r"[a-z]+", t.replace("{topic}", "").lower())
)
"""Words of the templates themselves ("explain", "tip", ...): part of the request, not of the topic."""


@dataclass(frozen=True)
class ConcisePrompt:
    """One prompt of the task."""

    text: str
    """The user's request."""
    topic: str
    """The topic it was built from (the split unit)."""
    kind: str
    """"concept" or "activity"."""


def all_prompts() -> list[ConcisePrompt]:
    """Every template × topic prompt, in a fixed order."""
    return [
        ConcisePrompt(template.format(topic=topic), topic, kind)
        for kind, topics in TOPICS.items()
        for topic in topics
        for template in TEMPLATES[kind]
    ]


def split_prompts(seed: int = 0) -> dict[str, list[ConcisePrompt]]:
    """Shuffled train and eval prompts; eval topics (EVAL_TOPIC_FRACTION of each kind) never occur in train."""
    rng = random.Random(seed)
    eval_topics = set()
    for kind in TOPICS:
        topics = sorted(TOPICS[kind])  # sorted: independent of the tuple's order in the source
        rng.shuffle(topics)
        eval_topics.update(topics[: round(EVAL_TOPIC_FRACTION * len(topics))])
    prompts = all_prompts()
    rng.shuffle(prompts)
    return {
        "train": [p for p in prompts if p.topic not in eval_topics],
        "eval": [p for p in prompts if p.topic in eval_topics],
    }


def _words(text: str) -> list[str]:
    """Lower-case alphabetic words of at least 3 letters that are not function words."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in STOPWORDS]


def _norm(word: str) -> str:
    # crude plural strip so "bees" meets "bee"; the prefix rule below does the rest
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def same_word(a: str, b: str) -> bool:
    """Whether two words count as the same for topic matching: crude stemming by shared prefix.

    Equal after stripping one trailing "s", or (both at least 4 letters) sharing a prefix of at least
    max(4, shorter length − 3) letters: cook/cooking, volcano/volcanic, photosynthesis/photosynthetic.
    """
    a, b = _norm(a), _norm(b)
    if a == b:
        return True
    shorter = min(len(a), len(b))
    if shorter < 4:
        return False
    common = 0
    for x, y in zip(a, b):
        if x != y:
            break
        common += 1
    return common >= max(4, shorter - 3)


def topic_words(prompt: str) -> list[str]:
    """Content words of the prompt that are not template words: what an answer must mention (one of)."""
    return [w for w in _words(prompt) if w not in TEMPLATE_WORDS]


ENDS_SENTENCE = re.compile(r"[.!?][\"'”’)\]]*$")


@dataclass(frozen=True)
class ConciseScore:
    """The gold score of one answer and the parts it is made of."""

    n_words: int
    """Whitespace-separated tokens of the answer."""
    on_topic: bool
    """Mentions at least one topic word of the prompt (vacuously True when the prompt has none)."""
    new_words: int
    """Distinct content words of the answer that match no word of the prompt."""
    ends_sentence: bool
    """The answer ends with . ! or ? (optionally followed by closing quotes or brackets)."""
    value: float
    """The gold reward in [0, 1]."""


def score_answer(prompt: str, answer: str) -> ConciseScore:
    """Gold score of ``answer`` to ``prompt`` (both plain text).

    value = 0 if the answer has fewer than MIN_WORDS words, or mentions none of the prompt's topic
    words (content words of the prompt minus template words; matched by :func:`same_word`), or adds
    fewer than MIN_NEW_WORDS distinct content words absent from the prompt (so echoing the question,
    "Photosynthesis is photosynthesis.", scores 0). Otherwise

        value = min(1, MAX_WORDS / n_words) × (1 if it ends a sentence else UNFINISHED_FACTOR)

    so 3–25 words ending in . ! ? score 1, a 50-word finished answer 0.5, and a 50-word answer cut
    off mid-sentence 0.25. A constant string cannot score on most prompts (it must name the topic);
    the metric does not judge truth, so a short, fluent, on-topic but wrong answer still scores 1.
    """
    answer = answer.strip()
    n_words = len(answer.split())
    prompt_words = _words(prompt)
    wanted = topic_words(prompt)
    said = _words(answer)
    on_topic = not wanted or any(same_word(w, t) for w in said for t in wanted)
    new = {_norm(w) for w in said if not any(same_word(w, p) for p in prompt_words)}
    ends = bool(ENDS_SENTENCE.search(answer))
    if n_words < MIN_WORDS or not on_topic or len(new) < MIN_NEW_WORDS:
        value = 0.0
    else:
        value = min(1.0, MAX_WORDS / n_words) * (1.0 if ends else UNFINISHED_FACTOR)
    return ConciseScore(n_words, on_topic, len(new), ends, value)


def concise_gold(prompts, completions, **columns) -> list[float]:
    """TRL reward function: the gold :func:`score_answer` value of each completion.

    ``prompts``/``completions`` are strings or chat message lists (the last message's content is
    scored). Extra keyword arguments (dataset columns, ``completion_ids``, ``trainer_state``) are ignored.
    """
    return [
        score_answer(message_text(p), message_text(c)).value
        for p, c in zip(prompts, completions, strict=True)
    ]


def leading_sentences(text: str, max_words: int = MAX_WORDS) -> str:
    """The longest run of whole leading sentences with at most ``max_words`` words ("" if none fits).

    Used to turn a rambling base-model sample into a short SFT demonstration.
    """
    kept: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        if not ENDS_SENTENCE.search(sentence) or len(" ".join(kept + [sentence]).split()) > max_words:
            break
        kept.append(sentence)
    return " ".join(kept)


TASK = Task(
    name="concise",
    description=(
        "Answer an everyday question or request in one or two short sentences. Gold reward: 1 for a "
        f"finished answer of {MIN_WORDS}-{MAX_WORDS} words that names the topic and adds at least "
        f"{MIN_NEW_WORDS} words of its own, decaying as {MAX_WORDS}/n_words for longer answers and halved "
        "for an unfinished last sentence; 0 for off-topic, echoing or near-empty answers."
    ),
    reward=concise_gold,
)
