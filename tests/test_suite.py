"""Suite-level checks: notebooks committed clean, named and ordered, navigation generated, README in sync."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import navigation  # noqa: E402

NOTEBOOKS = navigation.ordered_notebooks()
README = (ROOT / "README.md").read_text()


def cells(path):
    return json.loads(path.read_text())["cells"]


def text(cell):
    return "".join(cell["source"])


def test_notebooks_exist_and_are_numbered_in_order():
    names = [p.name for p in NOTEBOOKS]
    assert names, "no notebooks found"
    numbers = [int(n[:2]) for n in names]
    # 00 is the presenter's ten-minute demo; the chapters run 01, 02, ... with no gap
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and numbers[0] in (0, 1), (
        f"gap or duplicate in numbering: {names}")
    strays = [p.name for p in (ROOT / "notebooks").glob("*.ipynb") if p not in NOTEBOOKS]
    assert not strays, f"notebooks not named NN_slug.ipynb: {strays}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.parametrize("i", range(len(NOTEBOOKS)), ids=[p.name for p in NOTEBOOKS])
def test_navigation_cells_are_generated_and_current(i):
    path = NOTEBOOKS[i]
    expected = navigation.navigation_source(NOTEBOOKS, i)
    nb_cells = cells(path)
    assert text(nb_cells[0]) == expected and text(nb_cells[-1]) == expected, (
        f"{path.name}: navigation is stale; run `python tools/navigation.py`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_house_style(path):
    body = "\n".join(text(c) for c in cells(path) if c["cell_type"] == "markdown")
    assert re.search(rf"^# {path.name[:2]} · ", body, flags=re.M), "title '# NN · ...' missing"
    for heading in ("What you will learn", "Runs in", "On a GPU", "## Summary", "## Exercises", "**Next"):
        assert heading in body, f"{path.name}: missing {heading!r}"
    code = [text(c) for c in cells(path) if c["cell_type"] == "code"]
    assert any("assert" in c for c in code), f"{path.name}: no claim is asserted"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_table_lists_every_notebook(path):
    assert f"notebooks/{path.name}" in README, f"README's notebook table lacks {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_readme_states_the_cards_run_time(path):
    """The README's "CPU time" column says what the notebook's own card says (one reference time, not two)."""
    card = next(text(c) for c in cells(path) if "**Runs in**" in text(c))
    seconds = re.search(r"\*\*Runs in\*\* \| about (\d+) s", card)
    assert seconds, f"{path.name}: the card's 'Runs in' row should start 'about N s'"
    row = re.search(rf"\(notebooks/{re.escape(path.name)}\) \|[^\n]*?\| ~(\d+) s \|", README)
    assert row and row.group(1) == seconds.group(1), (path.name, seconds.group(1), row and row.group(1))


def test_readme_links_point_to_existing_files():
    for target in re.findall(r"\]\(((?:notebooks|helpers|tests|data|benchmarks|tools)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^make [a-z-]+$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    assert commands, ".ci/run calls no make target"
    for command in commands:
        assert f"{command}  " in README or f"{command}\n" in README, f"the README does not state `{command}`"


def test_code_is_tidy():
    """ruff (pinned in requirements.txt) finds nothing in the library, the tests and the tools."""
    import shutil
    import subprocess

    ruff = Path(sys.executable).with_name("ruff")
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    result = subprocess.run([ruff, "check", "helpers", "tests", "tools"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_capstone_numbers_are_the_committed_run():
    """The README's full-scale numbers for 09 are those of data/results/capstone-70b-nvidia-h200.json."""
    import json

    run = json.loads((ROOT / "data" / "results" / "capstone-70b-nvidia-h200.json").read_text())
    batch = {row["batch"]: row for row in run["streamer_batches"] if "error" not in row}
    typed = (f"{run['placement']['gpu_layers']} decoder layers on the GPU and {run['placement']['cpu_layers']} in RAM, "
             f"accelerate {run['accelerate']['seconds']:.1f} s/token, the streamer {run['streamer']['seconds']:.2f} "
             f"s/token at its bound, the same greedy tokens, batch 64 giving "
             f"{batch[64]['tokens_per_second'] / batch[1]['tokens_per_second']:.0f}x the tokens/s of batch 1")
    assert typed in README, typed
    assert run["accelerate"]["tokens"] == run["streamer"]["tokens"]
    assert run["summary"]["checks"]["streamer_within_1.1x_of_bound"]

