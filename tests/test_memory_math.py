"""Unit tests for the memory arithmetic (helpers.memory), parameter counts (helpers.models) and 01's figures."""

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from helpers.memory import (
    BYTES_PER_PARAM,
    COMMON_GPUS,
    EAGER_SCORE_MATRICES,
    GB,
    GPU,
    FitReport,
    GiB,
    MiB,
    activation_bytes,
    bytes_per_param,
    compute_dtype,
    dtype_name,
    eager_score_matrices,
    fit_report,
    format_bytes,
    gpu_by_name,
    intermediate_size,
    kv_cache_bytes,
    measure_eager_attention,
    weights_bytes,
)
from helpers.models import (
    component_of,
    config_path,
    count_parameters,
    llama_parameter_formula,
    load_config,
    meta_model,
    parameter_breakdown,
)
from helpers.plots import plot_kv_cache, plot_model_sizes

EXACT = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192}
N_70B = EXACT["llama-2-70b"]


@pytest.fixture(scope="module")
def config_70b():
    return load_config("llama-2-70b")


@pytest.fixture(scope="module")
def tiny_config():
    return load_config("llama-2-70b", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)


# --- units and bytes ---------------------------------------------------------------------------------------------

def test_the_notes_number_is_gib():
    assert round(70e9 * 4 / GiB, 2) == 260.77
    assert 70e9 * 4 / GB == 280
    assert round(80 * GB / GiB, 2) == 74.51
    assert 81_920 * MiB == 80 * GiB and round(81_920 * MiB / GB, 1) == 85.9


@pytest.mark.parametrize("alias, name", [("fp32", "float32"), ("float", "float32"), ("half", "float16"),
                                         ("FP16", "float16"), ("bf16", "bfloat16"), ("i8", "int8"),
                                         ("int4", "int4"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
                                         (torch.float32, "float32"), (torch.int8, "int8")])
def test_dtype_name_normalises_aliases(alias, name):
    assert dtype_name(alias) == name


def test_dtype_name_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_name("float8")
    with pytest.raises(ValueError, match="no byte size"):
        dtype_name(torch.complex64)


def test_bytes_per_param_table():
    assert BYTES_PER_PARAM == {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int4": 0.5}
    assert bytes_per_param(torch.float16) == 2 and bytes_per_param("int4") == 0.5


def test_weights_bytes_is_an_exact_int():
    assert weights_bytes(N_70B, "float16") == 137_953_296_384
    assert weights_bytes(N_70B, "int4") == N_70B // 2
    assert isinstance(weights_bytes(7, "int4"), int)


def test_format_bytes_units():
    assert format_bytes(80e9, "GB") == "80.00 GB"
    assert format_bytes(80 * GiB, "GiB") == "80.00 GiB"
    assert format_bytes(3 * MiB) == "3.00 MiB"
    assert format_bytes(512) == "512 B"


def test_gpus_are_box_numbers():
    a100 = gpu_by_name("A100 80 GB")
    assert a100.memory_bytes == 80 * GB
    assert [g.memory_gb for g in COMMON_GPUS] == [16, 24, 40, 80, 80]
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu_by_name("A100 81 GB")


# --- parameter counts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(EXACT))
def test_exact_counts_on_meta_match_the_formula(name):
    config = load_config(name)
    model = meta_model(config)
    assert count_parameters(model) == EXACT[name] == llama_parameter_formula(config)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_breakdown_of_70b(config_70b):
    breakdown = parameter_breakdown(meta_model(config_70b))
    assert breakdown.total == N_70B
    assert breakdown.per_layer == 855_654_400 and breakdown.num_layers == 80
    assert breakdown.by_component["embeddings"] == breakdown.by_component["LM head"] == 32_000 * 8192
    assert breakdown.by_component["norms"] == 80 * 2 * 8192 + 8192
    assert "other" not in breakdown.by_component
    assert "855,654,400" in repr(breakdown) and "MLP" in repr(breakdown)


def test_tied_embeddings_counted_once(tiny_config):
    tied = load_config("llama-2-70b", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    untied_n = count_parameters(meta_model(tiny_config))
    tied_n = count_parameters(meta_model(tied))
    assert untied_n - tied_n == 1000 * 256
    assert tied_n == llama_parameter_formula(tied)


@pytest.mark.parametrize("name, component", [("model.embed_tokens.weight", "embeddings"), ("lm_head.weight", "LM head"),
                                             ("model.layers.0.self_attn.k_proj.weight", "attention"),
                                             ("model.layers.3.mlp.down_proj.weight", "MLP"),
                                             ("model.layers.3.input_layernorm.weight", "norms"),
                                             ("model.norm.weight", "norms"), ("something.else", "other")])
def test_component_of(name, component):
    assert component_of(name) == component


def test_config_path_errors_name_the_known_configs():
    with pytest.raises(FileNotFoundError, match="llama-2-70b"):
        config_path("llama-3-405b")


# --- KV cache and activations -------------------------------------------------------------------------------------

def test_kv_cache_formula_for_70b(config_70b):
    assert kv_cache_bytes(config_70b, 1, 1) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_cache_bytes(config_70b, 32, 4096) == 32 * 4096 * 327_680
    assert kv_cache_bytes(config_70b, 1, 1, "float32") == 2 * kv_cache_bytes(config_70b, 1, 1)


def test_gqa_is_eight_times_smaller_than_mha(config_70b):
    mha = load_config("llama-2-70b", num_key_value_heads=64)
    assert kv_cache_bytes(mha, 8, 4096) == 8 * kv_cache_bytes(config_70b, 8, 4096)
    assert round(kv_cache_bytes(mha, 8, 4096) / GB, 2) == 85.90  # exercise 2 of notebook 01


def real_cache(config, vocab_size: int, batch: int = 2, tokens: int = 13):
    """The layers of transformers' own KV cache after one forward pass of `config` at float32, and their bytes."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, vocab_size, (batch, tokens)), use_cache=True)
    layers = out.past_key_values.layers
    return layers, sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)


def test_kv_cache_formula_matches_a_real_dynamic_cache(tiny_config):
    layers, measured = real_cache(tiny_config, 1000)
    assert len(layers) == 2
    assert tuple(layers[0].keys.shape) == (2, 2, 13, 32)  # [batch, kv_heads, tokens, head_dim]
    assert measured == kv_cache_bytes(tiny_config, 2, 13, torch.float32)


def test_activation_bytes_terms(config_70b):
    b, t = 2, 100
    stream = b * t * (2 * 8192 + 3 * 28672) * 2
    scores = 5 * b * 64 * t * t * 2  # eager attention in float16: five score matrices at its peak
    assert activation_bytes(config_70b, b, t) == stream + scores
    assert activation_bytes(config_70b, b, t, "float32") == (stream + 2 * b * 64 * t * t * 2) * 2
    assert activation_bytes(config_70b, 1, 0) == 0


def test_intermediate_size_is_read_from_any_family():
    assert intermediate_size(load_config("llama-2-70b")) == 28672
    assert intermediate_size(load_config("phi-3-mini")) == 8192  # fused gate_up_proj: the width is still 8192
    assert intermediate_size(load_config("gpt2")) == 4 * 768  # n_inner is None: GPT2Block uses 4 x hidden
    assert intermediate_size(load_config("gpt2", n_inner=1000)) == 1000
    with pytest.raises(ValueError, match="names no MLP width"):
        intermediate_size(object())


def test_activation_bytes_for_gpt2_uses_four_times_the_hidden_size():
    gpt2 = load_config("gpt2")
    b, t = 1, 100
    stream = b * t * (2 * 768 + 3 * 4 * 768) * 2
    scores = 5 * b * 12 * t * t * 2
    assert activation_bytes(gpt2, b, t) == stream + scores


def test_kv_cache_uses_an_explicit_head_dim():
    gemma = load_config("gemma-2-2b")
    assert gemma.head_dim == 256 != gemma.hidden_size // gemma.num_attention_heads  # 256, not 2304 / 8 = 288
    assert kv_cache_bytes(gemma, 1, 1) == 2 * 26 * 4 * 256 * 2


def test_kv_cache_formula_matches_a_real_gemma2_cache():
    """Gemma-2 at toy size with head_dim 32 != hidden 64 / 4 heads: the formula counts what the cache holds
    (fewer tokens than its sliding window, so every layer keeps them all)."""
    config = load_config("gemma-2-2b", hidden_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, num_hidden_layers=2, vocab_size=256, query_pre_attn_scalar=32)
    layers, measured = real_cache(config, 256)
    assert tuple(layers[0].keys.shape) == (2, 2, 13, 32)
    assert measured == kv_cache_bytes(config, 2, 13, torch.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_eager_score_matrices_measured_here_are_covered(dtype):
    """The real eager_attention_forward, measured on this device, holds at most EAGER_SCORE_MATRICES[dtype]."""
    count = eager_score_matrices(dtype, tokens=128, heads=4, kv_heads=2, head_dim=32)
    assert count <= EAGER_SCORE_MATRICES[dtype] + 0.05
    assert count >= (1.9 if dtype == "float32" else 3.9)  # the float32 softmax adds at least two matrices' worth
    peak = measure_eager_attention(dtype, tokens=128, heads=4, kv_heads=2, head_dim=32)
    assert peak.score_matrices > count  # the q-sized tensors come on top at a small shape


# --- fit_report -----------------------------------------------------------------------------------------------------

def test_fit_report_70b_fp16_does_not_fit_an_a100(config_70b):
    report = fit_report(N_70B, "float16", "A100 80 GB", config=config_70b, batch_size=1, seq_len=4096,
                        model="Llama-2-70B")
    assert isinstance(report, FitReport) and not report.fits
    assert report.total_bytes == (weights_bytes(N_70B, "float16") + kv_cache_bytes(config_70b, 1, 4096)
                                  + activation_bytes(config_70b, 1, 4096))
    assert report.margin_bytes == 80 * GB - report.total_bytes
    assert "does NOT fit: short by 70.87 GB (66.00 GiB)" in repr(report)


def test_fit_report_int4_keeps_the_cache_in_float16(config_70b):
    report = fit_report(N_70B, "int4", gpu_by_name("A100 80 GB"), config=config_70b, batch_size=1, seq_len=4096)
    assert report.fits and report.weights_bytes == N_70B // 2
    assert report.kv_cache_bytes == kv_cache_bytes(config_70b, 1, 4096, "float16")
    assert "fits, 32.59 GB (30.35 GiB) to spare" in repr(report)


def test_fit_report_float32_computes_in_float32(config_70b):
    report = fit_report(N_70B, torch.float32, "H100 80 GB", config=config_70b, batch_size=1, seq_len=10)
    assert report.dtype == "float32"
    assert report.kv_cache_bytes == kv_cache_bytes(config_70b, 1, 10, "float32")
    assert [compute_dtype(d) for d in ("float32", "bf16", "int8", "int4")] == ["float32", "bfloat16", "float16",
                                                                                "float16"]


def test_fit_report_without_config_counts_weights_only():
    report = fit_report(7 * 10**9, "float16", GPU("my card", 16), seq_len=4096, batch_size=8)
    assert report.kv_cache_bytes == report.activation_bytes == 0 and not report.estimated_extras
    assert report.fits and report.margin_bytes == 2 * GB
    assert "not estimated" in repr(report)


def test_exercise_answers_of_notebook_01(config_70b):
    assert round(weights_bytes(EXACT["llama-2-13b"], "bfloat16") / GiB, 2) == 24.24
    largest = max(b for b in range(1, 65)
                  if fit_report(N_70B, "int4", "A100 80 GB", config=config_70b, batch_size=b, seq_len=4096).fits)
    assert largest == 3


# --- figures --------------------------------------------------------------------------------------------------------

def test_plot_model_sizes_draws_a_bar_per_model_and_dtype():
    fig = plot_model_sizes({"A": 7 * 10**9, "B": 70 * 10**9})
    try:
        ax = fig.axes[0]
        assert isinstance(fig, Figure)
        assert len(ax.patches) == 2 * len(BYTES_PER_PARAM)
        heights = sorted(p.get_height() for p in ax.patches)
        assert heights[-1] == pytest.approx(280) and heights[0] == pytest.approx(3.5)
        assert sorted({line.get_ydata()[0] for line in ax.lines}) == [16, 24, 40, 80]  # one line per size
        assert ax.get_yscale() == "log"
    finally:
        plt.close(fig)


def test_plot_kv_cache_draws_gqa_and_mha(config_70b):
    fig = plot_kv_cache(config_70b, [512, 4096], [1, 8], budgets={"A100 80 GB": 80 * GB})
    try:
        ax = fig.axes[0]
        curves = [line for line in ax.lines if len(line.get_xdata()) == 2 and line.get_label()[0] != "_"]
        assert len(curves) == 4  # GQA and MHA per batch size
        by_label = {line.get_label(): list(line.get_ydata()) for line in curves}
        gqa = by_label["batch 1, 8 KV heads (GQA)"]
        mha = by_label["batch 1, 64 KV heads (MHA)"]
        assert gqa[1] == pytest.approx(kv_cache_bytes(config_70b, 1, 4096) / GB)
        assert mha[1] == pytest.approx(8 * gqa[1])
        assert config_70b.num_key_value_heads == 8  # the plot's MHA variant did not change the config
    finally:
        plt.close(fig)
