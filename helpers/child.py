"""Run a function in a fresh child process: measured, optionally under a real memory cap.

A child process gives every experiment a clean baseline (nothing the notebook allocated earlier
counts), and an out-of-memory failure there can never take the notebook's kernel down.

The cap, and why this one:
* "data" (Linux, the default): `RLIMIT_DATA` caps the child's private writable memory: every
  tensor it allocates, and (since Linux 4.7) every private writable file mapping too. The loaders
  map files that way: `torch.load(mmap=True)` (torch/serialization.py, MAP_PRIVATE by default) and
  safetensors' `safe_open` both show up as `rw-p` in /proc/self/maps, so a mapped checkpoint
  counts in full while it is mapped. Shared and read-only mappings do not count. The naive load
  fails because it holds a whole model (and then a second copy); the dispatch path passes the
  same budget because it never does: accelerate's `load_checkpoint_in_model` maps one shard at a
  time and drops it before the next.
* "address-space": `RLIMIT_AS` caps every mapping, shared and read-only ones included. Shown for
  contrast.
* "watchdog" (macOS, Windows, where the OS enforces neither): the parent polls the child's
  resident memory and kills it when it crosses the budget. It is not a real allocation failure,
  and results say so.
* GPU: `torch.cuda.set_per_process_memory_fraction` makes the caching allocator refuse beyond
  the budget, raising the real `torch.OutOfMemoryError`.

Functions must be importable (defined in a module, such as `helpers`), because the child is
started with "spawn": a fresh interpreter, never a fork of a kernel that holds threads and a GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .measure import MemoryTimeline, MemoryTrace, read_host_memory
from .memory import format_bytes
from .paths import cache_dir

CAP_KINDS = ("data", "address-space", "watchdog")


@dataclass(frozen=True)
class MemoryCap:
    """A memory budget for a child: how many bytes its work may add, and how it is enforced."""

    budget_bytes: int
    kind: str = "data" if sys.platform.startswith("linux") else "watchdog"

    def __post_init__(self):
        if self.kind not in CAP_KINDS:
            raise ValueError(f"unknown cap kind {self.kind!r}; choose one of {CAP_KINDS}")
        if self.kind != "watchdog" and not sys.platform.startswith("linux"):
            raise ValueError(f"a {self.kind!r} cap needs Linux; on {sys.platform} use kind='watchdog'")
        if self.budget_bytes <= 0:
            raise ValueError(f"budget must be positive, got {self.budget_bytes}")

    @property
    def enforced_by(self) -> str:
        return {"data": "the kernel (RLIMIT_DATA)", "address-space": "the kernel (RLIMIT_AS)",
                "watchdog": "a watchdog that kills the child (no real allocation failure)"}[self.kind]


@dataclass
class ChildResult:
    """What came back from the child: its value or its real error, and its memory trace."""

    value: Any = None
    error_type: str | None = None
    error_message: str | None = None
    error_traceback: str | None = None
    exception: BaseException | None = None  # the real exception object, when it pickles
    trace: MemoryTrace | None = None
    exit_code: int | None = None
    killed_by_watchdog: bool = False
    cap: MemoryCap | None = None
    gpu_budget_bytes: int | None = None
    wall_seconds: float = 0.0
    output: str = ""  # what the child printed (progress bars, warnings), kept out of the notebook

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def reraise(self) -> None:
        """Raise the child's exception here, so the notebook shows the real error and traceback."""
        if self.ok:
            return
        if self.exception is not None:
            raise self.exception
        raise RuntimeError(f"{self.error_type}: {self.error_message}")

    def __repr__(self) -> str:
        status = "ok" if self.ok else f"FAILED with {self.error_type}: {_first_line(self.error_message)}"
        lines = [f"ChildResult({status}", f"  wall time {self.wall_seconds:.2f} s, exit code {self.exit_code}"]
        if self.cap:
            lines.append(f"  cap: {format_bytes(self.cap.budget_bytes)} on top of the child's start, "
                         f"enforced by {self.cap.enforced_by}")
        if self.gpu_budget_bytes:
            lines.append(f"  GPU budget: {format_bytes(self.gpu_budget_bytes)} "
                         "(torch.cuda.set_per_process_memory_fraction)")
        if self.trace is not None:
            lines.append(f"  {self.trace!r}")
        if self.error_type == "ChildDied" and self.output.strip():
            tail = self.output.strip().splitlines()[-8:]
            lines.append("  the child's last output:\n" + "\n".join(f"    {line}" for line in tail))
        return "\n".join(lines) + ")"


def _first_line(text: str | None, limit: int = 200) -> str:
    line = (text or "").strip().splitlines()[0] if text and text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _apply_cap(cap: MemoryCap | None) -> None:
    """In the child: cap what the work may add on top of what the process uses now."""
    if cap is None or cap.kind == "watchdog":
        return
    import resource

    # Only the soft limit is set, so it can be re-based when the measured work starts (after imports).
    if cap.kind == "data":
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (read_host_memory().data + cap.budget_bytes, hard))
    else:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + cap.budget_bytes, hard))


#: blocks this large and larger get a mapping of their own, returned to the OS when freed
MMAP_THRESHOLD = 128 * 1024


def return_freed_memory_promptly() -> bool:
    """Make glibc give freed blocks of 128 KiB and more straight back to the OS (fixed mmap threshold).

    By default glibc raises its mmap threshold after a large free, so later tensors come from the
    heap and freed ones stay counted there; under a cap, memory that the program already released
    would then still count. A GPU's caching allocator has the same habit (torch.cuda.empty_cache).
    Returns whether the threshold was set (False off Linux or without glibc: memory readings may stay flat).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


def _start_worker_threads() -> None:
    """Start torch's intra-op thread pool now, before any cap: its threads' stacks (8 MiB each) are
    private memory that RLIMIT_DATA counts, and a pool started under a cap fails to create them."""
    import torch

    torch.ones(2**20).add_(1)  # large enough for a parallel region on every core
    torch.ones(64, 64) @ torch.ones(64, 64)


def _apply_gpu_budget(budget: int | None) -> None:
    if budget is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("a GPU budget was given but this machine has no CUDA device")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)


def _redirect_output(log_path: str | None) -> None:
    """Send the child's stdout and stderr (file descriptors 1 and 2) to a log file the parent reads."""
    if log_path is None:
        return
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _child_main(conn, fn, args, kwargs, cap, gpu_budget, interval, log_path=None) -> None:
    _redirect_output(log_path)
    result = ChildResult(cap=cap, gpu_budget_bytes=gpu_budget)
    timeline = MemoryTimeline(interval=interval)
    timeline.on_reset.append(lambda: _apply_cap(cap))  # the budget starts where the measurement starts
    try:
        return_freed_memory_promptly()
        _start_worker_threads()
        _apply_gpu_budget(gpu_budget)
        # The sampler thread starts before the cap: its stack (as large as `ulimit -s`, 8 MiB on most Linux
        # machines) and its malloc arena are the measurement's memory, not the work's. Started under a small
        # cap, it failed with "can't start new thread" on a 16-core GPU host.
        with timeline:
            _apply_cap(cap)
            conn.send(("ready", psutil.Process().memory_info().rss))  # the watchdog's baseline
            try:
                result.value = (fn(*args, timeline=timeline, **kwargs) if _accepts_timeline(fn)
                                else fn(*args, **kwargs))
            except BaseException:
                timeline.mark("error raised")  # memory at the moment of failure
                raise
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        result.error_type = type(exc).__name__
        result.error_message = str(exc)
        result.error_traceback = traceback.format_exc()
        try:
            pickle.dumps(exc)
            result.exception = exc
        except Exception:  # noqa: BLE001 - an unpicklable exception is still reported as text
            pass
        result.value = None
    result.trace = timeline.trace
    conn.send(result)
    conn.close()


def _accepts_timeline(fn: Callable) -> bool:
    import inspect

    try:
        return "timeline" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_in_child(fn: Callable, *args, cap: MemoryCap | None = None, gpu_budget_bytes: int | None = None,
                 interval: float = 0.002, timeout: float | None = 600, **kwargs) -> ChildResult:
    """Run `fn(*args, **kwargs)` in a fresh process and return its value or error, and its memory trace.

    If `fn` takes a `timeline` argument it receives the child's MemoryTimeline, to `mark` phases.
    `cap` limits host memory (see MemoryCap); `gpu_budget_bytes` limits CUDA memory on cuda:0.
    """
    if getattr(fn, "__module__", None) in (None, "__main__") or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"{getattr(fn, '__qualname__', fn)!r} is defined in the notebook; the child process "
                         "cannot import it. Put it in a module (e.g. a .py file next to the notebook) and import it.")
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    log_fd, log_path = tempfile.mkstemp(prefix="child-", suffix=".log", dir=cache_dir("child-logs"))
    os.close(log_fd)
    process = ctx.Process(target=_child_main, name=f"child:{fn.__qualname__}",
                          args=(send, fn, args, kwargs, cap, gpu_budget_bytes, interval, log_path))
    start = time.perf_counter()
    process.start()
    send.close()
    watchdog = _Watchdog(process.pid, cap) if cap is not None and cap.kind == "watchdog" else None
    result = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while receive.poll(None if deadline is None else max(0.0, deadline - time.monotonic())):
            message = receive.recv()
            if isinstance(message, ChildResult):
                result = message
                break
            if watchdog:  # ("ready", rss): the child's imports are done, the budget starts here
                watchdog.baseline = message[1]
    except EOFError:
        result = None  # the child died before sending anything (killed)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
        if watchdog:
            watchdog.stop()
    if result is None:
        result = ChildResult(cap=cap, gpu_budget_bytes=gpu_budget_bytes)
        if watchdog and watchdog.fired:
            result.killed_by_watchdog = True
            result.error_type = "WatchdogKill"
            result.error_message = (f"the watchdog killed the child at {format_bytes(watchdog.seen)} resident, "
                                    f"over the budget (an emulated OOM: this OS does not enforce the cap)")
            result.trace = watchdog.trace
        else:
            result.error_type = "ChildDied"
            result.error_message = (f"the child exited with code {process.exitcode} without a result "
                                    "(killed by a signal, or timed out)")
    result.exit_code = process.exitcode
    result.wall_seconds = time.perf_counter() - start
    log = Path(log_path)
    result.output = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    return result


class _Watchdog:
    """Parent-side poller that kills the child once its RSS exceeds its start plus the budget."""

    def __init__(self, pid: int, cap: MemoryCap, interval: float = 0.005):
        self.process = psutil.Process(pid)
        self.cap, self.interval = cap, interval
        self.fired, self.seen = False, 0
        self.baseline: int | None = None  # set when the child reports it is ready
        self.trace = MemoryTrace()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.interval):
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.trace.t.append(time.perf_counter() - start)
            self.trace.anon.append(rss)
            self.trace.file.append(0)
            self.trace.data.append(0)
            self.trace.cuda.append(0)
            if self.baseline is not None and rss - self.baseline > self.cap.budget_bytes:
                self.fired, self.seen = True, rss
                self.process.kill()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
