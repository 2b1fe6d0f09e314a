"""Every notebook runs twice in the same kernel (a presenter re-runs cells) and leaves nothing behind.

nbmake (see `make test`) runs each notebook once on a fresh kernel; this test runs all of its cells
a second time in that same kernel, and checks that the repository's tracked and untracked files
are unchanged: the notebooks write only into the git-ignored cache.
"""

import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def repository_state() -> str:
    """Paths git sees as changed or untracked (ignored files, such as the cache, are not listed)."""
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_twice_in_one_kernel_and_writes_only_its_cache(path):
    before = repository_state()
    nb = nbformat.read(path, as_version=4)
    nb.cells = nb.cells + [nbformat.from_dict(dict(cell)) for cell in nb.cells]
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [(i, o["ename"]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"
              and "raises-exception" not in c.metadata.get("tags", [])]
    assert not errors, f"unexpected errors in cells {errors}"
    assert repository_state() == before, "the notebook wrote files outside the git-ignored cache"
