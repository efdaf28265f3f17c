#!/usr/bin/env python
"""Write the "Open in Colab" badges and the setup cell, from ``rlcourse/colab.py``, into every
notebook and lesson.

    python scripts/stamp_colab.py           # rewrite what has drifted, print what changed
    python scripts/stamp_colab.py --check   # change nothing; exit 1 if anything would change

For each ``notebooks/NN_slug.ipynb``:
- cell 0 (markdown) gets ``rlcourse.colab.badge("NN_slug.ipynb")``: an existing Colab badge is
  replaced, otherwise the badge goes under the first heading (a title cell is added if cell 0 is not
  markdown);
- cell 1 becomes the code cell ``rlcourse.colab.setup_cell_source()``: an existing setup cell (tagged
  ``setup`` or starting with ``# Setup``) is replaced, otherwise one is inserted.
For each lesson ``course/<chapter>/NN_slug.md`` the badge of its notebook is stamped the same way.

Running it twice changes nothing the second time (``tests/test_repo.py`` checks this). Files that
need no change are not rewritten.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADGE_RE = re.compile(
    r"\[!\[Open in Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]\([^)\s]*\)"
)
LESSON_RE = re.compile(r"^\d\d_[\w-]+\.md$")
SETUP_TAG = "setup"


def _colab():
    """rlcourse/colab.py, loaded on its own (no need for the package's dependencies)."""
    spec = importlib.util.spec_from_file_location("_rlcourse_colab", ROOT / "rlcourse" / "colab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stamp_badge(text: str, badge: str) -> str:
    """``text`` with every Colab badge replaced by ``badge``, or ``badge`` added under the first heading."""
    if BADGE_RE.search(text):
        return BADGE_RE.sub(lambda _: badge, text)
    lines = text.split("\n")
    heading = next((i for i, line in enumerate(lines) if line.lstrip().startswith("#")), None)
    if heading is None:
        return f"{badge}\n\n{text}" if text.strip() else badge
    insert = ["", badge]
    if heading + 1 < len(lines) and lines[heading + 1].strip():
        insert.append("")
    lines[heading + 1 : heading + 1] = insert
    return "\n".join(lines)


def _is_setup_cell(cell) -> bool:
    if cell.get("cell_type") != "code":
        return False
    tags = cell.get("metadata", {}).get("tags", [])
    return SETUP_TAG in tags or cell.get("source", "").lstrip().startswith("# Setup")


def _new_cell(nb, kind: str, source: str, wanted_id: str):
    import nbformat

    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cell = make(source)
    if nb.get("nbformat_minor", 0) >= 5:
        taken = {c.get("id") for c in nb.cells}
        if wanted_id not in taken:
            cell["id"] = wanted_id
    else:
        cell.pop("id", None)
    return cell


def stamp_notebook(path: Path, check: bool = False) -> bool:
    """Stamp one notebook; True if it changed (or would change, with ``check``)."""
    import nbformat

    colab = _colab()
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    cells = nb.cells
    badge = colab.badge(path.name)

    if not cells or cells[0].cell_type != "markdown":
        title = path.stem.split("_", 1)[-1].replace("-", " ")
        cells.insert(0, _new_cell(nb, "markdown", f"# {title}\n\n{badge}", "title"))
    else:
        cells[0].source = stamp_badge(cells[0].source, badge)

    setup = colab.setup_cell_source()
    if len(cells) > 1 and _is_setup_cell(cells[1]):
        cells[1].source = setup
    else:
        cells.insert(1, _new_cell(nb, "code", setup, "colab-setup"))

    after = nbformat.writes(nb)
    if after == before:
        return False
    if not check:
        path.write_text(after if after.endswith("\n") else after + "\n", encoding="utf-8")
    return True


def stamp_lesson(path: Path, check: bool = False) -> bool:
    """Stamp one lesson ``NN_slug.md`` with its notebook's badge; True if it changed."""
    colab = _colab()
    text = path.read_text(encoding="utf-8")
    new = stamp_badge(text, colab.badge(path.stem + ".ipynb"))
    if new == text:
        return False
    if not check:
        path.write_text(new, encoding="utf-8")
    return True


def lessons(root: Path) -> list[Path]:
    return sorted(p for p in (root / "course").glob("*/*.md") if LESSON_RE.match(p.name))


def stamp(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Stamp every notebook and lesson under ``root``; the files that changed (or would)."""
    changed = [p for p in sorted((root / "notebooks").glob("*.ipynb")) if stamp_notebook(p, check)]
    changed += [p for p in lessons(root) if stamp_lesson(p, check)]
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    changed = stamp(args.root.resolve(), check=args.check)
    verb = "would change" if args.check else "stamped"
    for p in changed:
        print(f"{verb}: {p.relative_to(args.root.resolve())}")
    if not changed:
        print("all notebooks and lessons are up to date")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
