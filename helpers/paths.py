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


class FolderError(OSError):
    """A folder the suite wants to write to is unusable (not writable, or too little free space)."""


def offload_dir(name: str, needed_bytes: int = 0) -> Path:
    """A fresh, empty offload folder inside the cache, checked for writing and for `needed_bytes` of free space.

    Emptying it is safe: it lies inside the suite's own cache. Anything else is never deleted.
    """
    import shutil

    if not name or any(part in ("", ".", "..") for part in Path(name).parts) or Path(name).is_absolute():
        raise ValueError(f"offload folder name must be a plain relative name, got {name!r}")
    root = cache_dir("offload")
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    return checked_folder(path, needed_bytes)


def checked_folder(path: str | Path, needed_bytes: int = 0) -> Path:
    """Create `path` if needed and check it can be written and has `needed_bytes` free; clear errors if not."""
    import shutil
    import tempfile

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise FolderError(f"cannot write to {path} ({exc.strerror or exc}); choose a folder you own, for example "
                          f"one under {cache_dir()}") from exc
    free = shutil.disk_usage(path).free
    if needed_bytes and free < needed_bytes:
        raise FolderError(f"{path} has {free / 2**30:.2f} GiB free but the offloaded weights need "
                          f"{needed_bytes / 2**30:.2f} GiB; free some space or point the offload folder elsewhere")
    return path
