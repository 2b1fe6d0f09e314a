"""Render the executed GPU runs of the notebooks as a static site, offline: `make site` (`python tools/build_site.py`).

A reader without a GPU sees what the notebooks print on one: each run is a folder of executed copies,
`data/executed/<run>/NN_slug.ipynb` (kept out of notebooks/, which stays output-free), with a `run.json`
saying where and with what it ran (written by tools/gpu_run.sh). nbconvert, already pinned for the tests, renders
each notebook to HTML with its outputs; links between notebooks are pointed at their rendered pages, and an index
lists every run. Nothing is downloaded: nbconvert's templates and styles come with the package.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "data" / "executed"
SITE = ROOT / "site"
NOTEBOOK_LINK = re.compile(r'href="(\d\d_[a-z0-9_]+)\.ipynb(#[^"]*)?"')
CONTENTS_LINK = re.compile(r'href="\.\./README\.md(#[^"]*)?"')


def runs(executed: Path = EXECUTED) -> list[Path]:
    """Every folder of executed notebooks, in name order."""
    return sorted(p for p in executed.iterdir() if p.is_dir() and any(p.glob("*.ipynb"))) if executed.exists() else []


def run_description(run: Path) -> dict:
    """What `run.json` says of the run (machine, GPUs, versions, date); the folder name where there is none."""
    path = run / "run.json"
    return json.loads(path.read_text()) if path.exists() else {"machine": run.name}


def render_notebook(path: Path) -> str:
    """One executed notebook as a standalone HTML page, its links to other notebooks pointed at their pages."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
    body = NOTEBOOK_LINK.sub(lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', body)
    return CONTENTS_LINK.sub('href="../index.html"', body)


def index_page(described: list[tuple[str, dict, list[str]]]) -> str:
    """The site's front page: one section per run, what it ran on, and links to its notebooks."""
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>The notebooks as executed on GPUs</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.5}"
             "code{background:#f3f3f3;padding:0 .2em}</style></head><body>",
             "<h1>Bigger than your GPU: the notebooks as executed on GPUs</h1>",
             "<p>Each page is a notebook from <code>notebooks/</code> with the outputs of one run on the machine "
             "named below, so that a reader without a GPU can see the GPU path. Rebuilt by <code>make site</code> "
             "from the executed copies in <code>data/executed/</code>.</p>"]
    for name, description, notebooks in described:
        parts.append(f"<h2>{html.escape(name)}</h2><ul>")
        for key, value in description.items():
            parts.append(f"<li><b>{html.escape(str(key))}</b>: {html.escape(str(value))}</li>")
        parts.append("</ul><ol>")
        parts += [f"<li><a href='{html.escape(name)}/{html.escape(nb)}.html'>{html.escape(nb)}</a></li>"
                  for nb in notebooks]
        parts.append("</ol>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build(executed: Path = EXECUTED, site: Path = SITE) -> list[Path]:
    """Render every run under `executed` into `site` (only files this tool writes are replaced); return the pages."""
    written = []
    described = []
    for run in runs(executed):
        notebooks = sorted(run.glob("[0-9][0-9]_*.ipynb"))
        (site / run.name).mkdir(parents=True, exist_ok=True)
        for path in notebooks:
            page = site / run.name / f"{path.stem}.html"
            page.write_text(render_notebook(path))
            written.append(page)
        described.append((run.name, run_description(run), [p.stem for p in notebooks]))
    site.mkdir(parents=True, exist_ok=True)
    (site / "index.html").write_text(index_page(described))
    return [site / "index.html", *written]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executed", type=Path, default=EXECUTED, help="folder of runs (default: data/executed)")
    parser.add_argument("--site", type=Path, default=SITE, help="where the pages go (default: site/)")
    args = parser.parse_args()
    pages = build(args.executed, args.site)
    print(f"wrote {len(pages)} pages under {args.site}")


if __name__ == "__main__":
    main()
