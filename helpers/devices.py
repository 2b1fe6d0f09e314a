"""What this machine has: GPUs and their memory, RAM, free disk."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from .memory import format_bytes
from .paths import cache_dir


@dataclass(frozen=True)
class GPUInfo:
    """One visible CUDA device."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int

    def __repr__(self) -> str:
        return (f"GPUInfo(cuda:{self.index} {self.name}, total {format_bytes(self.total_bytes, 'GiB')}, "
                f"free {format_bytes(self.free_bytes, 'GiB')})")


@dataclass(frozen=True)
class Hardware:
    """A snapshot of the memory tiers a device map can use: GPU(s), CPU RAM, disk."""

    system: str
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    disk_path: str
    gpus: tuple[GPUInfo, ...] = field(default_factory=tuple)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def __repr__(self) -> str:
        gpus = "\n".join(f"    {g!r}," for g in self.gpus) or "    none,"
        return ("Hardware(\n"
                f"  system: {self.system}, {self.cpu_count} CPU cores\n"
                f"  RAM:    {format_bytes(self.ram_total_bytes, 'GiB')} total, "
                f"{format_bytes(self.ram_available_bytes, 'GiB')} available\n"
                f"  disk:   {format_bytes(self.disk_free_bytes, 'GiB')} free at {self.disk_path}\n"
                f"  GPUs:\n{gpus}\n)")


def gpus() -> tuple[GPUInfo, ...]:
    """The visible CUDA devices with their total and currently free memory (empty without CUDA)."""
    if not torch.cuda.is_available():
        return ()
    found = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        found.append(GPUInfo(i, torch.cuda.get_device_name(i), total, free))
    return tuple(found)


def detect_hardware(disk_path: str | Path | None = None) -> Hardware:
    """Detect GPUs, RAM and the free disk where the suite's cache (the offload tier) lives."""
    path = Path(disk_path) if disk_path else cache_dir()
    vm = psutil.virtual_memory()
    return Hardware(
        system=f"{platform.system()} {platform.machine()}",
        cpu_count=psutil.cpu_count(logical=True) or 1,
        ram_total_bytes=vm.total,
        ram_available_bytes=vm.available,
        disk_free_bytes=shutil.disk_usage(path).free,
        disk_path=str(path),
        gpus=gpus(),
    )


def default_device() -> torch.device:
    """cuda:0 when a GPU is present, else the CPU: the device the notebooks compute on."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
