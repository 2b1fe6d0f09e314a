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


def load_mapped(path: str, loader: str, timeline=None) -> list[str]:
    """Map a checkpoint the way the loaders do and read it; return its lines from /proc/self/maps.

    loader "torch": `torch.load(path, mmap=True)` (torch/serialization.py: MAP_PRIVATE unless
    `torch.serialization.set_default_mmap_options` says otherwise); "safetensors": `safe_open(...).get_tensor`.
    """
    if loader == "torch":
        tensors = torch.load(path, mmap=True, weights_only=True)
    else:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    total = sum(float(t.sum()) for t in tensors.values())
    if timeline is not None:
        timeline.mark(f"read {total}")
    with open("/proc/self/maps") as maps:
        return [line.strip() for line in maps if os.path.basename(path) in line]
