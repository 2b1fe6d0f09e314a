"""helpers.layout, helpers.models.scaled_config and helpers.own_model on the committed architectures."""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from helpers.device_maps import block_names, device_of, plan_device_map
from helpers.layout import LayoutError, layout_of
from helpers.models import (
    OTHER_ARCHITECTURES,
    count_parameters,
    load_config,
    meta_model,
    replica_config,
    scaled_config,
    virtual_a100,
    vocabulary_share,
)
from helpers.own_model import CannotTeach, lesson_budget, lesson_cpu_budget, minimum_budget, resolve_checkpoint

#: Published parameter counts (model cards), which the committed configs must reproduce on meta.
PUBLISHED_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768,
                        "qwen2.5-1.5b": 1_543_714_304, "mistral-7b": 7_241_732_096, "phi-3-mini": 3_821_079_552,
                        "gemma-2-2b": 2_614_341_888, "gpt2": 124_439_808}
TIED = {"llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-1.5b", "gemma-2-2b", "gpt2"}


def skeleton(config) -> torch.nn.Module:
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model


@pytest.mark.parametrize("name", OTHER_ARCHITECTURES)
def test_committed_configs_have_the_published_size(name):
    assert count_parameters(meta_model(load_config(name))) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", OTHER_ARCHITECTURES)
def test_layout_is_read_from_the_model(name):
    model = skeleton(load_config(name))
    layout = layout_of(model)
    assert layout.block_class in model._no_split_modules
    assert layout.num_blocks == model.config.num_hidden_layers
    assert model.get_submodule(layout.embedding) is model.get_input_embeddings()
    assert model.get_submodule(layout.head) is model.get_output_embeddings()
    assert layout.tied == (name in TIED)
    assert layout.block_index(layout.block(3) + ".mlp") == 3 and layout.block_index(layout.embedding) is None
    assert block_names(model) == [layout.block(i) for i in range(layout.num_blocks)]
    if name == "gpt2":
        assert (layout.embedding, layout.blocks) == ("transformer.wte", "transformer.h")


def test_layout_needs_no_split_modules():
    class Plain(torch.nn.Module):
        _no_split_modules = None

    with pytest.raises(LayoutError, match="_no_split_modules"):
        layout_of(Plain())


@pytest.mark.parametrize("name", OTHER_ARCHITECTURES)
def test_scaled_config_keeps_the_proportions(name):
    real, small = load_config(name), scaled_config(name)
    assert type(small) is type(real) and small.num_hidden_layers == min(8, real.num_hidden_layers)
    assert abs(vocabulary_share(small) - vocabulary_share(real)) < 0.01
    real_groups = real.num_attention_heads // (getattr(real, "num_key_value_heads", None) or real.num_attention_heads)
    small_groups = small.num_attention_heads // (getattr(small, "num_key_value_heads", None)
                                                 or small.num_attention_heads)
    assert small_groups == real_groups
    assert layout_of(skeleton(small)).tied == layout_of(skeleton(real)).tied
    assert count_parameters(meta_model(small)) * 4 < 32 * 2**20  # laptop scale


@pytest.mark.parametrize("name", OTHER_ARCHITECTURES)
def test_lesson_budget_puts_one_block_in_the_fast_tier_and_offloads(name):
    model = skeleton(scaled_config(name))
    total = count_parameters(model) * 4
    budget = lesson_budget(model, total * 10 // 34)
    assert budget.bytes == max(budget.ratio_bytes, budget.minimum_bytes)
    plan = plan_device_map(model, {"cpu": budget.bytes}, "auto", list(model._no_split_modules))
    assert device_of(block_names(model)[0], plan) == "cpu" and "disk" in plan.values()
    below = plan_device_map(model, {"cpu": budget.minimum_bytes - 1024}, "sequential",
                            list(model._no_split_modules))
    assert device_of(block_names(model)[0], below) != "cpu"  # the minimum is the least, to 1 KiB
    assert ("raised from" in repr(budget)) == budget.raised


@pytest.mark.parametrize("name", ["gpt2", "gemma-2-2b", "llama-3.2-1b"])
def test_beside_a_gpu_the_lesson_uses_all_three_tiers(name):
    """05 on a GPU: GPU 0 gets the lesson budget, CPU RAM lesson_cpu_budget; the plan must reach the disk.

    On the H200, two budgets of CPU RAM held all of a raised-budget GPT-2 and Gemma-2 beside GPU 0: no disk tier.
    """
    model = skeleton(scaled_config(name))
    total = count_parameters(model) * 4
    budget = lesson_budget(model, total * 10 // 34, first=0).bytes
    cpu = lesson_cpu_budget(model, budget)
    assert 0 < cpu <= 2 * budget
    plan = plan_device_map(model, {0: budget, "cpu": cpu}, "auto", list(model._no_split_modules))
    blocks = [device_of(b, plan) for b in block_names(model)]
    assert blocks[0] == 0 and "cpu" in blocks and blocks[-1] == "disk", blocks
    if cpu < 2 * budget:  # the most that still reaches the disk, to 1 KiB
        more = plan_device_map(model, {0: budget, "cpu": cpu + 1024}, "auto", list(model._no_split_modules))
        assert device_of(block_names(model)[-1], more) == "cpu"


def test_the_replica_beside_a_gpu_keeps_two_budgets_of_cpu_ram():
    model = skeleton(replica_config())
    budget = lesson_budget(model, virtual_a100(replica_config()).budget_bytes, first=0).bytes
    assert lesson_cpu_budget(model, budget) == 2 * budget


def test_the_helpers_trial_plans_for_gpu_0_do_not_warn():
    """On the H200, 05's first cell showed accelerate's "Current model requires 384 bytes of buffer for offloaded
    layers" warning: a bisection's trial budget for GPU 0 alone left no room beside the reserve for the rotary
    embedding's buffers. The trial plans are never dispatched, so lesson_budget and lesson_cpu_budget keep quiet;
    a plan that warns is still shown to the caller (planning works the same without the GPU)."""
    model = skeleton(replica_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        budget = lesson_budget(model, virtual_a100(replica_config()).budget_bytes, first=0).bytes
        lesson_cpu_budget(model, budget)
        minimum_budget(model, torch.float16, 0)
    assert not caught, [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_device_map(model, {0: budget // 8, "cpu": budget}, "auto", list(model._no_split_modules))
    assert any("bytes of buffer for offloaded layers" in str(w.message) for w in caught)


def test_a_model_too_small_to_offload_cannot_be_taught():
    model = skeleton(scaled_config("gpt2", num_hidden_layers=1))
    with pytest.raises(CannotTeach, match="nothing would be offloaded"):
        lesson_budget(model, 1)
    assert minimum_budget(model) > 0


def test_resolve_checkpoint(tmp_path, monkeypatch):
    assert resolve_checkpoint("").folder is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(CannotTeach, match="without config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CannotTeach, match="no \\*.safetensors"):
        resolve_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(CannotTeach, match="neither a folder"):
        resolve_checkpoint("not/a/hub/id")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CannotTeach, match="is not in your hub cache") as caught:
        resolve_checkpoint("someone/absent")
    assert caught.value._render_traceback_() == [f"\033[1;31mCannotTeach:\033[0m {caught.value}"]
