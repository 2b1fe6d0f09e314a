"""README's troubleshooting table, notebook 11 and notebook 12 in sync: every link lands on a heading, every error
has a row, and the bitsandbytes messages quoted are the ones the pinned libraries raise."""

import json
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "11_troubleshooting.ipynb"
QUANTIZATION = ROOT / "notebooks" / "12_quantization.ipynb"  # where the bitsandbytes errors are shown
TABLE_HEADING = "## Troubleshooting: error messages"
LINK = re.compile(r"\]\(notebooks/(11_troubleshooting|12_quantization)\.ipynb#([^)\s]+)\)")
NOTEBOOK_LINK = re.compile(r"\]\((11_troubleshooting|12_quantization)\.ipynb#([^)\s]+)\)")  # from notebook 11


def heading_anchor(line: str) -> str:
    """The id JupyterLab gives a markdown heading: its rendered text with spaces replaced by '-'."""
    text = line.lstrip("#").strip()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")  # code, bold and italic marks are not part of the text
    return text.replace(" ", "-")


def notebook_headings(path: Path = NOTEBOOK) -> dict[str, str]:
    """{anchor: heading line} for every markdown heading of a notebook (11 by default)."""
    headings = {}
    for cell in json.loads(path.read_text())["cells"]:
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
    assert heading_anchor("## 7. Quantised *and* offloaded: `llm_int8_enable_fp32_cpu_offload`") == (
        "7.-Quantised-and-offloaded:-llm_int8_enable_fp32_cpu_offload")


def summary_rows() -> list[str]:
    """The rows of notebook 11's Summary table (after its header and |---| line)."""
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and source.startswith("## Summary"):
            return [line for line in source.splitlines() if line.startswith("|")][2:]
    raise AssertionError("notebook 11 has no Summary table")


def assert_lands_on_headings(links: list[tuple[str, str]], where: str) -> None:
    headings = {"11_troubleshooting": notebook_headings(NOTEBOOK), "12_quantization": notebook_headings(QUANTIZATION)}
    for notebook, anchor in links:
        assert unquote(anchor) in headings[notebook], (f"{where} links to {notebook}#{anchor}, which is no heading "
                                                       f"of it; its headings: {sorted(headings[notebook])}")


def test_every_row_links_to_a_heading_of_notebook_11_or_12():
    rows = table_rows()
    assert len(rows) >= 12, f"expected a row per error, found {len(rows)}"
    for row in rows:
        links = LINK.findall(row)
        assert links, f"row without a link into notebook 11 or 12: {row}"
        assert_lands_on_headings(links, "README")


def test_notebook_11_summary_links_into_12_land_on_headings_and_match_the_readme():
    links = [link for row in summary_rows() for link in NOTEBOOK_LINK.findall(row)]
    assert any(notebook == "12_quantization" for notebook, _ in links), "11's Summary has no row for notebook 12"
    assert_lands_on_headings(links, "notebook 11's Summary")
    readme = {link for row in table_rows() for link in LINK.findall(row) if link[0] == "12_quantization"}
    assert {link for link in links if link[0] == "12_quantization"} == readme  # the same errors in both tables


def test_every_error_section_has_a_row():
    linked = {unquote(anchor) for row in table_rows() for notebook, anchor in LINK.findall(row)
              if notebook == "11_troubleshooting"}
    sections = [anchor for anchor in notebook_headings() if re.match(r"^\d+\.-", anchor)]
    assert sections, "notebook 11 has no numbered sections"
    missing = [anchor for anchor in sections if anchor not in linked]
    assert not missing, f"sections of notebook 11 without a row in the README's table: {missing}"


# --- the bitsandbytes rows quote what the pinned libraries raise, produced here ------------------------------------

def quoted(text: str) -> list[str]:
    """The `code` spans of a table row (the message column quotes the error in one)."""
    return re.findall(r"`([^`]+)`", text)


def rows_linking_to(anchor_start: str) -> list[str]:
    rows = [row for row in table_rows() + summary_rows() if f"12_quantization.ipynb#{anchor_start}" in row]
    assert len(rows) == 2, f"expected one row in README and one in 11's Summary for 12#{anchor_start}..."
    return rows


def test_nf4_cpu_repacking_error_is_bitsandbytes_own():
    """bitsandbytes 0.50.2 functional.py::_convert_weight_packed_for_cpu on notebook 12's 352-wide down_proj."""
    import bitsandbytes.functional as F
    import pytest
    import torch

    weight = torch.randn(128, 352, dtype=torch.float16)  # 12's odd MLP: down_proj takes 352 = 5.5 x 64 inputs
    packed, state = F.quantize_4bit(weight, quant_type="nf4")
    with pytest.raises(RuntimeError) as error:
        F._convert_weight_packed_for_cpu(packed, state)
    message = f"RuntimeError: {error.value}"
    for row in rows_linking_to("4."):
        assert message in quoted(row), f"the row does not quote {message!r}: {row}"


def test_quantised_modules_on_the_cpu_error_is_transformers_own():
    """transformers 5.24 quantizers/quantizer_bnb_8bit.py and _4bit.py `validate_environment`, with a map that
    sends a quantised module to the CPU (no llm_int8_enable_fp32_cpu_offload)."""
    import pytest
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    messages = []
    for quantizer in (Bnb8BitHfQuantizer(BitsAndBytesConfig(load_in_8bit=True)),
                      Bnb4BitHfQuantizer(BitsAndBytesConfig(load_in_4bit=True))):
        with pytest.raises(ValueError) as error:
            quantizer.validate_environment(device_map={"model": 0, "lm_head": "cpu"})
        messages.append(f"ValueError: {error.value}")
    assert messages[0] == messages[1]
    rows = [row for row in table_rows() + summary_rows() if "Some modules are dispatched" in row]
    assert len(rows) == 2, "expected the error in README's table and in 11's Summary"
    for row in rows:
        spans = [span for span in quoted(row) if "Some modules are dispatched" in span]
        assert spans and all(messages[0].startswith(span.removesuffix(" ...")) for span in spans), row
