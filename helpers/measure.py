"""Memory over time: host memory split into anonymous and file-backed pages, and CUDA memory.

Why the split: a tensor read with `torch.load` lives in *anonymous* memory (it exists nowhere
else), while a memory-mapped safetensors file shows up as *file-backed* pages that the kernel can
drop and re-read at any time. Total RSS makes an mmap-loaded model look as expensive as a copied
one; "used" memory as `free` reports it makes it look free. Only the split tells the truth.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from .memory import format_bytes

_HAS_PROC = Path("/proc/self/status").exists()


@dataclass(frozen=True)
class HostMemory:
    """One reading of a process's host memory, in bytes."""

    anon: int  # private memory: the process's own tensors, heaps, stacks
    file: int  # pages of mapped files (mmap'ed checkpoints, shared libraries)
    data: int  # VmData: what RLIMIT_DATA counts (private writable mappings, used or not)
    hwm: int  # the kernel's high-water mark of total RSS (VmHWM)


def read_host_memory(pid: int | None = None) -> HostMemory:
    """Read a process's memory from /proc (Linux); elsewhere only total RSS is known, as `anon`."""
    pid = pid or os.getpid()
    if not _HAS_PROC:
        rss = psutil.Process(pid).memory_info().rss
        return HostMemory(anon=rss, file=0, data=0, hwm=0)
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmData", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return HostMemory(anon=values.get("RssAnon", 0),
                      file=values.get("RssFile", 0) + values.get("RssShmem", 0),
                      data=values.get("VmData", 0), hwm=values.get("VmHWM", 0))


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM for this process (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@dataclass
class MemoryTrace:
    """Samples of memory over time, with labelled marks ("random init", "torch.load", ...)."""

    t: list[float] = field(default_factory=list)  # seconds since the start
    anon: list[int] = field(default_factory=list)
    file: list[int] = field(default_factory=list)
    data: list[int] = field(default_factory=list)  # VmData: private memory reserved, touched or not
    cuda: list[int] = field(default_factory=list)  # torch.cuda.memory_allocated(), 0 without CUDA
    marks: list[tuple[float, str]] = field(default_factory=list)
    kernel_peak_rss: int = 0  # VmHWM at the end (exact, not sampled); 0 where unknown
    cuda_peak: int = 0  # torch.cuda.max_memory_allocated() over the traced span
    platform: str = sys.platform

    @property
    def baseline_anon(self) -> int:
        return self.anon[0] if self.anon else 0

    @property
    def peak_anon(self) -> int:
        """Highest sampled anonymous memory (absolute)."""
        return max(self.anon, default=0)

    @property
    def peak_anon_delta(self) -> int:
        """Highest anonymous memory above where the trace started: what the traced code added."""
        return self.peak_anon - self.baseline_anon

    @property
    def peak_data_delta(self) -> int:
        """Highest reserved private memory (VmData, what RLIMIT_DATA counts) above the start."""
        return max(self.data, default=0) - (self.data[0] if self.data else 0)

    @property
    def peak_file(self) -> int:
        return max(self.file, default=0)

    @property
    def peak_cuda(self) -> int:
        return max(self.cuda_peak, max(self.cuda, default=0))

    @property
    def duration(self) -> float:
        return self.t[-1] if self.t else 0.0

    def at(self, label: str, series: str = "data") -> int:
        """The sample taken with the first mark of this label, from one series ("anon", "file", "data", "cuda")."""
        return getattr(self, series)[self.t.index(self.time_of(label))]

    def time_of(self, label: str) -> float:
        """Time of the first mark with this label."""
        for t, name in self.marks:
            if name == label:
                return t
        raise KeyError(f"no mark {label!r}; marks: {[m for _, m in self.marks]}")

    def __repr__(self) -> str:
        parts = [f"{len(self.t)} samples over {self.duration:.2f} s",
                 f"peak anonymous {format_bytes(self.peak_anon)} (+{format_bytes(self.peak_anon_delta)} "
                 "over the start)",
                 f"peak file-backed {format_bytes(self.peak_file)}"]
        if self.kernel_peak_rss:
            parts.append(f"kernel peak RSS {format_bytes(self.kernel_peak_rss)}")
        if self.peak_cuda:
            parts.append(f"peak CUDA {format_bytes(self.peak_cuda)}")
        return "MemoryTrace(" + ", ".join(parts) + ")"


class MemoryTimeline:
    """Context manager sampling this process's memory on a background thread.

    >>> with MemoryTimeline() as timeline:
    ...     x = torch.ones(2**27)          # 512 MiB of float32
    ...     timeline.mark("allocated")
    >>> timeline.trace.peak_anon_delta     # about 512 MiB
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.trace = MemoryTrace()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.on_reset: list = []  # callables run at reset(), e.g. re-basing a memory cap after warm-up

    def sample(self) -> None:
        """Take one sample now (also called by the background thread)."""
        host = read_host_memory()
        cuda = torch.cuda.memory_allocated() if _cuda_active() else 0
        with self._lock:
            self.trace.t.append(time.perf_counter() - self._t0)
            self.trace.anon.append(host.anon)
            self.trace.file.append(host.file)
            self.trace.data.append(host.data)
            self.trace.cuda.append(cuda)

    def mark(self, label: str) -> None:
        """Label this moment (a phase boundary) and sample it."""
        self.sample()
        self.trace.marks.append((self.trace.t[-1], label))

    def reset(self) -> None:
        """Forget everything so far and start again from here (after imports and warm-up)."""
        for callback in self.on_reset:
            callback()
        with self._lock:
            self.trace = MemoryTrace()
            reset_peak_rss()
            if _cuda_active():
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()
        self.mark("start")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryTimeline:
        reset_peak_rss()
        if _cuda_active():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-timeline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if _cuda_active():
            torch.cuda.synchronize()
        self._stop.set()
        self._thread.join()
        self.sample()
        self.trace.kernel_peak_rss = read_host_memory().hwm
        if _cuda_active():
            self.trace.cuda_peak = torch.cuda.max_memory_allocated()
