"""Unit tests for helpers.quantization: the stored-bytes arithmetic against bitsandbytes and torchao, quality, plots."""

import json

import pytest
import torch
from matplotlib.figure import Figure
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, TorchAoConfig

from helpers.memory import fit_report
from helpers.models import load_config, meta_model
from helpers.paths import DATA_DIR
from helpers.quantization import (
    FORMATS,
    Footprint,
    held_out_text,
    linear_weight_bytes,
    load_speed_results,
    logit_error,
    measure_footprint,
    perplexity,
    plot_speed,
    predict_footprint,
    quantized_fit_report,
    quantized_linear_names,
    relative_difference,
)

TINY = DATA_DIR / "tiny-llama"


def small_config():
    return LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)


def quantization_config(fmt):
    from torchao.quantization import Int8WeightOnlyConfig

    return {"int8": BitsAndBytesConfig(load_in_8bit=True),
            "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True),
            "torchao-int8": TorchAoConfig(Int8WeightOnlyConfig())}.get(fmt)


def test_linear_weight_bytes_by_hand():
    assert linear_weight_bytes(256, 768, "float32") == (256 * 768 * 4, 0)
    assert linear_weight_bytes(256, 768, "float16") == (256 * 768 * 2, 0)
    assert linear_weight_bytes(256, 768, "int8") == (256 * 768, 256 * 4)  # + float32 SCB per row
    assert linear_weight_bytes(256, 768, "torchao-int8") == (256 * 768, 256 * 5)  # float32 scale + int8 zero point
    blocks = 256 * 768 // 64
    assert linear_weight_bytes(256, 768, "nf4") == (256 * 768 // 2, blocks * 4 + 16 * 4)
    assert linear_weight_bytes(256, 768, "nf4-dq") == (256 * 768 // 2, blocks + 4 * 12 + 256 * 4 + 4 + 16 * 4)
    with pytest.raises(ValueError, match="unknown format"):
        linear_weight_bytes(2, 2, "int3")


def test_quantized_linears_skip_the_head_not_the_blocks():
    model = meta_model(small_config())
    names = quantized_linear_names(model)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert all(".layers." in n for n in names)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prediction_equals_the_bytes_the_libraries_store(tmp_path, fmt):
    """The arithmetic, from shapes only, gives exactly the bytes of the tensors a quantised load holds."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(small_config()).save_pretrained(tmp_path)
    dtype = torch.float32 if fmt == "float32" else torch.float16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, quantization_config=quantization_config(fmt))
    measured = measure_footprint(loaded, fmt)
    predicted = predict_footprint(meta_model(small_config()), fmt, dtype=torch.float16)
    assert predicted == measured, (predicted, measured)
    if fmt in ("int8", "nf4", "nf4-dq"):  # get_memory_footprint counts parameters and buffers, not SCB/absmax
        assert loaded.get_memory_footprint() == measured.total - measured.scales


def test_footprint_adds_up_and_prints():
    fp = Footprint("nf4", 100, 20, 30, 4)
    assert fp.total == 154 and "nf4" in repr(fp)
    assert relative_difference(105, 100) == pytest.approx(0.05)


def test_llama_70b_as_the_libraries_store_it():
    model = meta_model(load_config("llama-2-70b"))
    n = sum(p.numel() for p in model.parameters())
    f16, int8, nf4, dq = (predict_footprint(model, f).total for f in ("float16", "int8", "nf4", "nf4-dq"))
    assert f16 == 2 * n + sum(b.numel() * b.element_size() for b in model.buffers())
    assert n < int8 < 1.02 * n  # the head and embeddings stay float16, plus one float32 per row
    assert 0.5 * n < dq < nf4 < 0.6 * n  # absmax: 4 bytes per 64 weights = 0.0625 bytes per weight
    report = quantized_fit_report(model, load_config("llama-2-70b"), "nf4", "A100 80 GB", seq_len=4096)
    plain = fit_report(n, "int4", "A100 80 GB", config=load_config("llama-2-70b"), seq_len=4096)
    assert report.weights_bytes == nf4 and report.kv_cache_bytes == plain.kv_cache_bytes and report.fits


def test_held_out_text_is_what_training_left_out():
    texts, about = held_out_text(TINY / "training_log.json")
    assert about["held_out_topics"] == ["for", "while", "try"] and len(texts) == 3
    assert about["same_corpus"] == (about["python"] == about["trained_on"])
    assert "while" in texts[1] and all(len(t) > 500 for t in texts)


def test_perplexity_of_a_uniform_model_is_the_vocabulary():
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 50)})()

    assert perplexity(Uniform(), torch.randint(0, 50, (100,)), context=16) == pytest.approx(50)


def test_logit_error():
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    err = logit_error(ref + torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]), ref)
    assert err.max_abs == 5.0 and err.top1_agreement == 0.5 and "relative" in repr(err)
    assert logit_error(ref, ref).relative == 0


def test_speed_results_load_and_plot(tmp_path):
    assert load_speed_results(tmp_path) == []
    runs = [{"format": f, "batch_size": b, "tokens_per_s": 10.0 * b} for f in ("float16", "int8", "nf4")
            for b in (1, 32)]
    (tmp_path / "quantization-test-card.json").write_text(json.dumps(
        {"card": "Test card", "model": "replica", "runs": runs, "versions": {}}))
    results = load_speed_results(tmp_path)
    assert [r["card"] for r in results] == ["Test card"]
    fig = plot_speed(results)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == 6


def test_tiny_llama_config_is_what_the_notebook_assumes():
    config = AutoConfig.from_pretrained(TINY)
    assert not config.tie_word_embeddings  # the head is its own tensor: it stays float, as does the embedding


def test_stored_skeleton_sizes_each_quantised_weight_at_its_stored_bytes():
    from accelerate.utils import compute_module_sizes

    from helpers.quantization import stored_skeleton

    model = meta_model(small_config(), torch.float16)
    for fmt in ("int8", "nf4", "nf4-dq"):
        stored = stored_skeleton(model, fmt)
        sizes = compute_module_sizes(stored, dtype=torch.float16)  # what accelerate's planner reads
        out_features, in_features = model.model.layers[0].mlp.down_proj.weight.shape
        assert sizes["model.layers.0.mlp.down_proj"] == sum(linear_weight_bytes(out_features, in_features, fmt))
        assert sizes["lm_head"] == model.lm_head.weight.numel() * 2  # left in float16, as transformers leaves it
        predicted = predict_footprint(model, fmt)
        assert sum(p.numel() * p.element_size() for p in stored.parameters()) == predicted.total - predicted.buffers
        assert stored.stored_format == fmt
    assert all(p.dtype == torch.float16 for p in model.parameters())  # the original is untouched


def test_stored_skeleton_refuses_what_it_cannot_plan():
    from helpers.quantization import stored_skeleton

    with pytest.raises(ValueError, match="bitsandbytes format"):
        stored_skeleton(meta_model(small_config()), "torchao-int8")
    with pytest.raises(ValueError, match="meta skeleton"):
        stored_skeleton(AutoModelForCausalLM.from_config(small_config()), "nf4")
    with pytest.raises(ValueError, match="Conv1D"):  # GPT-2: transformers quantises its Conv1D layers too
        stored_skeleton(meta_model(load_config("gpt2")), "nf4")
    with pytest.raises(ValueError, match="already sized"):
        stored_skeleton(stored_skeleton(meta_model(small_config()), "nf4"), "int8")


# --- the decision of notebook 09: load_kwargs, quality_costs, scaled_speed ---


def test_load_kwargs_are_what_notebook_12_loads_with():
    from helpers.quantization import load_kwargs

    assert load_kwargs("float32") == {"dtype": torch.float32} and load_kwargs("float16") == {"dtype": torch.float16}
    int8, nf4, dq = (load_kwargs(f)["quantization_config"] for f in ("int8", "nf4", "nf4-dq"))
    assert int8.load_in_8bit and nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert not nf4.bnb_4bit_use_double_quant and dq.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float16 and load_kwargs("nf4")["dtype"] == torch.float16
    assert type(load_kwargs("torchao-int8")["quantization_config"]).__name__ == "TorchAoConfig"
    with pytest.raises(ValueError, match="unknown format"):
        load_kwargs("int3")


def test_quality_costs_against_float32(tmp_path):
    from helpers.quantization import quality_costs

    torch.manual_seed(0)
    replica = tmp_path / "replica"
    AutoModelForCausalLM.from_config(small_config()).save_pretrained(replica)
    costs = quality_costs(["float32", "float16", "int8"], TINY, replica, tokens=8)
    assert costs["float32"].perplexity_change == 0 and costs["float32"].replica.relative == 0
    assert abs(costs["float16"].perplexity_change) < 0.005 and costs["float16"].replica.relative < 0.01
    assert 0 < costs["int8"].replica.relative < 0.1 and "int8" in repr(costs["int8"])


def speed_result(card="NVIDIA H200"):
    return {"card": card, "model": "llama-2-7b", "loads": {"nf4": {"stored_bytes": 4 * 10**9}},
            "runs": [{"format": "nf4", "batch_size": 1, "tokens_per_s": 50.0},
                     {"format": "nf4", "batch_size": 32, "tokens_per_s": 800.0}]}


def test_scaled_speed_scales_by_stored_bytes_and_bandwidth():
    from helpers.planner import DATASHEET_MEMORY_BANDWIDTH
    from helpers.quantization import card_memory_bandwidth, scaled_speed

    a100 = DATASHEET_MEMORY_BANDWIDTH["A100 80 GB"]
    assert card_memory_bandwidth("NVIDIA H200") == 4.8e12 and card_memory_bandwidth("NVIDIA A100-SXM4-80GB") == a100
    assert card_memory_bandwidth("NVIDIA H100 80GB HBM3") == DATASHEET_MEMORY_BANDWIDTH["H100 80 GB"]
    assert card_memory_bandwidth("Some other card") is None
    one = scaled_speed(speed_result(), "nf4", 1, 40 * 10**9, a100)
    assert one.measured_seconds_per_step == pytest.approx(0.02)
    assert one.seconds_per_step == pytest.approx(0.02 * 10 * 4.8e12 / a100)  # 10x the bytes, a slower card
    assert one.tokens_per_s == pytest.approx(1 / one.seconds_per_step) and "NVIDIA H200" in repr(one)
    batch = scaled_speed(speed_result(), "nf4", 32, 40 * 10**9, a100)
    assert batch.tokens_per_s == pytest.approx(800.0 / 10 / (4.8e12 / a100))
    # nothing measured to scale: no such format or batch, or a card whose bandwidth is not known
    assert scaled_speed(speed_result(), "int8", 1, 1, a100) is None
    assert scaled_speed(speed_result(), "nf4", 8, 1, a100) is None
    assert scaled_speed(speed_result("Some other card"), "nf4", 1, 1, a100) is None
