"""TRL's dataset formats (lesson 02): detection, a validator with located, fixable errors, and conversions.

- ``formats``: ``Kind``, ``Format``, ``detect_format``, ``is_conversational``, ``DatasetFormatError``;
- ``validator``: ``validate`` (every problem of a dataset in one error) and ``token_lengths``;
- ``convert``: ``to_standard`` (chat template), ``unpair`` / ``pair``, ``extract_prompt`` /
  ``to_implicit_prompt``, ``to_language_modeling`` / ``to_prompt_completion``, ``to_prompt_only``;
- ``examples``: one example per format, random valid examples, a gallery of malformed datasets;
- ``unpaired`` (lesson 09: ``unpaired_rows``, ``flip_pairs``) and ``deterministic`` (lesson 06's
  ``deterministic_preferences``): the datasets the lessons build from the tasks' pairs.

TRL's own functions (``trl.is_conversational``, ``trl.maybe_apply_chat_template``,
``trl.unpair_preference_dataset``, ``trl.extract_prompt``) are the reference our versions are tested against.
"""

from .convert import (
    as_rows,
    extract_prompt,
    pair,
    to_implicit_prompt,
    to_language_modeling,
    to_prompt_completion,
    to_prompt_only,
    to_standard,
    unpair,
)
from .deterministic import deterministic_preferences
from .examples import EXAMPLES, Malformed, malformed_gallery, random_example
from .formats import (
    ALL_FORMATS,
    ROLES,
    DatasetFormatError,
    Format,
    Kind,
    Problem,
    detect_format,
    is_conversational,
)
from .unpaired import flip_pairs, unpaired_rows
from .validator import token_lengths, validate

__all__ = [
    "ALL_FORMATS", "EXAMPLES", "ROLES", "DatasetFormatError", "Format", "Kind", "Malformed", "Problem", "as_rows",
    "detect_format", "extract_prompt", "is_conversational", "malformed_gallery", "pair", "random_example",
    "to_implicit_prompt", "to_language_modeling", "to_prompt_completion", "to_prompt_only", "to_standard",
    "token_lengths", "unpair", "validate", "deterministic_preferences", "flip_pairs", "unpaired_rows",
]
