"""tools/build_site.py: the executed GPU runs rendered offline as pages that keep their outputs and their links."""

import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_site  # noqa: E402


def executed_copy(folder: Path, name: str, printed: str) -> None:
    nb = nbformat.v4.new_notebook()
    links = "[Next](02_state_dict.ipynb#Summary) | [Contents](../README.md#the-notebooks)"
    nb.cells = [nbformat.v4.new_markdown_cell(links),
                nbformat.v4.new_code_cell("print('x')", execution_count=1,
                                          outputs=[nbformat.v4.new_output("stream", name="stdout", text=printed)])]
    nbformat.write(nb, folder / name)


def test_runs_are_rendered_with_outputs_links_and_an_index(tmp_path):
    run = tmp_path / "executed" / "nvidia-h200"
    run.mkdir(parents=True)
    executed_copy(run, "01_memory_math.ipynb", "GPU: NVIDIA H200, 143,156 MiB as CUDA reports it")
    (run / "run.json").write_text(json.dumps({"machine": "1 x NVIDIA H200", "torch": "2.11.0+cu130"}))
    pages = build_site.build(tmp_path / "executed", tmp_path / "site")
    page = (tmp_path / "site" / "nvidia-h200" / "01_memory_math.html").read_text()
    assert "143,156 MiB as CUDA reports it" in page, "the run's output is on the page"
    assert 'href="02_state_dict.html#Summary"' in page and 'href="../index.html"' in page
    index = (tmp_path / "site" / "index.html").read_text()
    assert "nvidia-h200/01_memory_math.html" in index and "2.11.0+cu130" in index
    assert len(pages) == 2


def test_nothing_to_render_gives_an_index_that_says_so(tmp_path):
    pages = build_site.build(tmp_path / "missing", tmp_path / "site")
    assert pages == [tmp_path / "site" / "index.html"]
