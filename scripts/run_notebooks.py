#!/usr/bin/env python
"""Run the course's notebooks headless with papermill and write a results index.

    python scripts/run_notebooks.py [--profile auto|ci|cpu|gpu] [-p NAME VALUE ...] [--timeout S] [NOTEBOOK ...]

(``make course`` runs it with the course's environment.) Each notebook runs in ``notebooks/`` with
its ``profile`` parameter set; its executed copy goes to ``build/notebooks/<name>.ipynb`` and the
figures and metrics it writes land under ``build/<slug>/`` (the notebooks write them there through
``rlcourse.paths.build_dir``, by convention in a folder per profile). ``build/index.md`` and ``build/index.json`` list each notebook with its
status, runtime, profile and the files it produced. A failing notebook is reported with its error
and the others still run; the exit status is 1 if any notebook failed.

``$RLCOURSE_BUILD`` moves the whole build folder. ``tests/test_notebooks.py`` uses ``execute`` and
``ensure_kernel`` from here, so the tests run notebooks exactly the way the course does.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import fnmatch
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, also when it is not installed into this interpreter
from rlcourse.paths import build_root  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "rlcourse"
FIGURE_SUFFIXES = {".png", ".svg", ".pdf", ".jpg", ".jpeg", ".gif"}
RESULT_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".md", ".txt", ".html"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def discover(patterns: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The notebooks under notebooks/, sorted; only those matching ``patterns`` (names or globs) if given."""
    found = sorted(NOTEBOOKS.glob("*.ipynb"))
    if not patterns:
        return found
    chosen = []
    for pattern in patterns:
        name = Path(pattern).name
        matches = [p for p in found if fnmatch.fnmatch(p.name, name) or fnmatch.fnmatch(p.stem, name)]
        if not matches:
            raise SystemExit(f"no notebook in {NOTEBOOKS.relative_to(ROOT)}/ matches {pattern!r}")
        chosen += [p for p in matches if p not in chosen]
    return chosen


def ensure_kernel(spec_root: Path | None = None, name: str = KERNEL_NAME) -> str:
    """Make the Jupyter kernel ``name`` run *this* Python interpreter, and return ``name``.

    Writes a kernelspec whose command is ``sys.executable`` under ``<spec_root>/kernels/<name>`` and
    puts ``spec_root`` first on ``JUPYTER_PATH``, which Jupyter searches before the user's and the
    system's kernel folders: a stale ``rlcourse`` or ``python3`` kernelspec elsewhere on the machine
    cannot make the notebooks run in another environment.
    """
    from rlcourse.threads import kernel_env

    spec_root = Path(spec_root or build_root() / "jupyter").resolve()
    kernel_dir = spec_root / "kernels" / name
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (rlcourse)",
        "language": "python",
        "metadata": {"debugger": True},
        "env": kernel_env(),  # OpenMP settings before torch loads (rlcourse.threads)
    }
    path = kernel_dir / "kernel.json"
    if not path.exists() or json.loads(path.read_text()) != spec:
        path.write_text(json.dumps(spec, indent=1) + "\n")
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p and Path(p) != spec_root]
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(spec_root), *paths])
    return name


def parse_parameters(pairs: list[list[str]] | None) -> dict:
    """``-p NAME VALUE`` pairs as notebook parameters: VALUE read as a Python literal (4, 5e-4, True, None), else text."""
    params = {}
    for name, value in pairs or []:
        if not name.isidentifier():
            raise SystemExit(f"-p {name} {value}: {name!r} is not a parameter name (see the notebook's parameters cell)")
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value
    if "profile" in params:
        raise SystemExit("set the profile with --profile, not -p profile")
    return params


def parameter_names(path: Path) -> set[str]:
    """The names a notebook's ``parameters`` cell assigns: the ones ``-p`` may override."""
    for cell in json.loads(path.read_text())["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
    return set()


def resolve_profile(name: str) -> str:
    """``auto`` becomes the profile the notebooks would pick on this machine (gpu with CUDA, else cpu)."""
    if name != "auto":
        return name
    from rlcourse.profiles import get_profile

    return get_profile("auto").name


def execute(path: Path, out_path: Path, parameters: dict, cwd: Path | None = None, kernel_name: str | None = None,
            timeout: float | None = None, progress: bool = False):
    """Execute one notebook with papermill; returns the executed notebook.

    Raises ``papermill.PapermillExecutionError`` when a cell fails (an ``assert`` in the notebook
    included); the executed copy, with the error in it, is written to ``out_path`` either way.
    """
    import papermill as pm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(
        str(path),
        str(out_path),
        parameters=parameters,
        kernel_name=kernel_name or ensure_kernel(),
        language="python",
        cwd=str(cwd or path.parent),
        execution_timeout=timeout,
        progress_bar=progress,
        log_output=False,
        request_save_on_cell_execute=True,
    )


def describe_error(exc: BaseException) -> dict:
    """A short, JSON-able description of why a notebook failed."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        tb = [ANSI.sub("", line) for line in exc.traceback]
        return {
            "cell": exc.cell_index,
            "error": f"{exc.ename}: {exc.evalue}".strip(),
            "traceback": "\n".join(tb[-12:]),
        }
    return {"cell": None, "error": f"{type(exc).__name__}: {exc}".strip(), "traceback": ""}


def _snapshot(root: Path, skip: set[Path]) -> dict[str, int]:
    files = {}
    if not root.exists():
        return files
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for f in filenames:
            p = here / f
            if p in skip:
                continue
            try:
                files[p.relative_to(root).as_posix()] = p.stat().st_mtime_ns
            except OSError:
                continue
    return files


def _classify(changed: list[str]) -> dict:
    figures = [f for f in changed if Path(f).suffix.lower() in FIGURE_SUFFIXES]
    results = [f for f in changed if Path(f).suffix.lower() in RESULT_SUFFIXES and "checkpoint" not in f]
    other = len(changed) - len(figures) - len(results)
    return {"figures": figures, "results": results, "other_files": other}


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:.0f} s"


def write_index(build: Path, records: list[dict], profile: str) -> None:
    """build/index.json (everything) and build/index.md (a table linking each output)."""
    (build / "index.json").write_text(json.dumps({"profile": profile, "notebooks": records}, indent=1) + "\n")
    ok = sum(r["status"] == "ok" for r in records)
    lines = [
        "# Course run results",
        "",
        f"Written by `make course` (`scripts/run_notebooks.py`). {ok} of {len(records)} notebooks ran "
        f"without error. Links are relative to this folder.",
        "",
        "| notebook | status | runtime | profile | figures | results | finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        link = lambda f: f"[{Path(f).name}]({f})"  # noqa: E731
        figures = "<br>".join(link(f) for f in r["figures"]) or "-"
        results = "<br>".join(link(f) for f in r["results"]) or "-"
        if r.get("other_files"):
            results += f"<br>(+{r['other_files']} other files)"
        status = "ok" if r["status"] == "ok" else "**FAILED**"
        lines.append(
            f"| [{r['notebook']}]({r['executed']}) | {status} | {_fmt_seconds(r['seconds'])} | {r['profile']} "
            f"| {figures} | {results} | {r['finished']} |"
        )
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            where = f"cell {r['cell']} of the executed copy" if r.get("cell") is not None else "before any cell"
            lines += [f"### {r['notebook']} ({where})", "", "```", r["error"], "", r.get("traceback", ""), "```", ""]
    (build / "index.md").write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebook names or globs (default: all)")
    parser.add_argument("--profile", default="auto", choices=["auto", "ci", "cpu", "gpu"])
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="override a parameter of the notebooks' parameters cell, e.g. -p extra_seeds 4")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per cell (default: none)")
    parser.add_argument("--out", type=Path, default=None, help="executed notebooks folder (default: build/notebooks)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build = build_root()
    build.mkdir(parents=True, exist_ok=True)
    out_dir = (args.out or build / "notebooks").resolve()
    notebooks = discover(args.notebooks)
    if not notebooks:
        print("no notebooks found in notebooks/", file=sys.stderr)
        return 1
    profile = resolve_profile(args.profile)
    params = parse_parameters(args.parameter)
    for path in notebooks:
        unknown = sorted(set(params) - parameter_names(path))
        if unknown:
            raise SystemExit(f"{path.name} has no parameter {', '.join(unknown)} (its parameters cell sets "
                             f"{', '.join(sorted(parameter_names(path)))}): run it without that -p, or alone")
    kernel = ensure_kernel()

    # Keep the entries of notebooks not run this time (a run of a subset), drop those of deleted ones.
    existing = {}
    index_json = build / "index.json"
    if index_json.exists():
        try:
            existing = {r["notebook"]: r for r in json.loads(index_json.read_text())["notebooks"]}
        except (ValueError, KeyError, TypeError):
            existing = {}
    names = {p.name for p in discover()}
    records = {k: v for k, v in existing.items() if k in names}

    skip = {out_dir, build / "jupyter", build / "lock-venv", build / "index.md", index_json}
    failures = 0
    print(f"Running {len(notebooks)} notebook(s) with profile {profile!r}"
          f"{f' and parameters {params}' if params else ''}; executed copies in {out_dir}")
    for i, path in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {path.name} ...", flush=True)
        before = _snapshot(build, skip)
        out_path = out_dir / path.name
        start = time.perf_counter()
        record = {"notebook": path.name, "profile": profile, **({"parameters": params} if params else {})}
        try:
            execute(path, out_path, {"profile": profile, **params}, kernel_name=kernel, timeout=args.timeout,
                    progress=sys.stderr.isatty())
            record.update(status="ok", error=None, cell=None)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next notebook
            failures += 1
            record.update(status="failed", **describe_error(exc))
        seconds = time.perf_counter() - start
        after = _snapshot(build, skip)
        changed = sorted(f for f, m in after.items() if before.get(f) != m)
        record.update(
            seconds=round(seconds, 1),
            executed=os.path.relpath(out_path, build),
            finished=dt.datetime.now().isoformat(timespec="seconds"),
            **_classify(changed),
        )
        records[path.name] = record
        write_index(build, [records[k] for k in sorted(records)], profile)
        verdict = "ok" if record["status"] == "ok" else f"FAILED in cell {record.get('cell')}: {record['error']}"
        print(f"    {verdict} ({_fmt_seconds(seconds)}; {len(record['figures'])} figures, "
              f"{len(record['results'])} result files)", flush=True)

    print(f"\nNotebooks: {len(notebooks) - failures} ok, {failures} failed. Results index: {build / 'index.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
