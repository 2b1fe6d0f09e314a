"""benchmarks/capstone_70b.py: the --tiny smoke run writes every field notebook 09 reads, and the pieces hold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import capstone_70b  # noqa: E402
from helpers import streaming  # noqa: E402
from helpers.models import load_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("capstone") / "capstone-tiny.json"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "capstone_70b.py"), "--tiny", "--out",
                                str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def test_tiny_run_writes_the_fields_09_reads(tiny_run):
    results, stdout = tiny_run
    for key in ("card", "slug", "date", "versions", "host", "model", "settings", "definitions", "plan_09",
                "placement", "budget", "weights_seconds", "host_buffer_bytes", "bandwidth", "accelerate", "streamer",
                "streamer_batches", "resident_batches", "summary", "wall_seconds", "peak_host_rss"):
        assert key in results, key
    for key in ("torch", "transformers", "accelerate"):
        assert results["versions"][key]
    placement = results["placement"]
    assert placement["gpu_layers"] + placement["cpu_layers"] == results["model"]["num_hidden_layers"]
    assert placement["offloaded_bytes"] == placement["cpu_layers"] * placement["layer_bytes"]
    # one host copy of the offloaded layers, exactly
    assert results["host_buffer_bytes"] == placement["offloaded_bytes"]
    acc = results["accelerate"]
    assert acc["seconds"] > 0 and len(acc["tokens"][0]) == capstone_70b.NEW_TOKENS
    assert [row["batch"] for row in results["resident_batches"]] == list(capstone_70b.BATCHES)
    assert all(row["tokens_per_second"] > 0 for row in results["resident_batches"])
    summary = results["summary"]
    assert summary["accelerate_seconds"] == acc["seconds"]
    if torch.cuda.is_available():
        assert summary["tokens_equal"] and "predictions_09" in summary and "bound_seconds" in summary
    else:
        assert "skipped" in results["streamer"] and "skipped" in results["bandwidth"]
    assert "wrote" in stdout


def test_weights_are_views_into_one_host_buffer_and_deterministic():
    config = capstone_70b.model_config(tiny=True)
    placement = streaming.split_placement(config.num_hidden_layers, cpu=3)
    runs = []
    for _ in range(2):
        model = capstone_70b.skeleton(config)
        layout = streaming.layer_layout(model.model.layers[0])
        host = capstone_70b.build_weights(model, placement, layout, torch.device("cpu"))
        start = host.data_ptr()
        for k, i in enumerate(sorted(placement)):
            for p in model.model.layers[i].parameters():  # every offloaded parameter lives inside its slice
                assert start + k * layout.nbytes <= p.data_ptr() < start + (k + 1) * layout.nbytes
        assert host.data_ptr() % streaming.PAGE == 0
        norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
        assert all(bool((p == 1).all()) for p in norms)
        runs.append(torch.cat([p.detach().flatten().float() for n, p in model.named_parameters()
                               if not n.endswith("norm.weight")]))
    assert torch.equal(runs[0], runs[1])  # the same seed, the same weights
    assert 0.015 < float(runs[0].std()) < 0.025


def test_max_batch_formula():
    config = capstone_70b.model_config(tiny=False)
    batch, formula = capstone_70b.max_batch(config, 10 * 10**9, 20)
    per_sequence = 2 * 80 * 20 * 8 * 128 * 2  # the KV cache alone: an upper limit on the batch
    assert 0 < batch < 0.9 * 10 * 10**9 / per_sequence
    assert str(batch) in formula


# --- notebook 09, section 7: the decision table renders with and without a committed quantisation speed result ---

#: A result as benchmarks/quantization_speed.py writes it (its fields, plausible numbers), for the state that the
#: committed data/results/ does not show.
FAKE_SPEED = {"card": "NVIDIA H200", "slug": "nvidia-h200", "date": "2026-11-29", "model": "llama-2-7b",
              "parameters": 6_738_415_616, "versions": {"bitsandbytes": "0.50.2"},
              "loads": {"float16": {"stored_bytes": 13_476_831_232}, "int8": {"stored_bytes": 7_004_553_216},
                        "nf4": {"stored_bytes": 3_898_667_008}},
              "runs": [{"format": fmt, "batch_size": batch, "prompt_tokens": 32, "new_tokens": 64, "tokens_per_s": tps}
                       for fmt, batch, tps in (("float16", 1, 250.0), ("float16", 32, 6000.0), ("int8", 1, 20.0),
                                               ("int8", 32, 500.0), ("nf4", 1, 80.0), ("nf4", 32, 1500.0))]}


def run_09_with(preamble: str, cache: Path) -> str:
    """Run notebook 09 top to bottom after `preamble` (a cell of its own, first) in one kernel, with a cache of its own
    that links the suite's checkpoints (its offload folders never meet those of nbmake's run beside it); return the
    text of every output. Raises CellExecutionError at the first failing cell."""
    import os

    import nbformat
    from nbclient import NotebookClient

    from helpers.paths import CACHE_ENV, cache_dir

    cache.mkdir(parents=True)
    (cache / "checkpoints").symlink_to(cache_dir("checkpoints"), target_is_directory=True)
    nb = nbformat.read(ROOT / "notebooks" / "09_capstone_70b_on_a100.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(preamble))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    with client.setup_kernel(env={**os.environ, CACHE_ENV: str(cache)}):
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    return "\n".join(out.get("text", "") + "".join(out.get("data", {}).get("text/markdown", ""))
                     for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))


def test_09_decision_renders_the_state_data_results_does_not_have(tmp_path):
    """nbmake runs 09 on the committed results; this runs it with the other state of the quantisation speed."""
    from helpers.models import meta_model
    from helpers.paths import RESULTS_DIR
    from helpers.quantization import card_memory_bandwidth, load_speed_results, predict_footprint

    committed = [r for r in load_speed_results(RESULTS_DIR) if card_memory_bandwidth(r["card"])]
    fake = [] if committed else [FAKE_SPEED]
    text = run_09_with("import helpers.quantization as q\n"  # the notebook imports load_speed_results after this
                       f"q.load_speed_results = lambda folder: {fake!r}", tmp_path / "cache")
    if not fake:
        assert "**Not yet measured**" in text and "not yet decided by a measurement" in text
        assert text.count("| not yet measured (memory floor ") == 2  # int8 and NF4, each with the planner's floor
        return
    assert "Not yet measured" not in text and "not yet measured" not in text
    nf4 = predict_footprint(meta_model(load_config("llama-2-70b")), "nf4").total
    expected = 1 / 80.0 * nf4 / 3_898_667_008 * 4.8e12 / 2.039e12  # s/step: x stored bytes x bandwidth ratio
    assert f"{expected:.3f} (estimate; memory floor " in text
    assert "**Chat latency: NF4 resident**" in text and "quantization-nvidia-h200.json" in text
