"""Functions the child-process tests run (they must be importable by a spawned child)."""

from __future__ import annotations

import os

import torch


def allocate(nbytes: int, timeline=None) -> int:
    """Allocate and touch `nbytes` of anonymous memory; return how many bytes were allocated."""
    block = torch.ones(nbytes // 4, dtype=torch.float32)  # ones: every page is written
    if timeline is not None:
        timeline.mark("allocated")
    return block.numel() * 4


def fail_with(message: str) -> None:
    raise ValueError(message)


def map_file(path: str, timeline=None) -> float:
    """Memory-map a file and read every byte of it (file-backed pages, no private copy)."""
    data = torch.from_file(path, shared=True, size=os.path.getsize(path) // 4, dtype=torch.float32)
    total = float(data.sum())
    if timeline is not None:
        timeline.mark("read")  # sample while the mapping is alive
    return total
