"""Unit tests for helpers.widgets: the memory calculator reacts to its controls, headless."""

import html

import pytest
import torch

from helpers.memory import BYTES_PER_PARAM, COMMON_GPUS, GB, GPU, fit_report, kv_cache_bytes
from helpers.models import load_config, meta_model
from helpers.quantization import predict_footprint
from helpers.widgets import (
    APP_CLASS,
    CUSTOM,
    DESCRIPTIONS,
    RESULT_CLASS,
    STORED_FORMATS,
    markdown_table,
    memory_calculator,
    report_html,
)

N_70B = 68_976_648_192


@pytest.fixture(scope="module")
def models():
    """Pre-counted models, so each test skips building meta models (llama2_models is tested once below)."""
    return {"Llama-2-7B": (6_738_415_616, load_config("llama-2-7b")),
            "Llama-2-70B": (N_70B, load_config("llama-2-70b"))}


def test_default_models_are_the_three_llama2_sizes_with_exact_counts():
    app = memory_calculator()
    assert {name: n for name, (n, _) in app.models.items()} == {
        "Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "Llama-2-70B": N_70B}
    assert list(app.model.options) == ["Llama-2-7B", "Llama-2-13B", "Llama-2-70B", CUSTOM]


def test_initial_state_is_70b_fp16_on_an_a100(models):
    app = memory_calculator(models)
    assert (app.model.value, app.dtype.value, app.gpu.value) == ("Llama-2-70B", "float16", "A100 80 GB")
    assert app.report == fit_report(N_70B, "float16", "A100 80 GB", config=models["Llama-2-70B"][1],
                                    batch_size=1, seq_len=4096, model="Llama-2-70B")
    assert not app.report.fits
    assert "does NOT fit" in app.result.value


def test_controls_have_stable_descriptions_and_classes(models):
    app = memory_calculator(models)
    controls = {"model": app.model, "custom_params": app.custom_params, "dtype": app.dtype, "gpu": app.gpu,
                "seq_len": app.seq_len, "batch_size": app.batch_size, "result": app.result}
    assert {key: w.description for key, w in controls.items()} == DESCRIPTIONS
    assert RESULT_CLASS in app.result._dom_classes and APP_CLASS in app._dom_classes
    assert list(app.children) == list(controls.values())


def test_changing_dtype_updates_report_and_output(models):
    app = memory_calculator(models)
    before = app.result.value
    app.dtype.value = "int4"
    assert app.report.dtype == "int4" and app.report.fits
    assert app.result.value != before
    assert "fits, 32.59 GB (30.35 GiB) to spare" in app.result.value


def test_sliders_drive_the_kv_cache(models):
    app = memory_calculator(models)
    config = models["Llama-2-70B"][1]
    app.batch_size.value = 8
    app.seq_len.value = 512
    assert app.report.kv_cache_bytes == kv_cache_bytes(config, 8, 512)
    assert "batch 8 x 512 tokens" in app.result.value


def test_gpu_dropdown_changes_the_budget(models):
    app = memory_calculator(models)
    app.model.value = "Llama-2-7B"
    app.gpu.value = "T4 16 GB"
    app.seq_len.value = 0
    assert app.report.gpu.memory_bytes == 16 * GB
    assert app.report.fits  # 13.48 GB of fp16 weights on a 16 GB card, no context


def test_custom_parameter_count(models):
    app = memory_calculator(models)
    assert app.custom_params.disabled
    app.model.value = CUSTOM
    assert not app.custom_params.disabled
    app.custom_params.value = 30.0
    assert app.report.n_params == 30 * 10**9
    assert app.report.weights_bytes == 60 * GB and app.report.kv_cache_bytes == 0
    assert "not estimated" in app.result.value
    app.model.value = "Llama-2-7B"
    assert app.custom_params.disabled and app.report.n_params == 6_738_415_616


def test_custom_gpu_list(models):
    gpus = (GPU("tiny card", 1),)
    app = memory_calculator(models, gpus=gpus)
    assert app.gpu.value == "tiny card" and app.report.gpu == gpus[0]
    assert len(COMMON_GPUS) == 5  # the default list is untouched


def test_report_html_escapes_and_colours():
    report = fit_report(10**9, "float16", GPU("<b>card</b>", 1))
    html = report_html(report)
    assert "&lt;b&gt;card&lt;/b&gt;" in html and "<b>card</b>" not in html
    assert "#cf222e" in html  # 2 GB on a 1 GB card: red


def test_markdown_table_aligns_numbers_right():
    table = markdown_table(["model", "GB"], [["7B", "13.48"], ["70B", "1,137.95"]]).data
    lines = table.splitlines()
    assert lines[0] == "| model | GB |"
    assert lines[1] == "|:---|---:|"
    assert lines[3] == "| 70B | 1,137.95 |"


# --- the formats as bitsandbytes stores them, beside 01's bytes per parameter ------------------------------------

def test_dtype_lists_01s_entries_then_the_stored_formats(models):
    app = memory_calculator(models)
    assert list(app.dtype.options) == [*BYTES_PER_PARAM, *STORED_FORMATS]
    assert set(STORED_FORMATS.values()) == {"int8", "nf4", "nf4-dq"}


@pytest.mark.parametrize("label", list(STORED_FORMATS))
@pytest.mark.parametrize("name", ["Llama-2-7B", "Llama-2-70B"])
def test_a_stored_format_prices_the_weights_as_predict_footprint(models, name, label):
    app = memory_calculator(models)
    app.model.value = name
    app.dtype.value = label
    config = models[name][1]
    stored = predict_footprint(meta_model(config, torch.float16), STORED_FORMATS[label])
    assert app.report.weights_bytes == stored.total and app.footprint == stored
    assert app.report.kv_cache_bytes == kv_cache_bytes(config, 1, 4096, "float16")  # the cache stays float16
    assert "as stored" in app.result.value and "left in float16" in app.result.value


def test_llama_70b_fits_an_a100_in_nf4_not_in_float16(models):
    app = memory_calculator(models)
    assert (app.model.value, app.gpu.value, app.seq_len.value) == ("Llama-2-70B", "A100 80 GB", 4096)
    assert not app.report.fits  # float16
    app.dtype.value = "NF4 (bitsandbytes)"
    assert app.report.fits and app.report.dtype == "nf4"


def test_01s_int8_and_int4_stay_bytes_times_parameters_and_show_the_stored_difference(models):
    app = memory_calculator(models)
    app.dtype.value = "int4"
    assert app.report.weights_bytes == N_70B // 2  # 01's lesson: 0.5 byte per parameter
    stored = app.footprint.total
    assert app.footprint.format == "nf4" and stored > app.report.weights_bytes
    assert f"{stored / (N_70B / 2) - 1:+.1%} over 01's 0.5 byte per parameter" in html.unescape(app.result.value)
    app.dtype.value = "int8"
    assert app.report.weights_bytes == N_70B and app.footprint.format == "int8"
    assert "01's arithmetic: every parameter at 1 byte" in html.unescape(app.result.value)


def test_a_stored_format_needs_a_named_model(models):
    app = memory_calculator(models)
    app.model.value = CUSTOM
    app.dtype.value = "NF4 (bitsandbytes)"
    assert app.report is None and "needs the model" in app.result.value
    app.model.value = "Llama-2-7B"
    assert app.report.weights_bytes == predict_footprint(meta_model(models["Llama-2-7B"][1], torch.float16),
                                                         "nf4").total
