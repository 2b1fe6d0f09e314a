"""A budget smaller than the largest layer gets a clear error before anything is loaded."""

import pytest
import torch

from helpers.device_maps import BudgetError, check_budget
from helpers.models import load_config, meta_model

LAYER_BYTES = 4 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)  # q, k, v, o + gate, up, down + two norms, float32


@pytest.fixture(scope="module")
def model():
    config = load_config("llama-2-70b", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
    return meta_model(config, dtype=torch.float32)


def test_budget_below_the_largest_layer_is_refused_clearly(model):
    with pytest.raises(BudgetError, match=r"budget for CPU .* smaller than the largest layer, model\.layers\.0"):
        check_budget(model, {"cpu": LAYER_BYTES - 1})
    with pytest.raises(BudgetError, match="budget for GPU 0"):
        check_budget(model, {0: 1000, "cpu": 10**9})


def test_budget_that_holds_the_largest_layer_passes(model):
    assert check_budget(model, {"cpu": LAYER_BYTES}) == LAYER_BYTES
    assert check_budget(model, {0: LAYER_BYTES // 2, "cpu": 10**9}, dtype=torch.float16) == LAYER_BYTES // 2


def test_missing_execution_budget(model):
    with pytest.raises(BudgetError, match="no budget"):
        check_budget(model, {"disk": 10**9})
