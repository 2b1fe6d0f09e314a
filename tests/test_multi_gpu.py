"""helpers.multi_gpu: a layer-wise split traced block by block (on the CPU the planned GPUs are stand-ins)."""

import json

import pytest
import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from helpers import multi_gpu
from helpers.device_maps import plan_device_map
from helpers.models import load_config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=500)
INPUT = torch.arange(1, 9)[None]


def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load_config("llama-2-70b", **TINY), dtype=torch.float32).eval()


def two_gpu_plan(model):
    """device_map="auto" over two planned GPUs that could each hold the whole model: an even split."""
    return plan_device_map(model, {0: 2**30, 1: 2**30, "cpu": 2**30}, "auto", model._no_split_modules)


def test_pipeline_efficiency_is_one_over_n_for_one_request():
    assert multi_gpu.pipeline_efficiency(4, 1) == 0.25
    assert multi_gpu.pipeline_efficiency(2, 1) == 0.5
    assert multi_gpu.pipeline_efficiency(4, 27) == pytest.approx(0.9)
    assert multi_gpu.pipeline_efficiency(1, 5) == 1.0


def test_run_devices_uses_the_plan_only_when_every_planned_gpu_exists():
    plan = {"a": 0, "b": 1}
    run = multi_gpu.run_devices(plan)
    if torch.cuda.device_count() >= 2:
        assert run == plan
    else:
        assert set(run.values()) == {0 if torch.cuda.is_available() else "cpu"}


def test_a_traced_split_runs_one_device_at_a_time_and_computes_the_same():
    model = tiny_model()
    with torch.no_grad():
        expected = model(INPUT).logits
    plan = two_gpu_plan(model)
    assert set(plan.values()) == {0, 1}
    model, timeline = multi_gpu.trace_split(model, plan, INPUT)
    with torch.no_grad():
        assert torch.allclose(model(INPUT).logits.cpu(), expected, atol=1e-4)
    assert {r.block for r in timeline.runs} == set(plan)
    assert timeline.devices == [0, 1]
    assert not timeline.overlaps()
    assert sum(timeline.busy(d) for d in timeline.devices) <= timeline.span + 1e-9
    assert all(0 < timeline.utilisation(d) < 1 for d in timeline.devices)
    assert timeline.handoffs() >= 1
    assert timeline.really_split == (torch.cuda.device_count() >= 2)
    if not timeline.really_split:
        assert {r.ran_on for r in timeline.runs} == {"cuda:0" if torch.cuda.is_available() else "cpu"}
    assert "GPU 0" in repr(timeline) and "share of the pass" in repr(timeline)
    again = multi_gpu.PipelineTimeline.from_dict(json.loads(json.dumps(timeline.to_dict())))
    assert again == timeline
    figure = multi_gpu.plot_pipeline_timeline(timeline)
    assert isinstance(figure, Figure)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == (["GPU 0", "GPU 1"] if timeline.really_split else ["GPU 0 (planned)", "GPU 1 (planned)"])


def test_time_forward_is_the_best_of_several():
    model = tiny_model()
    assert 0 < multi_gpu.time_forward(model, INPUT, repeats=2) < 10


def test_committed_results_are_read_with_their_file_name(tmp_path):
    assert multi_gpu.load_multi_gpu_results(tmp_path) == []
    (tmp_path / "multi-gpu-some-card-x2.json").write_text(json.dumps({"card": "Some card", "n_gpus": 2}))
    (tmp_path / "other.json").write_text("{}")
    assert multi_gpu.load_multi_gpu_results(tmp_path) == [{"card": "Some card", "n_gpus": 2,
                                                           "file": "multi-gpu-some-card-x2.json"}]


@pytest.mark.gpu
def test_on_two_gpus_the_blocks_run_on_their_planned_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = tiny_model()
    plan = two_gpu_plan(model)
    _, timeline = multi_gpu.trace_split(model, plan, INPUT)
    assert timeline.really_split
    assert {r.ran_on for r in timeline.runs} == {"cuda:0", "cuda:1"}
    assert not timeline.overlaps()


def synthetic_result(n_gpus: int) -> dict:
    """What benchmarks/multi_gpu_pipeline.py writes, for n_gpus GPUs taking turns (two blocks each, 1 ms apiece)."""
    runs = [{"block": f"model.layers.{i}", "planned": i // 2, "ran_on": f"cuda:{i // 2}", "start": i * 1e-3,
             "end": (i + 1) * 1e-3} for i in range(2 * n_gpus)]
    return {"card": "Some GPU", "n_gpus": n_gpus, "date": "2026-11-29", "timeline": {"runs": runs},
            "seconds_per_forward": {f"split over {n_gpus} GPUs": 2.2e-3 * n_gpus, "one GPU": 2e-3 * n_gpus},
            "device_map": {}, "overlapping_blocks": 0}


@pytest.mark.parametrize("n_gpus", [2, 4])
def test_a_committed_result_file_is_read_summarised_and_plotted(tmp_path, n_gpus):
    (tmp_path / f"multi-gpu-some-gpu-x{n_gpus}.json").write_text(json.dumps(synthetic_result(n_gpus)))
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text("{}")  # another benchmark's file: not read
    [data] = multi_gpu.load_multi_gpu_results(tmp_path)
    result = multi_gpu.MultiGpuResult.from_dict(data)
    assert (result.file, result.card, result.n_gpus) == (f"multi-gpu-some-gpu-x{n_gpus}.json", "Some GPU", n_gpus)
    assert result.ratio == pytest.approx(1.1)
    assert result.timeline.really_split and result.timeline.devices == list(range(n_gpus))
    assert result.mean_utilisation == pytest.approx(1 / n_gpus)
    assert f"{n_gpus} x Some GPU" in repr(result) and "1.10x" in repr(result)
    figure = multi_gpu.plot_multi_gpu_results([result])
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert figure.axes[0].get_yticklabels()[0].get_text().startswith(f"{n_gpus} x Some GPU")


def test_runs_on_two_and_four_gpus_are_plotted_together(tmp_path):
    for n in (4, 2):
        (tmp_path / f"multi-gpu-some-gpu-x{n}.json").write_text(json.dumps(synthetic_result(n)))
    results = [multi_gpu.MultiGpuResult.from_dict(d) for d in multi_gpu.load_multi_gpu_results(tmp_path)]
    assert sorted(r.n_gpus for r in results) == [2, 4]
    figure = multi_gpu.plot_multi_gpu_results(results)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert [label.split(" x ")[0] for label in labels] == ["2", "4"]
