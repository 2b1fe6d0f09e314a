import sys
from pathlib import Path

import pytest
import torch

from helpers.checkpoints import make_checkpoint
from helpers.models import load_config

sys.path.insert(0, str(Path(__file__).parent))  # so spawned children can import tests' workloads


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the suite's cache at a temporary folder for this test."""
    monkeypatch.setenv("BIGMODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


#: A Llama small enough to dispatch, trace and offload in a fraction of a second (grouped-query attention kept).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=500)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config and its checkpoint, written once per test module into a temporary cache."""
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIGMODEL_CACHE", str(root / "cache"))
        config = load_config("llama-2-70b", **TINY_LLAMA)
        checkpoint = make_checkpoint(config)
    return config, checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
