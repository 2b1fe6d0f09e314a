"""Unit tests for helpers.device_maps and the device-map explorer: summaries, plans, drawings, offload folders."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import infer_auto_device_map
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from helpers.device_maps import (
    STRATEGIES,
    BudgetError,
    check_budget,
    device_label,
    device_map_for_budgets,
    device_of,
    device_order,
    draw_device_map,
    draw_device_maps,
    layer_index,
    plan_device_map,
    read_offload_folder,
    summarize_device_map,
)
from helpers.memory import MiB
from helpers.models import load_config, replica_config, virtual_a100
from helpers.paths import offload_dir
from helpers.widgets import (
    DEVICE_MAP_APP_CLASS,
    DEVICE_MAP_DESCRIPTIONS,
    DEVICE_MAP_PLAN_CLASS,
    DEVICE_MAP_STRIP_CLASS,
    device_map_explorer,
)

H, INTER, V, LAYERS = 64, 128, 1000, 4  # a tiny Llama: hidden, intermediate, vocabulary, decoder layers
LAYER_PARAMS = 4 * H * H + 3 * H * INTER + 2 * H  # q, k, v, o (4 KV heads = full attention); gate, up, down; 2 norms


@pytest.fixture(scope="module")
def tiny():
    config = load_config("demo-llama-220m", hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=V)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module")
def replica():
    config = replica_config()
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32), virtual_a100(config)


def hand_made_map():
    return {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
            "model.layers.2.self_attn": "cpu", "model.layers.2.mlp": "disk", "model.layers.2.input_layernorm": "disk",
            "model.layers.2.post_attention_layernorm": "disk", "model.layers.3": "disk", "model.norm": "disk",
            "model.rotary_emb": "disk", "lm_head": "disk"}


def test_names_labels_and_order():
    assert [device_label(d) for d in (0, 3, "cpu", "disk")] == ["GPU 0", "GPU 3", "CPU", "disk"]
    assert device_order(["disk", "cpu", 1, 0, "cpu"]) == [0, 1, "cpu", "disk"]
    assert layer_index("model.layers.12") == 12 and layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("model.embed_tokens") is None and layer_index("model.norm") is None
    device_map = hand_made_map()
    assert device_of("model.layers.1.mlp.up_proj.weight", device_map) == "cpu"
    assert device_of("model.layers.2.self_attn.q_proj.weight", device_map) == "cpu"
    assert device_of("lm_head.weight", device_map) == "disk"
    assert device_of("anything.at.all", {"": "cpu"}) == "cpu"
    with pytest.raises(KeyError):
        device_of("model.layers.9", {"lm_head": 0})


def test_summary_of_a_hand_made_map(tiny):
    summary = summarize_device_map(hand_made_map(), tiny)
    assert summary.devices == [0, "cpu", "disk"] and summary.num_layers == LAYERS
    assert summary.row(0).layers == (0,) and summary.row("cpu").layers == (1,) and summary.row("disk").layers == (3,)
    assert summary.split_layers == (2,)
    attention = 4 * H * H
    assert summary.row(0).parameter_bytes == 4 * (V * H + LAYER_PARAMS)
    assert summary.row("cpu").parameter_bytes == 4 * (LAYER_PARAMS + attention)
    assert summary.row("disk").parameter_bytes == 4 * (LAYER_PARAMS - attention + LAYER_PARAMS + H + V * H)
    assert summary.row("disk").buffer_bytes > 0 and summary.row(0).buffer_bytes == 0  # rotary inv_freq
    assert summary.total_bytes == sum(p.numel() * 4 for p in tiny.parameters()) + summary.row("disk").buffer_bytes
    assert summary.bytes_on(1) == 0 and summary.layers_on(1) == 0 and summary.layers_on("cpu") == 1
    text = repr(summary)
    assert "GPU 0" in text and "split layers: 2" in text and "4 decoder layers" in text


def test_summary_in_another_dtype_halves_the_bytes(tiny):
    full = summarize_device_map(hand_made_map(), tiny)
    half = summarize_device_map(hand_made_map(), tiny, torch.float16)
    assert half.dtype == "float16" and full.dtype == "float32"
    assert half.row(0).parameter_bytes * 2 == full.row(0).parameter_bytes


def test_a_map_with_one_entry_for_everything(tiny):
    summary = summarize_device_map({"": "cpu"}, tiny)
    assert summary.devices == ["cpu"] and summary.row("cpu").layers == tuple(range(LAYERS))
    assert summary.split_layers == ()


def test_replica_plan_follows_the_reserve_rule(replica):
    model, va = replica
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    embedding = 4 * model.model.embed_tokens.weight.numel()
    device_map = plan_device_map(model, {"cpu": va.budget_bytes}, "auto", ["LlamaDecoderLayer"])
    summary = summarize_device_map(device_map, model)
    expected = (va.budget_bytes - layer - embedding) // layer  # accelerate keeps one largest layer free
    assert summary.layers_on("cpu") == expected == 3
    assert summary.layers_on("disk") == 16 - expected and summary.split_layers == ()
    assert summary.total_bytes == sum(p.numel() * 4 for p in model.parameters()) + 384  # + rotary buffers


def test_replica_with_a_gpu_and_without_no_split(replica):
    model, va = replica
    max_memory = {0: va.budget_bytes, "cpu": 2 * va.budget_bytes}
    with_it = summarize_device_map(plan_device_map(model, max_memory, "auto", ["LlamaDecoderLayer"]), model)
    assert (with_it.layers_on(0), with_it.layers_on("cpu"), with_it.layers_on("disk")) == (3, 8, 5)
    without = summarize_device_map(plan_device_map(model, max_memory, "auto", None), model)
    assert without.layers_on(0) == 4 and without.split_layers == (13,)


NO_SPLIT = ["LlamaDecoderLayer"]


@pytest.mark.parametrize("with_gpu", [False, True])
def test_check_budget_refuses_what_the_planner_would_leave_empty(tiny, with_gpu):
    """accelerate subtracts the largest layer from a main device's budget: below it, that device gets nothing."""
    main = 0 if with_gpu else "cpu"
    largest = check_budget(tiny, {main: 10**9, "cpu": 10**9})  # here the embedding (and LM head), 250 KiB
    assert largest == 4 * H * V > 4 * LAYER_PARAMS
    for budget in (largest // 2, largest - 1):
        max_memory = {0: budget, "cpu": 10**9} if with_gpu else {"cpu": budget}
        planned = infer_auto_device_map(tiny, max_memory=dict(max_memory), no_split_module_classes=NO_SPLIT)
        assert main not in planned.values()
        with pytest.raises(BudgetError, match="place nothing there"):
            check_budget(tiny, max_memory)
    enough = largest + 4 * H * V + 4 * LAYER_PARAMS  # the reserve, the embedding, one decoder layer
    max_memory = {0: enough, "cpu": 10**9} if with_gpu else {"cpu": enough}
    planned = infer_auto_device_map(tiny, max_memory=dict(max_memory), no_split_module_classes=NO_SPLIT)
    assert summarize_device_map(planned, tiny).layers_on(main) == 1
    assert check_budget(tiny, max_memory) == largest


def test_plan_copies_max_memory_and_checks_the_strategy(tiny):
    max_memory = {0: "1MiB", 1: "1MiB", "cpu": "1GiB"}
    plans = {s: plan_device_map(tiny, max_memory, s, ["LlamaDecoderLayer"]) for s in STRATEGIES}
    assert max_memory == {0: "1MiB", 1: "1MiB", "cpu": "1GiB"}  # accelerate alone would rewrite it in place
    assert plans["auto"] == plans["balanced"]
    assert set(plans["sequential"].values()) <= {0, 1, "cpu", "disk"}
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_device_map(tiny, max_memory, "fastest")


def test_device_map_for_budgets(tiny):
    total = sum(p.numel() * 4 for p in tiny.parameters())
    assert set(device_map_for_budgets(tiny, 0, 10 * total).values()) == {"cpu"}
    assert 0 not in device_map_for_budgets(tiny, 0, total // 2).values()
    assert "disk" in device_map_for_budgets(tiny, 0, total // 2).values()
    assert set(device_map_for_budgets(tiny, 10 * total, 10 * total).values()) == {0}


def test_draw_one_patch_per_entry(tiny):
    device_map = hand_made_map()
    fig = draw_device_map(device_map, tiny, title="hand made")
    try:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert len(ax.patches) == len(device_map)
        colours = {tuple(p.get_facecolor()) for p in ax.patches}
        assert len(colours) == 3  # GPU 0, CPU, disk
        assert sum(p.get_width() for p in ax.patches) == pytest.approx(1.0)
        assert sum(bool(p.get_hatch()) for p in ax.patches) == 4  # the four pieces of split layer 2
        assert ax.get_title(loc="left") == "hand made"
        assert len(ax.get_legend().get_texts()) == 4  # three devices and "split layer"
    finally:
        plt.close(fig)


def test_draw_several_maps(tiny):
    maps = {"a": hand_made_map(), "b": {"": "cpu"}}
    fig = draw_device_maps(maps, tiny, title="two")
    try:
        assert [len(ax.patches) for ax in fig.axes] == [len(maps["a"]), 1]
        assert fig.axes[1].get_title(loc="left").startswith("b")
    finally:
        plt.close(fig)


def test_read_offload_folder(isolated_cache):
    folder = offload_dir("05_read")
    assert read_offload_folder(folder).total_bytes == 0
    index = {"a.weight": {"dtype": "float32", "shape": [2, 3]}, "b.weight": {"dtype": "float16", "shape": [4]}}
    np.arange(6, dtype=np.float32).tofile(folder / "a.weight.dat")
    np.arange(4, dtype=np.float16).tofile(folder / "b.weight.dat")
    (folder / "index.json").write_text(json.dumps(index))
    contents = read_offload_folder(folder)
    assert contents.dat_bytes == {"a.weight": 24, "b.weight": 8} and contents.tensors == index
    assert contents.bytes_by_dtype() == {"float32": 24, "float16": 8} and contents.total_bytes == 32
    assert "2 .dat files" in repr(contents)


@pytest.fixture
def explorer(replica):
    model, va = replica
    app = device_map_explorer(model, gpu_budget=va.budget_bytes, cpu_budget=2 * va.budget_bytes, unit="MiB",
                              title="replica")
    yield app
    plt.close("all")


def test_explorer_controls_have_stable_descriptions_and_classes(explorer):
    assert explorer.gpu.description == DEVICE_MAP_DESCRIPTIONS["gpu"].format(unit="MiB") == "GPU 0 budget (MiB)"
    assert explorer.cpu.description == "CPU budget (MiB)" and explorer.plan.description == "Plan"
    assert DEVICE_MAP_APP_CLASS in explorer._dom_classes
    assert DEVICE_MAP_PLAN_CLASS in explorer.plan._dom_classes
    assert DEVICE_MAP_STRIP_CLASS in explorer.strip._dom_classes
    assert list(explorer.children) == [explorer.gpu, explorer.cpu, explorer.strip, explorer.plan]
    assert not explorer.gpu.continuous_update  # one plan per release, not per pixel dragged


def test_explorer_initial_state_is_the_pure_function(explorer, replica):
    model, va = replica
    gpu_bytes, cpu_bytes = explorer.gpu.value * MiB, explorer.cpu.value * MiB
    assert explorer.device_map == device_map_for_budgets(model, gpu_bytes, cpu_bytes, ["LlamaDecoderLayer"])
    assert explorer.summary.layers_on(0) == 3
    assert bytes(explorer.strip.value).startswith(b"\x89PNG")
    assert "3 of 16 decoder layers on GPU 0" in explorer.plan.value
    assert plt.get_fignums() == []  # the strip was rendered and closed: the notebook never shows it twice


def test_explorer_updates_when_a_slider_moves(explorer, replica):
    model, _ = replica
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    image, plan = explorer.strip.value, explorer.plan.value
    explorer.gpu.value = 300
    assert explorer.summary.layers_on(0) == (300 * MiB - layer - 4 * model.model.embed_tokens.weight.numel()) // layer
    assert explorer.summary.layers_on(0) == 9 and explorer.strip.value != image and explorer.plan.value != plan
    explorer.gpu.value = 0  # no GPU: CPU RAM becomes the main device
    assert 0 not in explorer.device_map.values()
    assert "0 of 16 decoder layers on GPU 0" in explorer.plan.value
    explorer.cpu.value = 0
    assert set(explorer.device_map.values()) == {"disk"}
