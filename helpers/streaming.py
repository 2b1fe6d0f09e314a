"""A layer streamer: offloaded decoder layers' weights arrive in a few reused buffers just ahead of compute.

accelerate's offload hook fetches a layer's weights when the layer starts, tensor by tensor, and
waits for each copy; the compute waits for the copies and the copies wait for the compute. The
hardware allows better: the time of a step is at best the larger of the compute time and the
offloaded bytes divided by the bandwidth of the link they cross. This module gets close to that:

* each offloaded layer's weights are one flat, contiguous byte range (a `LayerLayout`): one large
  copy instead of nine small ones, and every parameter a typed view into it;
* on a GPU, the layers placed on "cpu" live ONCE in host memory, page-locked in place
  (`cudaHostRegister` on the exact bytes: no second host copy, and no rounding up), so the DMA
  engine copies them asynchronously; layers placed on "disk" are read from the checkpoint's
  safetensors shards with `pread` into page-locked staging buffers on a read-ahead thread;
* copies run on a side CUDA stream, `depth` layers ahead of compute, ordered by CUDA events:
  the compute stream waits for "layer i has arrived", the copy stream waits for "slot s is free";
* on the device, `depth + 1` slot buffers of one layer each are reused for all streamed layers:
  before a layer runs, its parameters are re-bound to views into the slot that holds its weights;
* without a GPU the same idea moves disk -> RAM: a read-ahead thread `pread`s layer i+1's tensors
  from the safetensors shards into a RAM slot while layer i computes;
* fewer bytes make a lower bound: with `int8_folder` (written by `write_int8_layers`) each streamed
  layer's Linear weights are held, read and copied as int8 with one float16 scale per output row
  (about half the bytes of float16), and dequantised on the execution device, into one float buffer
  the layer computes from, just before it runs; the copies of the next layers go on meanwhile.

The hooks are plain torch forward pre/post hooks on the decoder layers (as in notebook 06's
minimal offloader), so `remove()` restores the model to an ordinary module.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import statistics
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .memory import format_bytes
from .offload import set_tensor

INDEX_NAME = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                       "U8": torch.uint8, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}
PAGE = 4096


# --- one flat byte buffer per layer, a typed view per parameter ------------------------------------


@dataclass(frozen=True)
class ParamSpan:
    """Where one parameter of a layer lives inside the layer's flat byte buffer."""

    name: str  # relative to the layer, e.g. "mlp.up_proj.weight"
    offset: int  # bytes from the start of the flat buffer
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class LayerLayout:
    """The byte layout shared by every streamed layer: one span per parameter, aligned."""

    spans: tuple[ParamSpan, ...]
    nbytes: int

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views (one per parameter, in layout order) into a flat uint8 buffer of `nbytes`."""
        assert flat.dtype == torch.uint8 and flat.numel() == self.nbytes, "a flat uint8 buffer of the layout's size"
        return [flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.spans]

    def __repr__(self) -> str:
        return f"LayerLayout({len(self.spans)} parameters in one flat buffer of {format_bytes(self.nbytes)})"


def layer_layout(layer: torch.nn.Module, align: int = 256) -> LayerLayout:
    """Lay a layer's parameters end to end (each start aligned to `align` bytes), in named_parameters order."""
    spans, offset = [], 0
    for name, p in layer.named_parameters():
        offset = -(-offset // align) * align
        spans.append(ParamSpan(name, offset, tuple(p.shape), p.dtype))
        offset += spans[-1].nbytes
    return LayerLayout(tuple(spans), -(-offset // align) * align)  # rounded up: layers side by side stay aligned


# --- where each tensor's bytes are in the safetensors shards ---------------------------------------


@dataclass(frozen=True)
class TensorLocation:
    """A tensor's bytes inside a safetensors file: read them with one pread, no mmap, no extra copy."""

    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_locations(folder: str | Path) -> dict[str, TensorLocation]:
    """Every tensor of a safetensors checkpoint folder (sharded with an index, or one model.safetensors)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
              else ["model.safetensors"])
    found = {}
    for shard in shards:
        path = folder / shard
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            found[name] = TensorLocation(path, 8 + length + start, end - start, _SAFETENSORS_DTYPES[info["dtype"]],
                                         tuple(info["shape"]))
    return found


class FileReader:
    """Reads byte ranges of files straight into tensors with pread: the file's bytes land where they are used."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def read_into(self, location: TensorLocation, out: torch.Tensor) -> None:
        """Fill `out` (a contiguous CPU tensor of exactly location.nbytes) with the tensor's bytes."""
        fd = self._fds.get(location.path)
        if fd is None:
            fd = self._fds[location.path] = os.open(location.path, os.O_RDONLY)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        assert len(view) == location.nbytes, f"{len(view)} != {location.nbytes}"
        done = 0
        while done < location.nbytes:  # one read returns at most about 2 GiB on Linux
            n = os.preadv(fd, [view[done:]], location.offset + done)
            if n <= 0:
                raise OSError(f"{location.path.name}: unexpected end of file at {location.offset + done}")
            done += n
        self.bytes_read += done

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def drop_from_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget a file's cached pages, so the next read really comes from the disk.

    Pages not yet written back (a file just written, like accelerate's offload folder) cannot be dropped:
    they are flushed first (`fdatasync`), else the "cold" read would silently come from RAM.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- int8 on the wire: half the bytes of float16, dequantised where the layer runs ------------------

SCALE_SUFFIX = "_scale"  # "mlp.up_proj.weight" (int8) travels with "mlp.up_proj.weight_scale" (float16, one per row)


def is_int8_weight(name: str, shape: Sequence[int]) -> bool:
    """The weights sent as int8: a decoder layer's 2-D `.weight`s (in a Llama, exactly its 7 nn.Linear weights).

    Norm weights are 1-D: they travel as they are.
    """
    return name.endswith(".weight") and len(shape) == 2


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float16 scale per output row: scale = absmax / 127, q = round(w / scale)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(torch.float16)
    divisor = torch.where(scale == 0, 1.0, scale.float())  # an all-zero row: q = 0 whatever its scale
    q = torch.round(w / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = q * scale, one kernel computed in out's dtype: the float weight a layer computes with."""
    return torch.mul(q, scale.to(out.dtype)[:, None], out=out)


@dataclass(frozen=True)
class Int8Layout:
    """A layer as stored and sent in int8 (`wire`) and as it computes (`layout`, float): the same parameters.

    `plan` has one entry per parameter of `layout`: (index of its values in `wire`, index of its scale in
    `wire`, or None for a parameter sent as it is).
    """

    layout: LayerLayout
    wire: LayerLayout
    plan: tuple[tuple[int, int | None], ...]

    def dequantize(self, wire_views: Sequence[torch.Tensor], out_views: Sequence[torch.Tensor]) -> None:
        """Fill the float parameters (`layout` views) from the sent ones (`wire` views), on their device."""
        for out, (values, scale) in zip(out_views, self.plan, strict=True):
            if scale is None:
                out.copy_(wire_views[values])
            else:
                dequantize_int8(wire_views[values], wire_views[scale], out)

    def __repr__(self) -> str:
        n = sum(scale is not None for _, scale in self.plan)
        return (f"Int8Layout({n} of {len(self.plan)} parameters as int8 + a float16 scale per row: "
                f"{format_bytes(self.wire.nbytes)} sent per layer instead of {format_bytes(self.layout.nbytes)})")


def int8_layout(layout: LayerLayout, align: int = 256) -> Int8Layout:
    """The wire layout of `layout`: each int8 weight followed by its scales, the rest as they are, aligned."""
    spans, plan, offset = [], [], 0

    def add(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        nonlocal offset
        offset = -(-offset // align) * align
        spans.append(ParamSpan(name, offset, shape, dtype))
        offset += spans[-1].nbytes
        return len(spans) - 1

    for span in layout.spans:
        if is_int8_weight(span.name, span.shape):
            plan.append((add(span.name, span.shape, torch.int8),
                         add(span.name + SCALE_SUFFIX, span.shape[:1], torch.float16)))
        else:
            plan.append((add(span.name, span.shape, span.dtype), None))
    return Int8Layout(layout, LayerLayout(tuple(spans), -(-offset // align) * align), tuple(plan))


def write_int8_layers(checkpoint_folder: str | Path, folder: str | Path | None = None,
                      layers_prefix: str = "model.layers") -> Path:
    """Write the decoder layers of a safetensors checkpoint with their 2-D weights as int8 + float16 scales.

    One shard per layer and an index, as a checkpoint: the streamer reads it exactly as it reads the float
    one (`stream_model(..., int8_folder=...)`). Cached: by default under the cache, keyed by the checkpoint's
    path and its shards' sizes and modification times; an existing folder is reused as it is.
    """
    import hashlib
    import re

    from safetensors.torch import save_file

    from .paths import cache_dir

    locations = tensor_locations(checkpoint_folder)
    if folder is None:
        shards = sorted({loc.path for loc in locations.values()})
        key = json.dumps([str(Path(checkpoint_folder).resolve()), layers_prefix,
                          [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]])
        folder = cache_dir("int8") / f"{Path(checkpoint_folder).name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return folder
    pattern = re.compile(rf"^{re.escape(layers_prefix)}\.(\d+)\.")
    by_layer: dict[int, list[str]] = {}
    for name in locations:
        if match := pattern.match(name):
            by_layer.setdefault(int(match.group(1)), []).append(name)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    reader, weight_map, total = FileReader(), {}, 0
    try:
        for i in sorted(by_layer):
            tensors = {}
            for name in by_layer[i]:
                location = locations[name]
                tensor = torch.empty(location.shape, dtype=location.dtype)
                reader.read_into(location, tensor)
                if is_int8_weight(name, location.shape):
                    tensors[name], tensors[name + SCALE_SUFFIX] = quantize_int8(tensor)
                else:
                    tensors[name] = tensor
            shard = f"layer-{i:05d}.safetensors"
            save_file(tensors, tmp / shard)
            weight_map.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
    finally:
        reader.close()
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tmp.rename(folder)
    return folder


def int8_weight_errors(checkpoint_folder: str | Path, int8_folder: str | Path) -> dict[str, float]:
    """||w - q * scale|| / ||w|| for every int8 weight of `int8_folder` against the float checkpoint it came from.

    The quantisation error the int8 streamer's outputs carry (dequantised in float32 here).
    """
    float_locations, int8_locations = tensor_locations(checkpoint_folder), tensor_locations(int8_folder)
    reader, errors = FileReader(), {}

    def read(location: TensorLocation) -> torch.Tensor:
        out = torch.empty(location.shape, dtype=location.dtype)
        reader.read_into(location, out)
        return out

    try:
        for name, location in int8_locations.items():
            if location.dtype == torch.int8:
                w = read(float_locations[name]).float()
                q, scale = read(location), read(int8_locations[name + SCALE_SUFFIX])
                errors[name] = ((w - dequantize_int8(q, scale, torch.empty_like(w))).norm() / w.norm()).item()
    finally:
        reader.close()
    return errors


# --- host memory: page-aligned, page-locked in place -----------------------------------------------


def page_aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of exactly `nbytes` whose first byte starts a memory page."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % PAGE
    return raw[shift:shift + nbytes]


def pin_in_place(t: torch.Tensor) -> None:
    """Page-lock the memory a CPU tensor already has (cudaHostRegister on its storage): exact size, no copy.

    `tensor.pin_memory()` would copy the data into memory from PyTorch's pinned allocator, which
    rounds each block up to a power of two: 404.8 MB becomes 512 MiB (536.9 MB), a third more than the weights.
    """
    storage = t.untyped_storage()  # the whole allocation, so that tensor.is_pinned() sees it too
    error = int(torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0))
    if error != 0:
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {error}")


def unpin(t: torch.Tensor) -> None:
    """Undo pin_in_place (cudaHostUnregister)."""
    error = int(torch.cuda.cudart().cudaHostUnregister(t.untyped_storage().data_ptr()))
    if error != 0:
        raise RuntimeError(f"cudaHostUnregister failed with CUDA error {error}")


# --- the streamer ----------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """What the streamer did: fetches issued, bytes moved, and time the compute thread spent waiting."""

    fetches: int = 0
    bytes_fetched: int = 0
    wait_seconds: float = 0.0  # host time blocked in pre-hooks waiting for a read-ahead thread

    def __repr__(self) -> str:
        return (f"StreamStats({self.fetches} layer fetches, {format_bytes(self.bytes_fetched)}, "
                f"{self.wait_seconds:.3f} s waiting for reads)")


@dataclass
class _Pending:
    layer: int  # index into LayerStreamer.layers
    slot: int
    future: Future | None = None  # set when a read-ahead thread does (part of) the fetch


class LayerStreamer:
    """Streams the weights of some decoder layers into `depth + 1` reused device slots, `depth` layers ahead.

    `sources[i]` says where streamed layer i's bytes are: a flat uint8 CPU tensor (host memory,
    page-locked or not) or a list of TensorLocation in layout order (files on disk). Layers not
    in `sources` are left alone (resident). Attach with `attach()`, undo with `remove()`.

    With `int8` (an Int8Layout of `layout`), the sources hold the int8 wire layout: the slots receive
    int8 weights and their scales, and before a layer runs they are dequantised on the execution
    device into one float buffer of `layout`, which the layer computes from (the slot is free again
    as soon as that is done).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], sources: Mapping[int, torch.Tensor | list[TensorLocation]],
                 layout: LayerLayout, device: str | torch.device, *, depth: int = 1, non_blocking: bool = True,
                 side_stream: bool = True, int8: Int8Layout | None = None):
        self.layers = list(layers)
        self.sources = dict(sources)
        self.layout = layout  # what the layers compute from
        self.int8 = int8
        if int8 is not None and int8.layout != layout:
            raise ValueError("the Int8Layout was made for another layer layout")
        self.wire = int8.wire if int8 is not None else layout  # what is stored, read and copied
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.depth = depth
        self.non_blocking = non_blocking
        self.order = sorted(self.sources)  # streamed layers in execution order (cyclic: the next token starts over)
        self.stats = StreamStats()
        self.handles: list = []
        n_slots = depth + 1
        # The device buffers, allocated once and reused for every streamed layer of every step.
        self.slots = torch.empty(n_slots, self.wire.nbytes, dtype=torch.uint8, device=self.device)
        if int8 is None:  # the layer computes from the slot itself
            self._slot_params = [[torch.nn.Parameter(v, requires_grad=False) for v in layout.views(self.slots[s])]
                                 for s in range(n_slots)]
        else:  # int8 arrives in the slots; every layer computes from one float buffer, dequantised into
            self.weights = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
            self._weight_views = layout.views(self.weights)
            self._slot_params = [[torch.nn.Parameter(v, requires_grad=False) for v in self._weight_views]] * n_slots
            self._wire_views = [self.wire.views(self.slots[s]) for s in range(n_slots)]
        self._targets = {i: self._param_targets(self.layers[i]) for i in self.order}
        self._meta = {i: [torch.nn.Parameter(torch.empty(s.shape, dtype=s.dtype, device="meta"), requires_grad=False)
                          for s in layout.spans] for i in self.order}
        disk = any(not isinstance(src, torch.Tensor) for src in self.sources.values())
        # GPU + disk: a page-locked staging buffer per slot that the read-ahead thread fills from the file.
        self.staging: list[torch.Tensor] = []
        if self.on_gpu and disk:
            self.staging = [page_aligned_empty(self.wire.nbytes) for _ in range(n_slots)]
            for buffer in self.staging:
                pin_in_place(buffer)
        self._reader = FileReader() if disk else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if disk else None
        if self.on_gpu:
            self.copy_stream = torch.cuda.Stream(self.device) if side_stream else None
            self._arrived = [torch.cuda.Event() for _ in range(n_slots)]  # copy into slot s finished
            self._freed = [torch.cuda.Event() for _ in range(n_slots)]  # compute reading slot s finished
            self._staged = [torch.cuda.Event() for _ in range(n_slots)]  # copy out of staging s finished
            self._freed_recorded = [False] * n_slots
        self._pending: deque[_Pending] = deque()
        self._issued = 0  # fetches issued so far: the n-th goes into slot n % (depth + 1)
        self._next = 0  # position in self.order of the next layer to fetch
        self._current: dict[int, int] = {}  # layer -> slot it computes from

    def _param_targets(self, layer: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
        targets = []
        for span in self.layout.spans:
            module_name, _, leaf = span.name.rpartition(".")
            targets.append((layer.get_submodule(module_name) if module_name else layer, leaf))
        return targets

    # -- fetching one layer into one slot --

    def _read_file(self, i: int, out: torch.Tensor) -> None:
        for location, view in zip(self.sources[i], self.wire.views(out), strict=True):
            self._reader.read_into(location, view)

    def _copy_to_slot(self, i: int, slot: int, host: torch.Tensor) -> None:
        """On a GPU: copy a layer's flat host bytes into a device slot, on the copy stream when there is one."""
        stream = self.copy_stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            if self._freed_recorded[slot]:
                stream.wait_event(self._freed[slot])  # the layer that used this slot has finished computing
            self.slots[slot].copy_(host, non_blocking=self.non_blocking)
            self._arrived[slot].record(stream)

    def _disk_to_gpu(self, i: int, slot: int) -> None:
        """Runs on the read-ahead thread: file -> page-locked staging -> device slot."""
        self._staged[slot].synchronize()  # the previous copy out of this staging buffer is done
        self._read_file(i, self.staging[slot])
        self._copy_to_slot(i, slot, self.staging[slot])
        self._staged[slot].record(self.copy_stream or torch.cuda.current_stream(self.device))

    def _issue(self, i: int) -> None:
        slot = self._issued % (self.depth + 1)
        self._issued += 1
        source = self.sources[i]
        pending = _Pending(i, slot)
        if self.on_gpu and isinstance(source, torch.Tensor):
            self._copy_to_slot(i, slot, source)
        elif self.on_gpu:
            pending.future = self._thread.submit(self._disk_to_gpu, i, slot)
        else:  # CPU: the slot is RAM; the read-ahead thread fills it from the file
            pending.future = self._thread.submit(self._read_file, i, self.slots[slot])
        self._pending.append(pending)
        self.stats.fetches += 1
        self.stats.bytes_fetched += self.wire.nbytes

    def _drain(self) -> None:
        """Forget prefetched layers (used when layers run out of the expected order)."""
        while self._pending:
            pending = self._pending.popleft()
            if pending.future is not None:
                pending.future.result()

    # -- the two hooks --

    def _pre_forward(self, i: int) -> None:
        if not self._pending or self._pending[0].layer != i:  # first call, or an unexpected order
            self._drain()
            self._next = self.order.index(i)
            self._issue(i)
            self._next = (self._next + 1) % len(self.order)
        pending = self._pending.popleft()
        if pending.future is not None:  # a read-ahead thread is fetching layer i: wait for it
            start = time.perf_counter()
            pending.future.result()  # re-raises a read error here
            self.stats.wait_seconds += time.perf_counter() - start
        while len(self._pending) < self.depth:  # start fetching the next `depth` layers (cyclically)
            self._issue(self.order[self._next])
            self._next = (self._next + 1) % len(self.order)
        if self.on_gpu:  # the compute stream waits (on the GPU, not here) until layer i has arrived
            torch.cuda.current_stream(self.device).wait_event(self._arrived[pending.slot])
        if self.int8 is not None:  # int8 + scales -> the float weights, on the compute device; the slot is free
            self.int8.dequantize(self._wire_views[pending.slot], self._weight_views)
            self._release(pending.slot)
        for (module, leaf), param in zip(self._targets[i], self._slot_params[pending.slot], strict=True):
            module._parameters[leaf] = param  # the layer now computes from the slot
        self._current[i] = pending.slot

    def _release(self, slot: int) -> None:
        if self.on_gpu:  # slot free once the kernels queued so far have run
            self._freed[slot].record(torch.cuda.current_stream(self.device))
            self._freed_recorded[slot] = True

    def _post_forward(self, i: int) -> None:
        slot = self._current.pop(i)
        if self.int8 is None:  # (int8: released once dequantised)
            self._release(slot)
        for (module, leaf), param in zip(self._targets[i], self._meta[i], strict=True):
            module._parameters[leaf] = param  # back to meta: between its forwards the layer holds no memory

    def attach(self) -> LayerStreamer:
        for i in self.order:
            layer = self.layers[i]
            self.handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: self._pre_forward(i)))
            self.handles.append(layer.register_forward_hook(lambda module, args, output, i=i: self._post_forward(i)))
        return self

    def remove(self) -> None:
        """Unregister the hooks, stop the read-ahead thread, close files, unpin the staging buffers."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._drain()
        for i in self.order:  # leave the streamed layers as they were found: on meta
            for (module, leaf), param in zip(self._targets[i], self._meta[i], strict=True):
                module._parameters[leaf] = param
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._reader is not None:
            self._reader.close()
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            for buffer in self.staging:
                unpin(buffer)
            self.staging = []

    def __del__(self):
        for buffer in getattr(self, "staging", []):  # never leave freed memory registered with the driver
            with contextlib.suppress(Exception):
                unpin(buffer)

    def __enter__(self) -> LayerStreamer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        kinds = {"host": sum(isinstance(s, torch.Tensor) for s in self.sources.values())}
        kinds["disk"] = len(self.sources) - kinds["host"]
        where = ", ".join(f"{n} from {k}" for k, n in kinds.items() if n)
        sent = (f" int8 (+ scales), dequantised into one buffer of {format_bytes(self.layout.nbytes)},"
                if self.int8 else "")
        return (f"LayerStreamer({len(self.order)} of {len(self.layers)} layers streamed ({where}) into "
                f"{self.depth + 1} slots of {format_bytes(self.wire.nbytes)}{sent} on {self.device}, "
                f"{self.depth} layer(s) ahead; {self.stats!r})")


# --- putting a skeleton model together -------------------------------------------------------------


def layer_device_map(num_layers: int, device: str | int, offloaded: Mapping[int, str] | None = None,
                     layers_prefix: str = "model.layers") -> dict[str, str | int]:
    """An accelerate-style device_map for a Llama: everything on `device` except layers in `offloaded`.

    `offloaded` maps a layer index to "cpu" or "disk". Pass the same map to accelerate and to
    `stream_model`, so both run the same placement.
    """
    offloaded = dict(offloaded or {})
    device_map: dict[str, str | int] = {"model.embed_tokens": device}
    for i in range(num_layers):
        device_map[f"{layers_prefix}.{i}"] = offloaded.get(i, device)
    device_map.update({"model.norm": device, "model.rotary_emb": device, "lm_head": device})
    return device_map


def split_placement(num_layers: int, cpu: int = 0, disk: int = 0) -> dict[int, str]:
    """The last `cpu + disk` layers offloaded: the first `cpu` of them to "cpu", the rest to "disk"."""
    first = num_layers - cpu - disk
    return {i: ("cpu" if i < first + cpu else "disk") for i in range(first, num_layers)}


@dataclass
class StreamedModel:
    """A model whose streamed layers' weights come through a LayerStreamer, with what it holds where."""

    model: torch.nn.Module
    streamer: LayerStreamer
    host_store: torch.Tensor | None  # the one host copy of the "cpu" layers (None when there are none)
    resident_bytes: int  # weights resident on the execution device
    host_bytes: int  # weights in host memory (the "cpu" layers), held once
    disk_bytes: int  # weights left in the checkpoint files, read each step
    pinned: bool
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Detach the streamer and release the host store's page lock."""
        if self._closed:
            return
        self._closed = True
        self.streamer.remove()
        if self.pinned and self.host_store is not None:
            unpin(self.host_store)

    def __del__(self):
        with contextlib.suppress(Exception):  # a notebook re-run drops the old model: unpin before the memory goes
            self.close()

    def __repr__(self) -> str:
        return (f"StreamedModel(resident {format_bytes(self.resident_bytes)} on {self.streamer.device}, "
                f"host {format_bytes(self.host_bytes)}{' (page-locked)' if self.pinned and self.host_bytes else ''}, "
                f"disk {format_bytes(self.disk_bytes)};\n  {self.streamer!r})")


def stream_model(model: torch.nn.Module, checkpoint_folder: str | Path, device_map: Mapping[str, str | int], *,
                 depth: int = 1, pinned: bool = True, non_blocking: bool = True,
                 side_stream: bool = True, layers_prefix: str = "model.layers",
                 int8_folder: str | Path | None = None) -> StreamedModel:
    """Load a skeleton (`init_empty_weights`) from a safetensors checkpoint and stream its offloaded layers.

    Modules that `device_map` puts on the execution device are loaded there. Decoder layers put on
    "cpu" (with a GPU) are read once into one host buffer, page-locked in place when `pinned`;
    layers on "disk" stay in the checkpoint's shards and are read each step. Without a GPU, "cpu"
    is the execution device and only "disk" layers are streamed.

    With `int8_folder` (written by `write_int8_layers`), the streamed layers come from it instead: int8
    weights and float16 scales are held, read and copied, and dequantised where the layer runs.
    """
    execution = [d for d in device_map.values() if d not in ("cpu", "disk")]
    device = torch.device(f"cuda:{execution[0]}" if execution and isinstance(execution[0], int)
                          else (execution[0] if execution else "cpu"))
    layers = model.get_submodule(layers_prefix)
    placement = {i: device_map.get(f"{layers_prefix}.{i}", "resident") for i in range(len(layers))}
    streamed = [i for i, d in placement.items() if d == "disk" or (d == "cpu" and device.type != "cpu")]
    for key, where in device_map.items():
        offloaded = where == "disk" or (where == "cpu" and device.type == "cuda")
        if offloaded and not key.startswith(layers_prefix + "."):
            raise ValueError(f"only whole decoder layers ({layers_prefix}.N) can be streamed; {key} is on {where}")
    locations = tensor_locations(checkpoint_folder)
    layout = layer_layout(layers[streamed[0]]) if streamed else None
    for i in streamed[1:]:
        if layer_layout(layers[i]) != layout:
            raise ValueError(f"layer {i} is shaped unlike layer {streamed[0]}: streamed layers must share a layout")
    int8 = int8_layout(layout) if int8_folder is not None and streamed else None
    wire = int8.wire if int8 is not None else layout  # what the streamed layers' bytes look like, held and sent
    wire_locations = tensor_locations(int8_folder) if int8 is not None else locations
    for i in streamed:
        for span in wire.spans:
            location = wire_locations.get(f"{layers_prefix}.{i}.{span.name}")
            if location is None or (location.dtype, location.shape) != (span.dtype, span.shape):
                raise ValueError(f"{layers_prefix}.{i}.{span.name}: the checkpoint has "
                                 f"{location and (location.dtype, location.shape)}, the streamer expects "
                                 f"{(span.dtype, span.shape)}")

    streamed_names = tuple(f"{layers_prefix}.{i}." for i in streamed)
    reader = FileReader()
    resident_bytes = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(streamed_names):
            continue  # stays on meta until the streamer binds a slot
        if name in locations:
            location = locations[name]
            if location.dtype != tensor.dtype:
                raise ValueError(f"{name} is {location.dtype} in the checkpoint but {tensor.dtype} in the model")
            host = torch.empty(location.shape, dtype=location.dtype)  # ordinary (aligned) memory
            reader.read_into(location, host)
            set_tensor(model, name, host.to(device))
            resident_bytes += location.nbytes
        elif tensor.is_meta:
            raise ValueError(f"{name} is not in the checkpoint and has no value: build the skeleton with "
                             "accelerate's init_empty_weights() (buffers keep their values), not on the meta device")
        else:  # a buffer the checkpoint does not hold (rotary inv_freq): real values from the skeleton
            set_tensor(model, name, tensor.to(device))

    host_layers = [i for i in streamed if placement[i] == "cpu"]
    host_store = None
    sources: dict[int, torch.Tensor | list[TensorLocation]] = {}
    if host_layers:
        host_store = page_aligned_empty(len(host_layers) * wire.nbytes)  # the one host copy
        for k, i in enumerate(host_layers):
            flat = host_store[k * wire.nbytes:(k + 1) * wire.nbytes]
            for span, view in zip(wire.spans, wire.views(flat), strict=True):
                reader.read_into(wire_locations[f"{layers_prefix}.{i}.{span.name}"], view)
            sources[i] = flat
        if pinned:
            pin_in_place(host_store)
    reader.close()
    for i in streamed:
        if placement[i] == "disk":
            sources[i] = [wire_locations[f"{layers_prefix}.{i}.{span.name}"] for span in wire.spans]
    if streamed:
        streamer = LayerStreamer(layers, sources, layout, device, depth=depth, non_blocking=non_blocking,
                                 side_stream=side_stream, int8=int8).attach()
    else:  # nothing to stream: an empty streamer keeps the interface
        streamer = LayerStreamer(layers, {}, LayerLayout((), 0), device, depth=0)
    n_host = len(host_layers) * (wire.nbytes if wire else 0)
    n_disk = sum(placement[i] == "disk" for i in streamed) * (wire.nbytes if wire else 0)
    return StreamedModel(model, streamer, host_store, resident_bytes, n_host, n_disk,
                         pinned=pinned and host_store is not None and device.type == "cuda")


# --- measuring ----------------------------------------------------------------------------------


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer:
    """Times one step: CUDA events on the current stream on a GPU (the GPU's own clock), else perf_counter."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    def start(self) -> None:
        _sync(self.device)  # nothing queued before the step is counted in it
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return time.perf_counter() - self._t0


def cache_argument(model: torch.nn.Module) -> str:
    """The name `forward` takes the KV cache by: transformers 5.2x renamed past_key_values to cache (older 5.x
    releases know only the old name)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def prompt_ids(tokens: int, vocab_size: int) -> torch.Tensor:
    """The deterministic prompt the timing functions feed (batch 1): token k is (7k + 3) mod vocab_size."""
    return (torch.arange(tokens)[None] * 7 + 3) % vocab_size


@torch.no_grad()
def prompt_logits(model: torch.nn.Module, device: str | torch.device, *, tokens: int = 16) -> torch.Tensor:
    """The logits (float32, on the CPU) at every position of one forward of the timing prompt, without a cache.

    Two models given the same tokens: their logits compare position by position (a decode run would feed each
    model its own greedy tokens, which differ once one argmax does).
    """
    return model(prompt_ids(tokens, model.config.vocab_size).to(device)).logits[0].float().cpu()


@torch.no_grad()
def time_decode(model: torch.nn.Module, device: str | torch.device, *, prompt_tokens: int = 16, steps: int = 5,
                warmup: int = 1, vocab_size: int | None = None, before_step: Callable[[], None] | None = None,
                replay: bool | None = None) -> dict:
    """Seconds per decode step (batch 1, one new token with the KV cache of a short prompt), and the logits.

    Returns the median step ("seconds"), the fastest ("min_seconds": with enough steps, the floor a step of this
    model reaches on a quiet machine), every timed step and the logits of every step. On a GPU each step is timed
    with CUDA events. `before_step` runs before each step, outside the timed span (e.g. to drop files from the
    page cache). `replay` (default: on a GPU) runs the whole sequence of steps once untimed and times a second
    pass over the same KV-cache lengths: on an H100 each KV length seen for the first time in a process cost
    ~65 ms more (benchmarks/decode_warmup_diagnosis.py), a one-off per shape that is neither compute nor copying.
    """
    vocab_size = vocab_size or model.config.vocab_size
    if replay is None:
        replay = torch.device(device).type == "cuda"
    timer = _StepTimer(device)
    cache_name = cache_argument(model)
    for _pass in range(2 if replay else 1):  # with replay, only the second pass is kept
        ids = prompt_ids(prompt_tokens, vocab_size)
        out = model(ids.to(device), use_cache=True)
        cache, token = getattr(out, cache_name), out.logits[:, -1:].argmax(-1)
        times, logits = [], []
        for k in range(warmup + steps):
            if before_step is not None:
                before_step()
            timer.start()
            out = model(token, use_cache=True, **{cache_name: cache})
            seconds = timer.stop()
            if k >= warmup:
                times.append(seconds)
            token = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[0, -1].float().cpu())
    return {"seconds": statistics.median(times), "min_seconds": min(times), "all_seconds": times,
            "logits": torch.stack(logits), "replayed": replay}


@torch.no_grad()
def time_steady_decode(model: torch.nn.Module, device: str | torch.device, *, prompt_tokens: int = 16,
                       steps: int = 10) -> dict:
    """Seconds per token over `steps` consecutive decode steps, nothing synchronised between them (batch 1).

    As generation runs: each step's greedy token stays on the device and feeds the next step, so a streamer's
    copies for the next step overlap this one and every copy falls inside the timed span, unlike `time_decode`,
    which synchronises the device before each step. One untimed step first; on a GPU the span is measured with
    CUDA events on the current stream. Run it after `time_decode` with as many steps or more, so that every
    KV-cache length was seen before (see `time_decode`'s `replay`). Returns the seconds per token and the
    logits of every step (the untimed one first).
    """
    cache_name = cache_argument(model)
    cuda = torch.device(device).type == "cuda"
    out = model(prompt_ids(prompt_tokens, model.config.vocab_size).to(device), use_cache=True)
    cache, token = getattr(out, cache_name), out.logits[:, -1:].argmax(-1)
    logits = []
    for k in range(1 + steps):
        if k == 1:  # the clock starts once the untimed step's kernels are queued; nothing waits for anything
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                started = time.perf_counter()
        out = model(token, use_cache=True, **{cache_name: cache})
        token = out.logits[:, -1:].argmax(-1)
        logits.append(out.logits[0, -1])
    if cuda:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - started
    return {"seconds": seconds / steps, "steps": steps, "logits": torch.stack(logits).float().cpu()}


@torch.no_grad()
def time_prefill(model: torch.nn.Module, device: str | torch.device, *, tokens: int = 512, repeats: int = 3,
                 warmup: int = 1, before_step: Callable[[], None] | None = None) -> dict:
    """Seconds per prefill of `tokens` tokens (batch 1, a fresh KV cache each time), and the last logits."""
    ids = prompt_ids(tokens, model.config.vocab_size).to(device)
    times = []
    for k in range(warmup + repeats):
        if before_step is not None:
            before_step()
        _sync(device)
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "all_seconds": times, "logits": out.logits[0, -1].float().cpu()}


def h2d_bandwidth(nbytes: int, *, pinned: bool, repeats: int = 5, device: str = "cuda") -> float:
    """Measured host-to-device copy rate (bytes/s) for one copy of `nbytes`, from pinned or pageable memory."""
    host = page_aligned_empty(nbytes)
    host.fill_(1)  # touch every page, so the first copy does not pay for page faults
    if pinned:
        pin_in_place(host)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    try:
        for k in range(repeats + 1):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            target.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize(device)
            if k:
                times.append(time.perf_counter() - start)
    finally:
        if pinned:
            unpin(host)
    return nbytes / statistics.median(times)


def read_bandwidth(path: str | Path, *, cold: bool, chunk: int = 64 * 2**20) -> float:
    """Measured read rate (bytes/s) of a whole file with pread; `cold` first drops its pages from the page cache."""
    path = Path(path)
    if cold:
        drop_from_page_cache(path)
    size = path.stat().st_size
    buffer = torch.empty(min(chunk, size), dtype=torch.uint8)
    view = memoryview(buffer.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        start, done = time.perf_counter(), 0
        while done < size:
            n = os.preadv(fd, [view[:min(chunk, size - done)]], done)
            if n <= 0:
                break
            done += n
        return done / (time.perf_counter() - start)
    finally:
        os.close(fd)


def mmap_read_bandwidth(paths: Sequence[str | Path], *, cold: bool) -> float:
    """Read rate (bytes/s) of whole files read the way accelerate reads disk-offloaded weights, one file per tensor.

    accelerate's `load_offloaded_weight` maps each `.dat` file (`np.memmap`) and copies it (`torch.tensor`): pages
    come in by page faults, and a small cold file gets little of the kernel's readahead. On this project's
    machines that ran slower than one large sequential read (`read_bandwidth`); notebook 09 prints both.
    """
    paths = [Path(p) for p in paths]
    if cold:
        for path in paths:
            drop_from_page_cache(path)
    total = sum(path.stat().st_size for path in paths)
    start = time.perf_counter()
    for path in paths:
        torch.tensor(np.memmap(path, dtype=np.uint8, mode="r"))
    return total / (time.perf_counter() - start)


def write_test_file(path: str | Path, nbytes: int, seed: int = 0) -> Path:
    """Write `nbytes` of random bytes to `path` and flush them to the disk (fsync): a file no cache has read."""
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    chunk = 64 * 2**20
    with open(path, "wb") as f:
        for start in range(0, nbytes, chunk):
            n = min(chunk, nbytes - start)
            f.write(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path


@dataclass(frozen=True)
class Bound:
    """The best a step can do: the larger of computing with every weight resident and moving the offloaded bytes."""

    resident_seconds: float
    offloaded_bytes: int
    bandwidth: float  # bytes/s of the link the offloaded bytes cross

    @property
    def transfer_seconds(self) -> float:
        return self.offloaded_bytes / self.bandwidth

    @property
    def seconds(self) -> float:
        return max(self.resident_seconds, self.transfer_seconds)

    def __repr__(self) -> str:
        return (f"Bound({self.seconds * 1e3:.1f} ms = max(resident compute {self.resident_seconds * 1e3:.1f} ms, "
                f"{format_bytes(self.offloaded_bytes, 'GB')} / {self.bandwidth / 1e9:.2f} GB/s = "
                f"{self.transfer_seconds * 1e3:.1f} ms))")


BELOW_BOUND = ("below the bound, which no whole step can be: either the bound's terms were measured apart from this "
               "step (at other moments, on other bytes), and this step met a faster link, or, where the compute term "
               "sets the bound, quicker kernel launches: a small model's step on a GPU is mostly the CPU launching "
               "kernels, whose speed varies from one moment to the next; or the clock missed part of the step: "
               "time_decode synchronises the device before each step, so a prefetching streamer's copies of the first "
               "layers, issued during the previous step, finish before the clock starts (time_steady_decode times "
               "consecutive steps, as generation runs them, and misses none)")

# The one cause of a ratio under 1 that fits a row, when the caller knows which term set its bound and how it was timed.
BELOW_BOUND_CAUSES = {
    "compute": ("below the bound, which no whole step can be: the compute term sets this bound, and it was measured "
                "at other moments; a step's compute varies from one moment to the next (a small model's step on a "
                "GPU is mostly the CPU launching kernels)"),
    "link": ("below the bound, which no whole step can be: the link term sets this bound, and the bandwidth was "
             "measured apart from this step (at another moment, on other bytes): this step met a faster link"),
    "link, time_decode": ("below the bound, which no whole step can be: the link term sets this bound, and "
                          "time_decode synchronises the device before each step, so a prefetching streamer's copies "
                          "of the first layers, issued during the previous step, finish before the clock starts "
                          "(time_steady_decode times consecutive steps, as generation runs them, and misses none)"),
}


def against_bound(seconds: float, bound: float, cause: str | None = None) -> str:
    """'1.15x the bound'; a ratio under 1 is printed with its reason, never bare.

    `cause` picks the one reason that fits the row (a key of BELOW_BOUND_CAUSES: "compute" when the resident term
    sets the bound, "link" when the link does, "link, time_decode" when it does and time_decode timed the step);
    without it every possible reason is printed (BELOW_BOUND).
    """
    ratio = seconds / bound
    why = BELOW_BOUND_CAUSES[cause] if cause else BELOW_BOUND
    return f"{ratio:.2f}x the bound" + (f" ({why})" if ratio < 1 else "")


def below_bound_cause(bound: Bound, timed_with_time_decode: bool = True) -> str:
    """The key of BELOW_BOUND_CAUSES that fits a step measured against `bound`: which term sets it, how it was timed."""
    if bound.resident_seconds >= bound.transfer_seconds:
        return "compute"
    return "link, time_decode" if timed_with_time_decode else "link"


def ratio_table(rows: Iterable[tuple[str, float, float]], cause: str | None = None) -> str:
    """A text table of (label, seconds, bound seconds) rows with each time's ratio to its bound (under 1: why).

    `cause`: as in against_bound, the one reason for a ratio under 1 that fits every row; without it, all of them.
    """
    lines = [f"{'':<44} {'seconds':>9} {'bound':>9} {'ratio':>7}"]
    below = False
    for label, seconds, bound in rows:
        mark = " *" if seconds < bound else ""
        below = below or bool(mark)
        lines.append(f"{label:<44} {seconds:>9.4f} {bound:>9.4f} {seconds / bound:>6.2f}x{mark}")
    if below:
        lines.append(f"* {BELOW_BOUND_CAUSES[cause] if cause else BELOW_BOUND}")
    return "\n".join(lines)


def int8_results(folder: str | Path | None = None) -> list[dict]:
    """Every int8-streaming-<card>.json in data/results/ (benchmarks/int8_streaming.py), by file name: [] if none."""
    from .paths import RESULTS_DIR

    return [json.loads(p.read_text()) for p in sorted(Path(folder or RESULTS_DIR).glob("int8-streaming-*.json"))]


# --- accelerate's offload, for comparison ----------------------------------------------------------


def write_offload_folder(checkpoint_folder: str | Path, offload_folder: str | Path,
                         layers_prefix: str = "model.layers") -> Path:
    """Write every decoder layer's weights once as accelerate's offload files (.dat + index.json), cached.

    `load_checkpoint_and_dispatch(..., offload_folder=...)` writes the "disk" layers' weights there on
    every call, in this same format (accelerate.utils.offload_state_dict); writing all layers once lets
    each placement reuse the folder.
    """
    from accelerate.utils import offload_state_dict
    from safetensors.torch import load_file

    folder = Path(offload_folder)
    if (folder / "index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    for shard in sorted({loc.path for loc in tensor_locations(checkpoint_folder).values()}):
        tensors = {k: v for k, v in load_file(shard).items() if k.startswith(layers_prefix + ".")}
        offload_state_dict(tmp, tensors)  # one shard at a time: .dat files, index.json merged
    tmp.rename(folder)
    return folder


def accelerate_model(config, checkpoint_folder: str | Path, device_map: Mapping[str, str | int], *,
                     dtype: torch.dtype, offload_folder: str | Path | None = None) -> torch.nn.Module:
    """accelerate's offload, as load_checkpoint_and_dispatch does it: skeleton, load what stays, dispatch_model.

    Layers on "disk" are read by accelerate's hooks from `offload_folder` (see write_offload_folder);
    layers on "cpu" (with a GPU) stay in ordinary host memory and are copied tensor by tensor.
    """
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import load_checkpoint_in_model
    from transformers import AutoModelForCausalLM

    from .loading import no_accelerate_bars

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    on_disk = any(v == "disk" for v in device_map.values())
    if on_disk:
        write_offload_folder(checkpoint_folder, offload_folder)
    # Disk layers are loaded into RAM for a moment: dispatch_model's hooks replace them with meta tensors,
    # and from then on read them from the offload folder.
    load_map = {k: ("cpu" if v == "disk" else v) for k, v in device_map.items()}
    with no_accelerate_bars():  # accelerate draws a per-weight bar here, with no switch for it
        load_checkpoint_in_model(model, str(checkpoint_folder), device_map=load_map, dtype=dtype)
    if not any(isinstance(v, int) or str(v).startswith("cuda") for v in device_map.values()):
        # On a CPU the resident weights are now views into safetensors' memory map, at the file's 8-byte
        # alignment; the CPU's matrix-vector kernel rounds differently for data not aligned to 16 bytes, so
        # give them ordinary memory, as every other model here has: then all run the same kernels.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % 16:
                set_tensor(model, name, tensor.detach().clone())
    return dispatch_model(model, dict(device_map), offload_dir=str(offload_folder) if on_disk else None)
