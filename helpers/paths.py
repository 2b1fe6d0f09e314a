"""Where the suite keeps committed data and its own (git-ignored) cache."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
CONFIGS_DIR = DATA_DIR / "configs"
RESULTS_DIR = DATA_DIR / "results"

#: Environment variable that moves the cache (generated checkpoints, offload folders).
CACHE_ENV = "BIGMODEL_CACHE"


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder inside the suite's cache: `$BIGMODEL_CACHE` or `<repo>/.cache`.

    Every file the helpers write goes under this folder, never anywhere else.
    """
    root = Path(os.environ.get(CACHE_ENV, REPO_ROOT / ".cache"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
