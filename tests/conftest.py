import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # so spawned children can import tests' workloads


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the suite's cache at a temporary folder for this test."""
    monkeypatch.setenv("BIGMODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
