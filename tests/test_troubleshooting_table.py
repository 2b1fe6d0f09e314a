"""README's troubleshooting table and notebook 11 in sync: every link lands on a heading, every error has a row."""

import json
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "11_troubleshooting.ipynb"
TABLE_HEADING = "## Troubleshooting: error messages"
LINK = re.compile(r"\]\(notebooks/11_troubleshooting\.ipynb#([^)\s]+)\)")


def heading_anchor(line: str) -> str:
    """The id JupyterLab gives a markdown heading: its rendered text with spaces replaced by '-'."""
    text = line.lstrip("#").strip()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = text.replace("`", "").replace("**", "")  # code and bold marks are not part of the text
    return text.replace(" ", "-")


def notebook_headings() -> dict[str, str]:
    """{anchor: heading line} for every markdown heading of notebook 11."""
    headings = {}
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if re.match(r"^#{1,6} ", line):
                    headings[heading_anchor(line)] = line
    return headings


def troubleshooting_section() -> str:
    readme = (ROOT / "README.md").read_text()
    assert TABLE_HEADING in readme, f"README has no {TABLE_HEADING!r} section"
    section = readme.split(TABLE_HEADING, 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]


def table_rows() -> list[str]:
    rows = [line for line in troubleshooting_section().splitlines() if line.startswith("|")]
    assert rows and "message you see" in rows[0], "the table's header row is missing"
    return rows[2:]  # after the header and its |---| line


def test_anchor_follows_jupyterlab():
    anchor = heading_anchor("## 2. Cannot copy out of meta tensor; no data!")
    assert anchor == "2.-Cannot-copy-out-of-meta-tensor;-no-data!"
    assert heading_anchor("## 3. pass along an `offload_folder`") == "3.-pass-along-an-offload_folder"


def test_every_row_links_to_a_heading_of_notebook_11():
    headings = notebook_headings()
    rows = table_rows()
    assert len(rows) >= 10, f"expected a row per error, found {len(rows)}"
    for row in rows:
        anchors = LINK.findall(row)
        assert anchors, f"row without a link into notebook 11: {row}"
        for anchor in anchors:
            assert unquote(anchor) in headings, (f"README links to #{anchor}, which is no heading of {NOTEBOOK.name}; "
                                                 f"its headings: {sorted(headings)}")


def test_every_error_section_has_a_row():
    linked = {unquote(anchor) for row in table_rows() for anchor in LINK.findall(row)}
    sections = [anchor for anchor in notebook_headings() if re.match(r"^\d+\.-", anchor)]
    assert sections, "notebook 11 has no numbered sections"
    missing = [anchor for anchor in sections if anchor not in linked]
    assert not missing, f"sections of notebook 11 without a row in the README's table: {missing}"
