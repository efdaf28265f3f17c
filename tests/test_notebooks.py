"""Execute every notebook end to end, headless, in the small ``ci`` profile (marker ``notebook``).

Each notebook runs exactly as ``make course`` runs it (``scripts/run_notebooks.py``): papermill,
``parameters={"profile": "ci"}``, working directory ``notebooks/``, on the Jupyter kernel
``rlcourse``, which is made to run this very interpreter. Executed copies go to
``build/notebooks/ci/``; figures and metrics go where the notebook puts them (by convention
``build/<slug>/<profile>/``, so a test run leaves the figures of a ``make course`` run alone).
A failing cell (a parity ``assert`` included) fails the test, naming the cell and the error.

Skip them with ``pytest -m "not notebook"``; run one with ``pytest -k 01_sft``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import run_notebooks  # noqa: E402

from rlcourse.paths import build_root  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OUT = build_root() / "notebooks" / "ci"
CELL_TIMEOUT = 900
"""Seconds a single cell may run in the ci profile before the test fails."""


@pytest.fixture
def ci_run():
    """Run a notebook like the course does, in the ci profile; fail the test with the cell's error."""
    from papermill.exceptions import PapermillExecutionError

    kernel = run_notebooks.ensure_kernel(build_root() / "jupyter")

    def run(path: Path, cwd: Path | None = None, parameters: dict | None = None):
        out = OUT / path.name
        try:
            return run_notebooks.execute(path, out, parameters or {"profile": "ci"}, cwd=cwd,
                                         kernel_name=kernel, timeout=CELL_TIMEOUT)
        except PapermillExecutionError as exc:
            err = run_notebooks.describe_error(exc)
        # Outside the except block, so pytest shows the notebook's error and not papermill's internals.
        pytest.fail(f"{path.name} failed in cell {err['cell']} of the executed copy {os.path.relpath(out, ROOT)}:\n"
                    f"{err['error']}\n{err['traceback']}", pytrace=False)

    return run


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_ci_profile(path, ci_run):
    ci_run(path)


# The runner itself, on two tiny notebooks, so that a broken set-up shows as such (and not as a
# failure of some lesson): the kernel must be this interpreter, see the test environment, run in the
# notebook's folder and get the profile parameter; a failing assert must fail the test.

def _tiny_notebook(folder: Path, name: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "auto"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    path = folder / name
    nbformat.write(nb, path)
    return path


@pytest.mark.notebook
def test_runner_uses_this_interpreter_and_test_environment(tmp_path, ci_run):
    body = f"""
import os, sys
from pathlib import Path
assert profile == "ci", profile
assert sys.prefix == {sys.prefix!r}, sys.prefix  # the same environment (venv) as the tests
assert os.path.realpath(sys.executable) == {str(Path(sys.executable).resolve())!r}, sys.executable
assert Path.cwd().resolve() == Path({str(tmp_path.resolve())!r}), Path.cwd()
assert os.environ["HF_HUB_OFFLINE"] == "1"
assert os.environ["TRL_EXPERIMENTAL_SILENCE"] == "1"
assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
import rlcourse
"""
    nb = ci_run(_tiny_notebook(tmp_path, "_runner_check.ipynb", body), cwd=tmp_path)
    assert nb.metadata.papermill.parameters == {"profile": "ci"}


@pytest.mark.notebook
def test_runner_fails_on_a_failing_assert(tmp_path, ci_run):
    path = _tiny_notebook(tmp_path, "_runner_fail.ipynb", "assert 1 + 1 == 3, 'parity check failed'")
    with pytest.raises(pytest.fail.Exception, match="parity check failed"):
        ci_run(path, cwd=tmp_path)


def test_runner_parameters_are_literals_and_must_exist(capsys):
    assert run_notebooks.parse_parameters([["extra_seeds", "4"], ["learning_rate", "5e-4"], ["task_name", "arithmetic"],
                                           ["run_variants", "False"], ["num_generations", "None"]]) == {
        "extra_seeds": 4, "learning_rate": 5e-4, "task_name": "arithmetic", "run_variants": False,
        "num_generations": None}
    with pytest.raises(SystemExit, match="--profile"):
        run_notebooks.parse_parameters([["profile", "cpu"]])
    names = run_notebooks.parameter_names(ROOT / "notebooks" / "12_grpo.ipynb")
    assert {"profile", "seed", "extra_seeds", "learning_rate"} <= names
    with pytest.raises(SystemExit, match="no parameter extra_sedes"):
        run_notebooks.main(["--profile", "ci", "-p", "extra_sedes", "4", "12_grpo"])
