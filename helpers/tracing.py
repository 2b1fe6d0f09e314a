"""Record what accelerate's hooks do at inference: which module, which weights, where they are, when, and memory.

accelerate attaches an `AlignDevicesHook` to modules (as `module._hf_hook`); the module's forward
becomes `pre_forward -> the original forward -> post_forward`. `trace_hooks(model)` wraps each
hook's `pre_forward` and `post_forward` with a recorder, for as long as the `with` block lasts,
and puts the hooks back as they were on exit. Nothing about what the hooks do is changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, named_module_tensors

from .measure import read_host_memory
from .memory import format_bytes


@dataclass(frozen=True)
class HookEvent:
    """One call of a hook's pre_forward or post_forward, with where the module's weights were before and after."""

    module: str  # the module's name in the model ("" is the model itself)
    phase: str  # "pre_forward" or "post_forward"
    start: float  # seconds since the trace began
    end: float
    offload: bool  # the hook's `offload`: does it load weights before the forward and drop them after?
    execution_device: str
    weights_before: str  # device(s) of the tensors this hook manages: "meta", "cpu", "cuda:0"; "" when it has none
    weights_after: str
    weight_bytes: int  # bytes of those tensors (what a load moves)
    host_before: int  # anonymous host memory of this process (RssAnon), bytes
    host_after: int
    cuda_before: int  # torch.cuda.memory_allocated(); 0 without CUDA
    cuda_after: int

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def host_change(self) -> int:
        """Anonymous host memory after the call minus before it, in bytes."""
        return self.host_after - self.host_before

    @property
    def cuda_change(self) -> int:
        """CUDA memory allocated after the call minus before it, in bytes."""
        return self.cuda_after - self.cuda_before

    @property
    def kind(self) -> str:
        """"load" (weights brought in), "free" (weights dropped), or "align" (inputs/outputs moved only)."""
        if self.offload and self.weight_bytes:
            return "load" if self.phase == "pre_forward" else "free"
        return "align"

    def __repr__(self) -> str:
        where = f"{self.weights_before or '-'} -> {self.weights_after or '-'}"
        memory = f"host {_signed(self.host_change)}"
        if self.cuda_before or self.cuda_after:
            memory += f", cuda {_signed(self.cuda_change)}"
        return (f"HookEvent({self.phase:<12} {self.module or '<model>':<40} {self.kind:<5} weights {where:<16} "
                f"{format_bytes(self.weight_bytes):>10}  {self.seconds * 1e3:7.2f} ms  {memory})")


def _signed(nbytes: int) -> str:
    return ("+" if nbytes >= 0 else "-") + format_bytes(abs(nbytes))


@dataclass(frozen=True)
class BlockSummary:
    """One placement unit of the device map (a decoder layer, the embeddings, ...) during the traced forward(s)."""

    block: str
    placed: str  # where the device map put it: "cpu", "disk", "0", ...
    start: float  # first hook call inside the block, seconds since the trace began
    end: float  # last one
    loads: int  # hook calls that brought weights in
    load_s: float  # time spent in those calls
    free_s: float  # time spent dropping weights again
    compute_s: float  # the rest of the block's time: its forward (and the hooks' small bookkeeping)
    loaded_bytes: int
    memory_left: int  # memory after the block's last hook call minus before its first (CUDA on a GPU, else host)

    def __repr__(self) -> str:
        return (f"{self.block:<18} on {self.placed:<5} {self.loads:>2} loads of {format_bytes(self.loaded_bytes):>10}  "
                f"load {self.load_s * 1e3:7.2f} ms  compute {self.compute_s * 1e3:7.2f} ms  "
                f"free {self.free_s * 1e3:6.2f} ms  memory left {_signed(self.memory_left):>10}")


@dataclass
class HookTrace:
    """The events recorded by `trace_hooks`, in the order the hooks ran, and the device map's blocks."""

    blocks: dict[str, str]  # block name -> where the device map placed it (hf_device_map, as strings)
    events: list[HookEvent] = field(default_factory=list)
    uses_cuda: bool = False

    def block_of(self, module: str) -> str:
        """The device-map block that contains a module ("" for the model's own hook)."""
        best = ""
        for block in self.blocks:
            if (module == block or module.startswith(block + ".")) and len(block) > len(best):
                best = block
        return best

    def of_kind(self, kind: str) -> list[HookEvent]:
        return [e for e in self.events if e.kind == kind]

    def peak_loaded_bytes(self) -> int:
        """The most offloaded weight bytes on the execution device at once: + each load, - each free, in order."""
        loaded_now = peak = 0
        for event in self.events:
            loaded_now += {"load": event.weight_bytes, "free": -event.weight_bytes}.get(event.kind, 0)
            peak = max(peak, loaded_now)
        return peak

    def summary(self) -> list[BlockSummary]:
        """Per block, in the order they ran: load, compute and free time, and the bytes loaded."""
        by_block: dict[str, list[HookEvent]] = {}
        for event in self.events:
            block = self.block_of(event.module)
            if block:
                by_block.setdefault(block, []).append(event)
        rows = []
        for block, events in by_block.items():
            start, end = min(e.start for e in events), max(e.end for e in events)
            load = sum(e.seconds for e in events if e.kind == "load")
            free = sum(e.seconds for e in events if e.kind == "free")
            rows.append(BlockSummary(block=block, placed=self.blocks[block], start=start, end=end,
                                     loads=sum(e.kind == "load" for e in events), load_s=load, free_s=free,
                                     compute_s=max(end - start - load - free, 0.0),
                                     loaded_bytes=sum(e.weight_bytes for e in events if e.kind == "load"),
                                     memory_left=(events[-1].cuda_after - events[0].cuda_before if self.uses_cuda
                                                  else events[-1].host_after - events[0].host_before)))
        return rows

    def __repr__(self) -> str:
        loads = self.of_kind("load")
        span = (self.events[-1].end - self.events[0].start) if self.events else 0.0
        return (f"HookTrace({len(self.events)} hook calls over {span:.3f} s: {len(loads)} loads "
                f"({format_bytes(sum(e.weight_bytes for e in loads))}, {sum(e.seconds for e in loads):.3f} s), "
                f"{len(self.of_kind('free'))} frees, {len(self.of_kind('align'))} that only align devices)")


def align_hooks(module: torch.nn.Module) -> list[AlignDevicesHook]:
    """The AlignDevicesHook(s) accelerate attached to one module (inside a SequentialHook too)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _managed(module: torch.nn.Module, hook: AlignDevicesHook) -> list[torch.Tensor]:
    """The tensors this hook loads and drops: the same selection AlignDevicesHook.pre_forward makes."""
    return [t for _, t in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                               recurse=hook.place_submodules, remove_non_persistent=True)]


def _where(tensors: list[torch.Tensor]) -> str:
    return "+".join(sorted({str(t.device) for t in tensors}))


def _synchronize() -> None:
    """Wait for every GPU, not only the current one: with several GPUs a block may compute on cuda:1, cuda:2..."""
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def _recorder(trace: HookTrace, name: str, hook: AlignDevicesHook, phase: str, t0: float):
    original = getattr(hook, phase)  # the bound method of the class, as accelerate would call it
    cuda = trace.uses_cuda

    def record(module, *args, **kwargs):
        tensors = _managed(module, hook)
        before, nbytes = _where(tensors), sum(t.numel() * t.element_size() for t in tensors)
        del tensors  # holding them would keep the weights alive past post_forward's free
        if cuda:
            _synchronize()
        host_before = read_host_memory().anon
        cuda_before = torch.cuda.memory_allocated() if cuda else 0
        start = time.perf_counter()
        result = original(module, *args, **kwargs)
        if cuda:
            _synchronize()  # the copies are asynchronous on a GPU: wait before taking the time
        end = time.perf_counter()
        trace.events.append(HookEvent(
            module=name, phase=phase, start=start - t0, end=end - t0, offload=hook.offload,
            execution_device=str(hook.execution_device), weights_before=before,
            weights_after=_where(_managed(module, hook)), weight_bytes=nbytes, host_before=host_before,
            host_after=read_host_memory().anon, cuda_before=cuda_before,
            cuda_after=torch.cuda.memory_allocated() if cuda else 0))
        return result

    return record


@contextmanager
def trace_hooks(model: torch.nn.Module) -> Iterator[HookTrace]:
    """Record every AlignDevicesHook's pre_forward and post_forward in `model` while the block runs.

    >>> with trace_hooks(model) as trace:
    ...     model(input_ids)
    >>> trace.summary()  # per device-map block: load, compute and free time
    """
    blocks = {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}
    trace = HookTrace(blocks=blocks, uses_cuda=torch.cuda.is_available() and torch.cuda.is_initialized())
    t0 = time.perf_counter()
    patched = []
    for name, module in model.named_modules():
        for hook in align_hooks(module):
            for phase in ("pre_forward", "post_forward"):
                setattr(hook, phase, _recorder(trace, name, hook, phase, t0))  # shadows the class's method
            patched.append(hook)
    try:
        yield trace
    finally:
        for hook in patched:  # delete our instance attributes: the class's methods show through again
            del hook.pre_forward, hook.post_forward


def weights_loader(model: torch.nn.Module) -> OffloadedWeightsLoader:
    """The one OffloadedWeightsLoader that all offloading hooks of a dispatched model read from."""
    for module in model.modules():
        for hook in align_hooks(module):
            if hook.offload and isinstance(hook.weights_map, PrefixedDataset):
                return hook.weights_map.dataset
    raise ValueError("no offloading AlignDevicesHook in this model: nothing is offloaded")


@dataclass(frozen=True)
class StoredWeight:
    """Where accelerate keeps one offloaded weight between forwards, and a fingerprint of it."""

    where: str  # "RAM" (a tensor in the loader's state_dict) or "disk" (a .dat file in the offload folder)
    address: int  # RAM: the tensor's data_ptr(); disk: the file's modification time (ns)
    checksum: float  # RAM: the sum of its values (float64); disk: the file's size in bytes


def stored_weights(model: torch.nn.Module) -> dict[str, StoredWeight]:
    """Fingerprint every offloaded weight where it is stored: equal before and after a forward = never written."""
    loader = weights_loader(model)
    stored = {}
    for key in loader:
        if key in loader.state_dict:
            tensor = loader.state_dict[key]
            stored[key] = StoredWeight("RAM", tensor.data_ptr(), tensor.sum(dtype=torch.float64).item())
        else:  # a write would change the file's modification time
            path = loader.index[key].get("safetensors_file") or os.path.join(loader.save_folder, f"{key}.dat")
            stat = os.stat(path)
            stored[key] = StoredWeight("disk", stat.st_mtime_ns, float(stat.st_size))
    return stored
