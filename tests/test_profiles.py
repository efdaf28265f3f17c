"""Run profiles: every profile sets every size, each size says what it is, ci is the smallest run, and overrides
change one field only."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest
import torch

from rlcourse import profiles
from rlcourse.profiles import PROFILES, IPOSizes, KLStudySizes, OnlineSizes, Profile, get_profile

SIZE_CLASSES = [Profile, IPOSizes, KLStudySizes, OnlineSizes]
LESSON_SIZES = {"ipo": IPOSizes, "kl_penalty": KLStudySizes, "rloo": OnlineSizes, "grpo": OnlineSizes}


def _sizes(p) -> dict[str, int]:
    """Every integer size of a profile, its lessons' included, by dotted name."""
    out = {}
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if dataclasses.is_dataclass(value):
            out |= {f"{f.name}.{k}": v for k, v in _sizes(value).items()}
        elif type(value) is int:
            out[f.name] = value
    return out


@pytest.mark.parametrize("cls", SIZE_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    """A string right under each field, as in cleanrl's Args: what the number means, where it is used."""
    body = next(n for n in ast.parse(inspect.getsource(profiles)).body
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    documented = {a.target.id for a, doc in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
                  and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                  and isinstance(doc.value.value, str) and doc.value.value.strip()}
    assert {f.name for f in dataclasses.fields(cls)} <= documented


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_sets_every_lesson_size(name):
    p = get_profile(name)
    assert p.name == name
    for field, cls in LESSON_SIZES.items():
        sizes = getattr(p, field)
        assert type(sizes) is cls, f"{name}.{field}"
        for f in dataclasses.fields(cls):
            value = getattr(sizes, f.name)
            assert type(value) in (int, float) and value >= 0, f"{name}.{field}.{f.name}"
    for rate in [p.learning_rate, p.preference_learning_rate, p.rloo.learning_rate, p.rloo.warm_start_learning_rate,
                 p.grpo.learning_rate, p.grpo.warm_start_learning_rate, p.kl_penalty.toy_learning_rate]:
        assert 0 < rate < 1


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_sizes_the_runs_can_use(name):
    p = get_profile(name)
    for online in (p.rloo, p.grpo):
        assert online.num_generations >= 2, "RLOO's leave-one-out baseline and GRPO's group std need two samples"
        assert online.prompts_per_step >= 1 and 1 <= online.base_eval_samples <= online.eval_samples
    assert p.ipo.n_pairs % p.ipo.batch_size == 0, "every pair is seen once per n_pairs / batch_size steps"
    assert p.kl_penalty.samples_per_prompt >= 2, "the estimators' spread needs two samples per prompt"
    assert p.forward_timing_repeats >= 1 and p.step_cost_repeats >= 1


def test_ci_is_the_smallest_run():
    """ci exercises the code paths in CI: no size of it is larger than the same size of a real profile, except the
    online reruns (one in ci, so the rerun path runs; none by default in cpu, where they are a parameter)."""
    ci = {k: v for k, v in _sizes(PROFILES["ci"]).items() if not k.endswith("extra_seeds")}
    for name in ("cpu", "gpu"):
        larger = {k: (v, _sizes(PROFILES[name])[k]) for k, v in ci.items() if v > _sizes(PROFILES[name])[k]}
        assert not larger, f"ci is larger than {name} in {larger}"


def test_online_lessons_share_one_budget():
    """Lessons 11 and 12 compare RLOO and GRPO on the same budget; the cpu default is one run a side (the reruns that
    measure run-to-run noise are a parameter, extra_seeds), and the probes look at a subset of the held-out prompts."""
    for name, p in PROFILES.items():
        assert p.grpo == p.rloo, name
        assert p.rloo.n_probe <= p.rloo.n_eval and 1 <= p.rloo.probe_every <= p.rloo.steps, name
    assert PROFILES["cpu"].rloo.extra_seeds == 0


def test_overrides_change_one_field_and_leave_the_table_alone():
    before = PROFILES["cpu"]
    p = get_profile("cpu", preference_learning_rate=1e-3, ipo=IPOSizes(steps=5, batch_size=2, n_pairs=4))
    assert (p.preference_learning_rate, p.ipo.steps) == (1e-3, 5)
    assert dataclasses.replace(p, preference_learning_rate=before.preference_learning_rate, ipo=before.ipo) == before
    more_seeds = get_profile("cpu", grpo=dataclasses.replace(before.grpo, extra_seeds=4))
    assert more_seeds.grpo.extra_seeds == 4 and more_seeds.rloo == before.rloo
    assert PROFILES["cpu"] is before and before.grpo.extra_seeds == 0
    with pytest.raises(TypeError):
        get_profile("cpu", toy_steps=10)  # a lesson's size is set on its dataclass, not on the profile
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.rloo.num_generations = 4


def test_auto_and_unknown_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile().name == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_profile("auto").name == "gpu"
    with pytest.raises(ValueError, match="unknown profile 'laptop'"):
        get_profile("laptop")


def test_printed_profile_leaves_each_lesson_its_own_sizes():
    """print(P) opens every notebook: the shared sizes, not four other lessons' tables."""
    text = repr(PROFILES["gpu"])
    assert "preference_learning_rate=0.0005" in text and "step_cost_repeats=5" in text
    assert not any(f"{field}=" in text for field in LESSON_SIZES)
