"""Every method module in rlcourse/methods has the same shape (CONTRIBUTING.md, "Adding a method"), so a new method starts from a template
and the benchmark is one table: this fails when a module forgets a name of the interface."""

import dataclasses
import importlib
import pkgutil

import pytest

import rlcourse.methods
from rlcourse.methods.rollouts import Rollouts

SHARED = {"rollouts"}
"""Modules of rlcourse/methods that are not a method (what the online methods share)."""
INTERFACE = ("Settings", "batches", "step_fn", "trl_classes")
"""Names every method module exposes; ``trl_kwargs`` too when ``trl_classes()`` is not None."""
METHODS = sorted(m.name for m in pkgutil.iter_modules(rlcourse.methods.__path__) if m.name not in SHARED)


def test_the_methods_are_found():
    assert {"sft", "dpo", "cpo", "simpo", "orpo", "kto", "bco", "dro", "rloo", "grpo"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_module_exposes_the_interface(name):
    module = importlib.import_module(f"rlcourse.methods.{name}")
    missing = [n for n in INTERFACE if not callable(getattr(module, n, None))]
    assert not missing, (f"rlcourse.methods.{name} lacks {missing}: every method module exposes "
                         f"{', '.join(INTERFACE)} (and trl_kwargs where trl_classes() is not None)")
    settings = module.Settings()  # every option has a default
    assert dataclasses.is_dataclass(settings) and module.Settings.__dataclass_params__.frozen, \
        f"rlcourse.methods.{name}.Settings must be a frozen dataclass"
    classes = module.trl_classes()
    if classes is None:
        return
    assert callable(getattr(module, "trl_kwargs", None)), f"rlcourse.methods.{name} has a TRL trainer but no trl_kwargs"
    _, config_cls = classes
    online = module.batches is Rollouts
    kwargs = module.trl_kwargs(settings) if online else module.trl_kwargs(settings, 64)
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(config_cls)}
    assert not unknown, f"rlcourse.methods.{name}.trl_kwargs sets {sorted(unknown)}, which {config_cls.__name__} lacks"
