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
