"""Your own model: notebooks 05, 07 and 09 with BIGMODEL_CHECKPOINT set to the checkpoints people bring.

Every committed architecture (`helpers.models.OTHER_ARCHITECTURES`, their published config.json values) is scaled
down by the checkpoint factory with its proportions kept, and each notebook is run top to bottom on it: it must
finish (its own cells assert the dispatched logits and tokens equal the in-memory model's), or stop at its first
cells with `CannotTeach`'s message. One architecture runs each notebook twice in one kernel, as a reader re-runs
cells. Also: the issue's tied-embedding Qwen2 (the model that sent everything to disk), an unsharded save_pretrained
folder, a hub id served offline from a hub cache, and a hub id that is not cached (a message, no traceback).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from helpers.checkpoints import architecture_checkpoint, make_checkpoint
from helpers.models import OTHER_ARCHITECTURES, load_config
from helpers.paths import CACHE_ENV, cache_dir

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
OWN_MODEL_NOTEBOOKS = ("05_dispatch.ipynb", "07_from_pretrained_and_the_hub.ipynb", "09_capstone_70b_on_a100.ipynb")
#: The model of issue 17: Qwen2 saved by save_pretrained, 8 layers, hidden 512, a tied 32000-word embedding (42% of
#: the weights), 6 safetensors shards, 147 MiB. At model / 3.449 every block went to disk.
ISSUE_QWEN2 = dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000, bos_token_id=1, eos_token_id=2)


def run_notebook(name: str, env: dict[str, str], cache: Path, times: int = 1) -> nbformat.NotebookNode:
    """Execute notebooks/`name` as Run All does (it stops at the first error) with extra environment variables,
    `times` times in one kernel; return it with the outputs of the cells that ran (in the last run).

    The run gets a cache of its own (`cache`, with the suite's checkpoints linked in), so that its offload folders
    never meet those of a run beside it (pytest-xdist runs tests, and nbmake the default notebooks, side by side).
    """
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "checkpoints").symlink_to(cache_dir("checkpoints"), target_is_directory=True)
    env = {**env, CACHE_ENV: str(cache)}
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        with client.setup_kernel(env={**os.environ, **env}):
            for _ in range(times):
                for index, cell in enumerate(nb.cells):
                    client.execute_cell(cell, index)
    except CellExecutionError:
        pass  # the error is in the failing cell's outputs, which the tests read
    return nb


def errors_of(nb: nbformat.NotebookNode) -> list[tuple[int, str, str]]:
    """(cell index, exception name, message) of every unexpected error (cells tagged raises-exception excepted)."""
    return [(i, out["ename"], out["evalue"][:500]) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            and "raises-exception" not in cell.metadata.get("tags", [])
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def text_of(nb: nbformat.NotebookNode) -> str:
    return "\n".join(out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))
                     + "".join(out.get("data", {}).get("text/markdown", ""))
                     for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))


def assert_finished_or_stopped_clearly(nb: nbformat.NotebookNode) -> None:
    errors = errors_of(nb)
    if not errors:
        return
    first_code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"][:4]
    index, name, message = errors[0]
    assert name == "CannotTeach" and index in first_code and len(errors) == 1, errors[:5]


#: The architecture that the run-twice test runs (twice, so it is left out of the single runs).
RUN_TWICE = "gemma-2-2b"


@pytest.mark.parametrize("notebook", OWN_MODEL_NOTEBOOKS)
@pytest.mark.parametrize("architecture", [name for name in OTHER_ARCHITECTURES if name != RUN_TWICE])
def test_notebook_runs_on_the_architecture(architecture, notebook, tmp_path):
    checkpoint = architecture_checkpoint(architecture)
    nb = run_notebook(notebook, {"BIGMODEL_CHECKPOINT": str(checkpoint.folder)}, tmp_path / "cache")
    assert not errors_of(nb), errors_of(nb)[:5]
    assert str(checkpoint.folder) in text_of(nb) or checkpoint.folder.name in text_of(nb)


@pytest.mark.parametrize("notebook", OWN_MODEL_NOTEBOOKS)
def test_runs_twice_in_one_kernel_on_an_own_model(notebook, tmp_path):
    """A reader re-runs cells: with a setting, as without, a second Run All in the same kernel must pass."""
    checkpoint = architecture_checkpoint(RUN_TWICE)
    nb = run_notebook(notebook, {"BIGMODEL_CHECKPOINT": str(checkpoint.folder)}, tmp_path / "cache", times=2)
    assert not errors_of(nb), errors_of(nb)[:5]
    assert str(checkpoint.folder) in text_of(nb) or checkpoint.folder.name in text_of(nb)


def test_issue_tied_qwen2_runs_05_to_the_end(tmp_path):
    config = load_config("qwen2.5-0.5b", **ISSUE_QWEN2)
    config._name_or_path = "issue-17-qwen2"
    checkpoint = make_checkpoint(config, max_shard_size="20MB")
    assert len(checkpoint.shards) == 6 and round(checkpoint.total_size / 2**20) == 147
    nb = run_notebook("05_dispatch.ipynb", {"BIGMODEL_CHECKPOINT": str(checkpoint.folder)}, tmp_path / "cache")
    assert not errors_of(nb), errors_of(nb)[:5]
    assert "raised from the virtual A100" in text_of(nb)


@pytest.mark.parametrize("notebook", OWN_MODEL_NOTEBOOKS)
def test_an_unsharded_save_pretrained_folder_runs(tmp_path, notebook):
    """What save_pretrained writes for a small model: one model.safetensors, no index (a tied GPT-2 here)."""
    from transformers import AutoModelForCausalLM

    from helpers.models import scaled_config

    model = AutoModelForCausalLM.from_config(scaled_config("gpt2"))
    model.save_pretrained(tmp_path / "my-gpt2")
    assert [p.name for p in (tmp_path / "my-gpt2").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "my-gpt2" / "model.safetensors.index.json").exists()
    nb = run_notebook(notebook, {"BIGMODEL_CHECKPOINT": str(tmp_path / "my-gpt2")}, tmp_path / "cache")
    assert not errors_of(nb), errors_of(nb)[:5]


def test_a_cached_hub_id_runs_offline(tmp_path):
    from helpers.hub import publish_to_local_cache

    checkpoint = architecture_checkpoint("qwen2.5-0.5b")
    publish_to_local_cache(checkpoint.folder, "someone/scaled-qwen", cache_dir=tmp_path / "hub", link=True)
    nb = run_notebook("05_dispatch.ipynb", {"BIGMODEL_CHECKPOINT": "someone/scaled-qwen", "HF_HUB_OFFLINE": "1",
                                            "HF_HUB_CACHE": str(tmp_path / "hub")}, tmp_path / "cache")
    assert not errors_of(nb), errors_of(nb)[:5]
    assert "your hub cache (offline)" in text_of(nb)


@pytest.mark.parametrize("notebook", OWN_MODEL_NOTEBOOKS)
def test_an_uncached_hub_id_offline_says_so_without_a_traceback(tmp_path, notebook):
    nb = run_notebook(notebook, {"BIGMODEL_CHECKPOINT": "someone/not-downloaded", "HF_HUB_OFFLINE": "1",
                                 "HF_HUB_CACHE": str(tmp_path / "empty-hub")}, tmp_path / "cache")
    errors = errors_of(nb)
    assert len(errors) == 1 and errors[0][1] == "CannotTeach", errors
    assert "is not in your hub cache" in errors[0][2] and "hf download someone/not-downloaded" in errors[0][2]
    shown = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert len(shown[0]["traceback"]) == 1 and "Traceback" not in shown[0]["traceback"][0]  # the message alone
