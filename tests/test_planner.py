"""The planner: budgets, accelerate's map on meta, the speed arithmetic, the form, and clear errors."""

import json

import pytest
import torch

from helpers.memory import GPU, gpu_by_name, kv_cache_bytes
from helpers.models import load_config, meta_model
from helpers.planner import DATASHEET_MEMORY_BANDWIDTH, Links, estimate_speed, plan_inference
from helpers.widgets import InferencePlanner, config_from_json

LINKS = Links(pinned_h2d=25e9, pageable_h2d=5e9, disk_read=2e9, device_memory=2e12, source="test",
              disk_read_mapped=0.5e9)


def test_speed_is_bytes_over_bandwidth():
    speed = estimate_speed(gpu_bytes=10 * 10**9, cpu_bytes=50 * 10**9, disk_bytes=4 * 10**9, links=LINKS)
    assert speed.resident_seconds == pytest.approx(64e9 / 2e12)
    assert speed.pcie_seconds == pytest.approx(54e9 / 25e9)
    assert speed.disk_seconds == pytest.approx(4e9 / 2e9)
    # accelerate: nothing overlapped, pageable copies of everything offloaded, mapped reads of the disk tier
    assert speed.accelerate_seconds == pytest.approx(64e9 / 2e12 + 54e9 / 5e9 + 4e9 / 0.5e9)
    assert speed.bound_seconds == pytest.approx(max(64e9 / 2e12, 54e9 / 25e9, 4e9 / 2e9))


def test_measured_compute_replaces_the_memory_estimate():
    speed = estimate_speed(1, 0, 0, LINKS, resident_seconds=0.25)
    assert speed.resident_seconds == speed.bound_seconds == speed.accelerate_seconds == 0.25


def test_slower_pcie_scales_pinned_copies_and_caps_pageable_ones():
    slower = LINKS.with_pcie(0.5, 1e12, "PCIe 4")
    assert slower.pinned_h2d == 12.5e9 and slower.pageable_h2d == 5e9 and slower.device_memory == 1e12
    assert LINKS.with_pcie(0.1, 1e12, "x").pageable_h2d == pytest.approx(2.5e9)
    assert slower.disk_read_mapped == LINKS.disk_read_mapped


def test_llama_70b_on_an_a100_offloads_half_and_keeps_the_request_room():
    config = load_config("llama-2-70b")
    plan = plan_inference(config, gpu_by_name("A100 80 GB"), 128 * 10**9, LINKS, prompt_tokens=4096, new_tokens=256)
    assert plan.kv_cache_bytes == kv_cache_bytes(config, 1, 4352, "float16")
    assert plan.gpu_weight_budget == (80 * 10**9 - 2**30 - plan.kv_cache_bytes - plan.activation_bytes)
    assert plan.bytes_on(0) <= plan.gpu_weight_budget
    assert plan.summary.layers_on(0) + plan.summary.layers_on("cpu") == 80 and plan.bytes_on("disk") == 0
    assert not plan.summary.split_layers  # no_split_module_classes came from the model
    assert "decoder layers on the GPU" in plan.verdict and "s/token" in plan.verdict


def test_less_ram_spills_to_disk_and_slows_the_bound():
    config = load_config("llama-2-70b")
    roomy = plan_inference(config, gpu_by_name("A100 80 GB"), 256 * 10**9, LINKS)
    tight = plan_inference(config, gpu_by_name("A100 80 GB"), 48 * 10**9, LINKS)
    assert roomy.bytes_on("disk") == 0 < tight.bytes_on("disk")
    assert tight.speed.bound_seconds > roomy.speed.bound_seconds


def test_a_card_with_no_room_for_weights_says_why():
    with pytest.raises(ValueError, match="no room for weights.*shorter prompt"):
        plan_inference(load_config("llama-2-70b"), GPU("tiny 2 GB", 2), 64 * 10**9, LINKS, prompt_tokens=8192)


def test_config_from_json_reads_a_hub_config_and_rejects_bad_text():
    config = config_from_json(load_config("llama-2-7b").to_json_string())
    assert config.num_hidden_layers == 32 and config.model_type == "llama"
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_json("{not json")
    with pytest.raises(ValueError, match="model_type"):
        config_from_json(json.dumps({"hidden_size": 8}))


def test_planner_form_replans_when_a_control_changes():
    planner = InferencePlanner(LINKS, base_pcie=5, device_memory=DATASHEET_MEMORY_BANDWIDTH)
    on_a100 = planner.plan
    planner.gpu.value = "H100 80 GB"
    assert planner.plan is not on_a100 and planner.plan.gpu.name == "H100 80 GB"
    planner.pcie.value = 5
    assert planner.plan.links.pinned_h2d == LINKS.pinned_h2d
    planner.model.value = "Llama-2-7B"
    assert planner.plan.summary.layers_on("cpu") == 0  # 13.5 GB fits: no offloading
    assert "no offloading" in planner.result.value


def test_planner_shows_a_bad_pasted_config_as_an_error():
    planner = InferencePlanner(LINKS, base_pcie=5)
    planner.model.value = "config.json (pasted below)"
    assert not planner.config.disabled and planner.plan is not None  # the example config plans
    planner.config.value = "{broken"
    assert planner.plan is None and "not valid JSON" in planner.result.value


def test_reserve_table_reconciles_the_answers_for_llama_70b_on_an_a100():
    from helpers.planner import RESERVE_ROWS, reserve_table

    config = load_config("llama-2-70b")
    a100 = gpu_by_name("A100 80 GB")
    table = reserve_table(config, a100, 128 * 10**9, LINKS)
    assert [row.name for row in table.rows] == list(RESERVE_ROWS)
    layer, embedding = 2 * 855_654_400, 2 * config.vocab_size * config.hidden_size
    assert table.largest_layer == layer
    weights_only, reserved, short, answer = table.rows
    # weights only: the whole card, as notebook 04's exercise counts it (card - embedding - LM head) // layer
    assert weights_only.gpu_layers == (a100.memory_bytes - 2 * embedding) // layer == 46
    # accelerate's rule keeps one layer free: (card - layer - embedding) // layer, the count notebook 05 prints
    assert reserved.gpu_layers == (a100.memory_bytes - layer - embedding) // layer == 45
    # the last row is plan_inference's defaults: the answer every notebook quotes
    default = plan_inference(config, a100, 128 * 10**9, LINKS)
    assert table.answer is answer and answer.plan.device_map == default.device_map
    assert answer.room_for_weights == default.gpu_weight_budget - layer
    counts = [row.gpu_layers for row in table.rows]
    assert counts == sorted(counts, reverse=True)  # each row sets aside more
    for row in table.rows:
        assert row.gpu_layers + row.offloaded_layers == 80
        assert row.offloaded_bytes == row.plan.bytes_on("cpu") + row.plan.bytes_on("disk")
        pinned, pageable = (float(cell) for cell in table.table_rows()[table.rows.index(row)][6:8])
        assert pinned == pytest.approx(row.offloaded_bytes / LINKS.pinned_h2d, abs=0.01)
        assert pageable == pytest.approx(row.offloaded_bytes / LINKS.pageable_h2d, abs=0.01)
    with pytest.raises(KeyError, match="no row"):
        table.row("everything")


def test_cancelling_accelerates_reserve_lets_the_weights_fill_the_budget():
    from helpers.models import meta_model
    from helpers.planner import largest_layer_bytes

    config = load_config("llama-2-13b")
    gpu = GPU("test 12 GB", 12)
    model = meta_model(config, torch.float16)
    layer = largest_layer_bytes(model, ["LlamaDecoderLayer"], torch.float16)
    assert layer == 2 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120)  # one decoder layer in float16
    bare = dict(prompt_tokens=0, new_tokens=0, runtime_bytes=0, model=model)
    with_rule = plan_inference(config, gpu, 64 * 10**9, LINKS, **bare)
    without = plan_inference(config, gpu, 64 * 10**9, LINKS, largest_layer_reserve=False, **bare)
    assert with_rule.bytes_on(0) <= gpu.memory_bytes - layer and without.bytes_on(0) <= gpu.memory_bytes
    assert without.summary.layers_on(0) == with_rule.summary.layers_on(0) + 1  # the reserve is exactly one layer


def test_int8_weights_keep_their_kv_cache_in_float16():
    config = load_config("llama-2-70b")
    from helpers.models import meta_model

    # a skeleton cannot be built in int8 (not a floating-point dtype): plan a float16 one, sized in int8
    plan = plan_inference(config, gpu_by_name("A100 80 GB"), 128 * 10**9, LINKS, dtype=torch.int8,
                          model=meta_model(config, torch.float16))
    assert plan.kv_cache_bytes == kv_cache_bytes(config, 1, 4352, "float16")
    assert plan.summary.total_bytes < 0.51 * plan_inference(config, gpu_by_name("A100 80 GB"), 128 * 10**9,
                                                            LINKS).summary.total_bytes


# --- every committed architecture (helpers.models.OTHER_ARCHITECTURES), at full scale on meta ----------------------

@pytest.fixture(scope="module")
def architectures():
    """(config, float16 meta skeleton, layout) of each committed architecture at full scale, built once."""
    from helpers.layout import layout_of
    from helpers.models import OTHER_ARCHITECTURES, meta_model

    built = {}
    for name in OTHER_ARCHITECTURES:
        config = load_config(name)
        model = meta_model(config, torch.float16)
        built[name] = (config, model, layout_of(model))
    return built


def _architecture_names():
    from helpers.models import OTHER_ARCHITECTURES

    return OTHER_ARCHITECTURES


@pytest.mark.parametrize("name", _architecture_names())
def test_every_architecture_plans_on_an_a100(architectures, name):
    config, model, layout = architectures[name]
    plan = plan_inference(config, gpu_by_name("A100 80 GB"), 128 * 10**9, LINKS, model=model)
    assert plan.summary.num_layers == layout.num_blocks  # the blocks were found by the layout, not Llama's names
    assert 0 <= plan.summary.layers_on(0) <= layout.num_blocks and not plan.summary.split_layers
    assert plan.fits_on_gpu  # every committed architecture fits an A100-80GB whole (notebook 09 section 6)
    assert "no offloading" in plan.verdict and plan.speed.bound_seconds == plan.speed.resident_seconds


@pytest.mark.parametrize("name", _architecture_names())
def test_every_architecture_offloads_whole_blocks_on_a_small_card(architectures, name):
    """A card half the size of the float16 weights: some blocks on the GPU, the rest in RAM, none split."""
    from accelerate.utils import compute_module_sizes

    config, model, layout = architectures[name]
    half = compute_module_sizes(model, dtype=torch.float16)[""] / 2
    plan = plan_inference(config, GPU("half", half / 1e9), 64 * 10**9, LINKS, prompt_tokens=128, new_tokens=0,
                          runtime_bytes=0, model=model)
    on_gpu, on_cpu = plan.summary.layers_on(0), plan.summary.layers_on("cpu")
    assert 0 < on_gpu < layout.num_blocks and on_gpu + on_cpu == layout.num_blocks and not plan.summary.split_layers
    assert plan.bytes_on(0) <= plan.gpu_weight_budget and not plan.fits_on_gpu
    assert f"{on_gpu} of {layout.num_blocks} decoder layers on the GPU" in plan.verdict


@pytest.mark.parametrize("name", ["gpt2", "gemma-2-2b", "phi-3-mini", "qwen2.5-0.5b"])
def test_reserve_table_answers_with_plan_inference_for_other_families(architectures, name):
    from helpers.planner import reserve_table

    config, model, _ = architectures[name]
    a100 = gpu_by_name("A100 80 GB")
    table = reserve_table(config, a100, 128 * 10**9, LINKS, model=model)
    assert table.answer.plan.device_map == plan_inference(config, a100, 128 * 10**9, LINKS, model=model).device_map
    assert [row.gpu_layers for row in table.rows] == [table.answer.plan.summary.num_layers] * 4  # all fit
    assert "0.00 GB" not in table.rows[1].adds  # a small model's layer shows in MB, not as zero


def test_planner_form_lists_and_plans_every_committed_architecture():
    from helpers.models import OTHER_ARCHITECTURES
    from helpers.widgets import ARCHITECTURES, LLAMA2, PASTED

    assert sorted(ARCHITECTURES.values()) == sorted(OTHER_ARCHITECTURES)
    planner = InferencePlanner(LINKS, base_pcie=5, device_memory=DATASHEET_MEMORY_BANDWIDTH)
    assert planner.model.value == "Llama-2-70B" and list(planner.model.options) == [*LLAMA2, *ARCHITECTURES, PASTED]
    for label in ARCHITECTURES:
        planner.model.value = label
        assert planner.plan is not None, planner.result.value
        assert planner.plan.model_name == ARCHITECTURES[label] and "no offloading" in planner.result.value


def test_planner_form_offers_a_given_config_to_paste():
    gpt2 = load_config("gpt2")
    planner = InferencePlanner(LINKS, base_pcie=5, config_text=gpt2.to_json_string())
    assert planner.model.value == "Llama-2-70B"  # the default stays
    planner.model.value = "config.json (pasted below)"
    assert planner.plan is not None and planner.plan.summary.num_layers == 12


# --- bitsandbytes formats: the plan places the bytes bitsandbytes stores (helpers.quantization) --------------------

@pytest.fixture(scope="module")
def llama_skeletons():
    from helpers.models import meta_model

    return {name: (load_config(name), meta_model(load_config(name), torch.float16))
            for name in ("llama-2-7b", "llama-2-70b")}


@pytest.mark.parametrize("fmt", ["int8", "nf4", "nf4-dq"])
@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-70b"])
def test_a_quantised_plan_places_the_stored_bytes(llama_skeletons, name, fmt):
    from helpers.quantization import predict_footprint

    config, model = llama_skeletons[name]
    plan = plan_inference(config, gpu_by_name("A100 80 GB"), 128 * 10**9, LINKS, model=model, quantization=fmt)
    stored = predict_footprint(model, fmt)
    # every parameter placed at its stored bytes (scales included, the head and embeddings in float16); accelerate
    # counts the float32 rotary buffers in float16, so buffers are left out of the comparison
    assert sum(row.parameter_bytes for row in plan.summary.rows) == stored.total - stored.buffers
    assert plan.dtype == fmt and plan.quantization == fmt
    assert plan.kv_cache_bytes == kv_cache_bytes(config, 1, 4096 + 256, "float16")  # the KV cache stays float16
    assert all(p.dtype == torch.float16 for p in model.parameters())  # the caller's skeleton is untouched


def test_llama_70b_on_an_a100_fits_in_nf4_not_in_float16(llama_skeletons):
    config, model = llama_skeletons["llama-2-70b"]
    a100 = gpu_by_name("A100 80 GB")
    float16 = plan_inference(config, a100, 128 * 10**9, LINKS, model=model)
    nf4 = plan_inference(config, a100, 128 * 10**9, LINKS, model=model, quantization="nf4")
    assert not float16.fits_on_gpu and float16.summary.layers_on("cpu") > 0
    assert nf4.fits_on_gpu and not nf4.bnb_refuses and "no offloading" in nf4.verdict
    assert "expect at least" in nf4.verdict  # the memory-rate term is a floor for bitsandbytes' kernels


def test_an_offloading_quantised_plan_says_bitsandbytes_refuses_it(llama_skeletons):
    from pathlib import Path

    import transformers

    from helpers.planner import InferencePlan

    config, model = llama_skeletons["llama-2-70b"]
    a100 = gpu_by_name("A100 80 GB")
    long = plan_inference(config, a100, 128 * 10**9, LINKS, model=model, quantization="int8")  # 4096-token prompt
    short = plan_inference(config, a100, 128 * 10**9, LINKS, model=model, quantization="int8", prompt_tokens=512)
    assert not long.fits_on_gpu and long.bnb_refuses and "llm_int8_enable_fp32_cpu_offload=True" in long.verdict
    assert short.fits_on_gpu and not short.bnb_refuses
    # the quoted words are the pinned transformers' own, in both quantizers' validate_environment
    folder = Path(transformers.__file__).parent / "quantizers"
    for quantizer in ("quantizer_bnb_8bit.py", "quantizer_bnb_4bit.py"):
        assert InferencePlan.BNB_REFUSAL in (folder / quantizer).read_text()


def test_reserve_table_takes_a_quantised_format(llama_skeletons):
    from helpers.planner import reserve_table

    config, model = llama_skeletons["llama-2-70b"]
    a100 = gpu_by_name("A100 80 GB")
    table = reserve_table(config, a100, 128 * 10**9, LINKS, model=model, quantization="nf4")
    assert table.answer.plan.device_map == plan_inference(config, a100, 128 * 10**9, LINKS, model=model,
                                                          quantization="nf4").device_map
    assert all(row.plan.quantization == "nf4" for row in table.rows)


def test_quantization_needs_a_bitsandbytes_format_and_a_float_dtype(llama_skeletons):
    config, model = llama_skeletons["llama-2-7b"]
    a100 = gpu_by_name("A100 80 GB")
    with pytest.raises(ValueError, match="unknown quantization"):
        plan_inference(config, a100, 64 * 10**9, LINKS, model=model, quantization="int4")
    with pytest.raises(ValueError, match="float dtype"):
        plan_inference(config, a100, 64 * 10**9, LINKS, model=model, quantization="nf4", dtype=torch.int8)


def test_planner_form_plans_the_stored_formats():
    from helpers.models import meta_model
    from helpers.quantization import predict_footprint
    from helpers.widgets import STORED_FORMATS

    planner = InferencePlanner(LINKS, base_pcie=5, device_memory=DATASHEET_MEMORY_BANDWIDTH)
    assert list(planner.dtype.options)[-len(STORED_FORMATS):] == list(STORED_FORMATS)
    assert not planner.plan.fits_on_gpu  # Llama-2-70B in float16 on an A100-80GB
    skeleton = meta_model(load_config("llama-2-70b"), torch.float16)
    for label, fmt in STORED_FORMATS.items():
        planner.dtype.value = label
        stored = predict_footprint(skeleton, fmt)
        assert planner.plan.quantization == fmt
        assert sum(row.parameter_bytes for row in planner.plan.summary.rows) == stored.total - stored.buffers
    assert planner.plan.fits_on_gpu and "no offloading" in planner.result.value  # NF4 + double quantisation
    planner.model.value = "GPT-2"  # Conv1D layers: not predicted, said in the form
    assert planner.plan is None and "Conv1D" in planner.result.value


def test_the_reserve_row_names_the_largest_module_when_it_is_not_a_block():
    """A tied Gemma-2's embedding is larger than a decoder block: the reserve row must name it, not 'one decoder
    layer' (the H200 review found the row saying 'one decoder layer' beside the embedding's size)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from helpers.device_maps import block_names
    from helpers.models import load_config
    from helpers.planner import describe_largest, largest_layer

    with init_empty_weights():
        gemma = AutoModelForCausalLM.from_config(load_config("gemma-2-2b"), dtype=torch.float16)
    gemma.tie_weights()
    size, names = largest_layer(gemma, list(gemma._no_split_modules), torch.float16)
    embedding = gemma.model.embed_tokens  # its weight, and Gemma's embedding scale (a float16 buffer)
    assert names == ["model.embed_tokens"]
    assert size == sum(t.numel() * t.element_size() for t in [*embedding.parameters(), *embedding.buffers()])
    assert describe_largest(names, block_names(gemma)) == "`model.embed_tokens`"
    llama = meta_model(load_config("llama-2-70b"), torch.float16)
    _, names = largest_layer(llama, list(llama._no_split_modules), torch.float16)
    assert describe_largest(names, block_names(llama)) == "one decoder layer"
