import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import calculate_maximum_sizes, convert_bytes
from transformers import AutoModel, AutoModelForCausalLM

from helpers import sizes
from helpers.models import load_config, meta_model

LLAMA_70B_PARAMETERS = 68_976_648_192
LLAMA_70B_LAYER = 855_654_400  # one LlamaDecoderLayer
LLAMA_70B_LM_HEAD = 32_000 * 8_192


@pytest.fixture(scope="module")
def llama_70b():
    return meta_model(load_config("llama-2-70b"))


@pytest.fixture(scope="module")
def table_70b(llama_70b):
    return sizes.sizes_of(llama_70b, "llama-2-70b")


def test_70b_numbers(table_70b):
    assert table_70b.parameters == LLAMA_70B_PARAMETERS
    assert table_70b.largest_layer_parameters == LLAMA_70B_LAYER
    assert table_70b.largest_layer_names == tuple(f"model.layers.{i}" for i in range(80))
    assert table_70b.total_bytes("float32") == 275_906_592_768
    assert table_70b.total_bytes(torch.float16) == 137_953_296_384
    assert table_70b.largest_layer_bytes("fp16") == 1_711_308_800
    assert table_70b.buffer_bytes == 2 * 64 * 4  # inv_freq and original_inv_freq, float32


def test_dtype_scaling(table_70b):
    for get in (table_70b.total_bytes, table_70b.largest_layer_bytes):
        fp32 = get("float32")
        assert get("float16") * 2 == fp32
        assert get("bfloat16") * 2 == fp32
        assert get("int8") * 4 == fp32
        assert get("int4") * 8 == fp32


def test_agrees_with_accelerate_calculate_maximum_sizes(llama_70b, table_70b):
    assert llama_70b.dtype == torch.float16  # from_config builds in the config's dtype (Meta's config: float16)
    total, (layer, names) = calculate_maximum_sizes(llama_70b)
    assert total == 137_953_296_896
    assert total - table_70b.total_bytes("float16") == table_70b.buffer_bytes == 512  # accelerate counts buffers
    assert layer == table_70b.largest_layer_bytes("float16") == 1_711_308_800
    assert tuple(names) == table_70b.largest_layer_names


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-13b"])
def test_agrees_with_accelerate_for_other_sizes(name):
    model = meta_model(load_config(name), dtype=torch.float32)
    table = sizes.sizes_of(model, name)
    total, (layer, names) = calculate_maximum_sizes(model)
    assert total == table.total_bytes("float32") + table.buffer_bytes
    assert layer == table.largest_layer_bytes("float32")
    assert tuple(names) == table.largest_layer_names


def test_model_sizes_builds_from_a_name():
    table = sizes.model_sizes("llama-2-7b", dtypes=("fp16", "int4"))
    assert table.parameters == 6_738_415_616
    assert table.dtypes == ("float16", "int4")
    assert "llama-2-7b" in repr(table) and "int4" in repr(table) and "float32" not in repr(table)


def test_unsplittable_blocks_on_a_plain_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()))
    blocks = sizes.unsplittable_blocks(model)
    assert list(blocks) == ["0", "1.0", "1.1"]  # no _no_split_modules: every leaf is a block
    assert sizes.largest_layer(model) == (8 * 16 + 16, ("1.0",))


def test_unsplittable_blocks_respects_no_split_modules(llama_70b):
    blocks = sizes.unsplittable_blocks(llama_70b)
    assert "model.layers.0" in blocks and "model.layers.0.mlp" not in blocks
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(blocks)


def test_accelerate_estimate_table_offline():
    config = load_config("llama-2-70b")
    table = sizes.accelerate_estimate_table(config)
    rows = sizes.estimate_table_rows(table)
    assert list(rows) == list(sizes.DEFAULT_DTYPES)
    assert rows["float32"]["Total Size"] == "255.98 GB"  # GiB, labelled "GB"
    with init_empty_weights():
        base = AutoModel.from_config(config, dtype=torch.float32)  # what the command builds: no LM head
    ours = sizes.sizes_of(base, "llama-2-70b AutoModel")
    assert ours.parameters == LLAMA_70B_PARAMETERS - LLAMA_70B_LM_HEAD
    for dtype, row in rows.items():
        assert row["Total Size"] == convert_bytes(ours.total_bytes(dtype))
        assert row["Largest Layer"] == convert_bytes(ours.largest_layer_bytes(dtype))


def test_accelerate_estimate_table_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="bfloat16"):
        sizes.accelerate_estimate_table(load_config("llama-2-7b"), dtypes=("bfloat16",))


def test_from_config_uses_the_config_dtype():
    config = load_config("llama-2-7b", num_hidden_layers=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.dtype == torch.float16
