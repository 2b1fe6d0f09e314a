"""Device maps: where each block of a model goes (GPU, CPU, disk), planned as accelerate plans it, summarised and drawn.

A device map is a dict `{module name: device}` with devices `0, 1, ...` (GPUs), `"cpu"` and `"disk"`.
`plan_device_map` computes one exactly as `load_checkpoint_and_dispatch(device_map=strategy)` does,
on a skeleton (meta device), so a plan for GPUs this machine does not have costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .layout import LayoutError, layout_of
from .memory import format_bytes

Device = int | str
DeviceMap = Mapping[str, Device]

#: The strategies `load_checkpoint_and_dispatch` and `from_pretrained` accept as `device_map`.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")  # a decoder layer's module name: "model.layers.7"
_GPU_COLOURS = ("#2ca02c", "#bcbd22", "#9467bd", "#e377c2", "#17becf", "#8c564b", "#d62728", "#ff7f0e")
_COLOURS = {"cpu": "#1f77b4", "disk": "#8c8c8c", "mps": "#2ca02c"}


def device_label(device: Device) -> str:
    """How a device reads in tables and legends: 0 -> 'GPU 0', 'cpu' -> 'CPU', 'disk' -> 'disk'."""
    if isinstance(device, int):
        return f"GPU {device}"
    return {"cpu": "CPU"}.get(str(device), str(device))


def device_colour(device: Device) -> str:
    """One colour per device, the same in every figure: GPUs green, olive, purple..., CPU blue, disk grey."""
    if isinstance(device, int):
        return _GPU_COLOURS[device % len(_GPU_COLOURS)]
    return _COLOURS.get(str(device), "#ff7f0e")


def device_order(devices) -> list[Device]:
    """GPUs by index, then CPU, then disk: the order accelerate fills them."""
    rank = {"cpu": 1, "mps": 0.5, "disk": 2}
    return sorted(set(devices), key=lambda d: (0, d) if isinstance(d, int) else (rank.get(str(d), 3), 0))


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a module name ('model.layers.7' and 'model.layers.7.mlp' -> 7), else None."""
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def block_names(model: torch.nn.Module) -> list[str]:
    """The decoder blocks' module names, read from the model (`helpers.layout`): 'model.layers.0', ... for Llama,
    'transformer.h.0', ... for GPT-2. A module without `_no_split_modules` falls back to Llama's 'layers.N' names."""
    try:
        layout = layout_of(model)
    except LayoutError:
        return [name for name, _ in model.named_modules() if _LAYER.search(name)]
    return [layout.block(i) for i in range(layout.num_blocks)]


def _block_index(blocks: list[str]):
    """A function: module or tensor name -> the number of the block it is in (None outside every block)."""
    prefixes = {name: i for i, name in enumerate(blocks)}

    def index(name: str) -> int | None:
        probe = name
        while probe:
            if probe in prefixes:
                return prefixes[probe]
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        return None

    return index


def device_of(name: str, device_map: DeviceMap) -> Device:
    """The device of a module or tensor name: its own map entry or its closest parent's, as accelerate reads it."""
    probe = name
    while probe not in device_map:
        if not probe:
            raise KeyError(f"{name!r} has no device in the map")
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return device_map[probe]


@dataclass(frozen=True)
class DevicePlacement:
    """What one device holds: map entries, whole decoder layers, and bytes (parameters, buffers)."""

    device: Device
    modules: int
    layers: tuple[int, ...]
    parameter_bytes: int
    buffer_bytes: int

    @property
    def bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes


def _ranges(numbers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class DeviceMapSummary:
    """A device map per device: how many map entries, which decoder layers and how many bytes, plus split layers."""

    rows: tuple[DevicePlacement, ...]
    split_layers: tuple[int, ...]  # decoder layers whose pieces sit on more than one device
    num_layers: int
    dtype: str

    @property
    def devices(self) -> list[Device]:
        return [row.device for row in self.rows]

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.rows)

    def row(self, device: Device) -> DevicePlacement | None:
        return next((row for row in self.rows if row.device == device), None)

    def bytes_on(self, device: Device) -> int:
        """Bytes (parameters and buffers, as accelerate counts them) placed on `device`; 0 if none."""
        row = self.row(device)
        return row.bytes if row else 0

    def layers_on(self, device: Device) -> int:
        """Number of whole decoder layers on `device`."""
        row = self.row(device)
        return len(row.layers) if row else 0

    def __repr__(self) -> str:
        lines = [f"DeviceMapSummary({self.num_layers} decoder layers, {format_bytes(self.total_bytes)} in {self.dtype}",
                 f"  {'device':<7} {'entries':>7}  {'decoder layers':<22} {'bytes':>12}"]
        for row in self.rows:
            layers = f"{_ranges(row.layers)} ({len(row.layers)})" if row.layers else "-"
            label = device_label(row.device)
            lines.append(f"  {label:<7} {row.modules:>7}  {layers:<22} {format_bytes(row.bytes):>12}")
        lines.append(f"  split layers: {_ranges(self.split_layers) if self.split_layers else 'none'}")
        return "\n".join(lines) + ")"


def _sizes(model: torch.nn.Module, dtype: torch.dtype | str | None) -> tuple[dict[str, int], dict[str, int]]:
    """accelerate's per-module sizes (parameters + buffers) and the buffers' share, in `dtype` as it would load."""
    return (compute_module_sizes(model, dtype=dtype),
            compute_module_sizes(model, dtype=dtype, buffers_only=True))


def _model_dtype(model: torch.nn.Module, dtype: torch.dtype | str | None) -> str:
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def summarize_device_map(device_map: DeviceMap, model: torch.nn.Module,
                         dtype: torch.dtype | str | None = None) -> DeviceMapSummary:
    """Per device: map entries, whole decoder layers and bytes (accelerate's `compute_module_sizes` in `dtype`)."""
    sizes, buffers = _sizes(model, dtype)
    modules: Counter = Counter()
    parameter_bytes: Counter = Counter()
    buffer_bytes: Counter = Counter()
    for name, device in device_map.items():
        modules[device] += 1
        parameter_bytes[device] += sizes.get(name, 0) - buffers.get(name, 0)
        buffer_bytes[device] += buffers.get(name, 0)
    layer_devices: dict[int, set] = {}
    for i, name in enumerate(block_names(model)):
        inside = {d for entry, d in device_map.items() if entry == name or entry.startswith(name + ".")}
        layer_devices[i] = inside or {device_of(name, device_map)}
    whole = {device: tuple(i for i, ds in sorted(layer_devices.items()) if ds == {device}) for device in modules}
    rows = tuple(DevicePlacement(d, modules[d], whole[d], parameter_bytes[d], buffer_bytes[d])
                 for d in device_order(modules))
    split = tuple(i for i, ds in sorted(layer_devices.items()) if len(ds) > 1)
    return DeviceMapSummary(rows, split, len(layer_devices), _model_dtype(model, dtype))


@contextlib.contextmanager
def planning_for_absent_gpus() -> Iterator[None]:
    """Hide accelerate's "Device N is not available" warning: planning for GPUs this machine lacks is the point."""
    class _DropAbsentDevice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "is not available, available devices are" not in record.getMessage()

    logger = logging.getLogger("accelerate.utils.modeling")
    quiet = _DropAbsentDevice()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def plan_device_map(model: torch.nn.Module, max_memory: Mapping[Device, int | str], strategy: str = "auto",
                    no_split_module_classes: list[str] | None = None,
                    dtype: torch.dtype | str | None = None) -> dict[str, Device]:
    """The device map `load_checkpoint_and_dispatch(device_map=strategy)` would compute, without loading anything.

    Every strategy but "sequential" first rewrites `max_memory` with `get_balanced_memory` (so "auto" is
    "balanced"); then `infer_auto_device_map` fills the devices in order. `max_memory` is copied first,
    because accelerate converts the caller's dict in place ("75GiB" -> 80530636800).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    max_memory = dict(max_memory)
    with planning_for_absent_gpus():
        if strategy != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory,
                                             no_split_module_classes=no_split_module_classes, dtype=dtype,
                                             low_zero=(strategy == "balanced_low_0"))
        return dict(infer_auto_device_map(model, max_memory=max_memory,
                                          no_split_module_classes=no_split_module_classes, dtype=dtype))


def device_map_for_budgets(model: torch.nn.Module, gpu_bytes: int, cpu_bytes: int,
                           no_split_module_classes: list[str] | None = None,
                           dtype: torch.dtype | str | None = None) -> dict[str, Device]:
    """The "auto" map for one GPU of `gpu_bytes` (none when 0) and `cpu_bytes` of RAM; the rest goes to disk."""
    max_memory: dict[Device, int] = {0: int(gpu_bytes)} if gpu_bytes > 0 else {}
    max_memory["cpu"] = int(cpu_bytes)
    return plan_device_map(model, max_memory, "auto", no_split_module_classes, dtype)


# --- drawing ---------------------------------------------------------------------------------------

def _short_name(name: str, index: int | None) -> str:
    if index is not None:
        return str(index)
    last = name.rsplit(".", 1)[-1]
    return {"embed_tokens": "emb", "wte": "emb", "lm_head": "head", "rotary_emb": "rot"}.get(last, last)


def _ordered_entries(device_map: DeviceMap, model: torch.nn.Module) -> list[str]:
    """The map's entries in the model's order (clean_device_map can move a merged entry to the end)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for i, (name, _) in enumerate(model.named_parameters()):
        order.setdefault(name, len(order) + i)

    def position(entry: str) -> float:
        probe = entry
        while probe not in order and "." in probe:
            probe = probe.rsplit(".", 1)[0]
        return order.get(probe, len(order))

    return sorted(device_map, key=position)


def _draw_strip(ax: Axes, device_map: DeviceMap, model: torch.nn.Module, sizes: dict[str, int],
                split: set[int], min_fraction: float, label_every: int | None) -> None:
    entries = _ordered_entries(device_map, model)
    total = sum(sizes.get(e, 0) for e in entries) or 1
    widths = [max(sizes.get(e, 0) / total, min_fraction) for e in entries]
    scale = sum(widths)
    widths = [w / scale for w in widths]
    blocks = block_names(model)
    layer_index = _block_index(blocks)
    every = label_every or max(1, round(len(blocks) / 20))
    widest: dict[int, str] = {}  # a split layer is labelled once, on its widest piece
    for entry, width in zip(entries, widths, strict=True):
        index = layer_index(entry)
        if index in split and (index not in widest or width > widths[entries.index(widest[index])]):
            widest[index] = entry
    left = 0.0
    for entry, width in zip(entries, widths, strict=True):
        device = device_map[entry]
        index = layer_index(entry)
        ax.barh(0, width, left=left, height=0.8, color=device_colour(device), edgecolor="white", linewidth=0.6,
                hatch="////" if index in split else None)
        if index is None:
            show = width > 0.015
        elif index in split:
            show = widest[index] == entry
        else:
            show = index % every == 0
        if show:
            ax.text(left + width / 2, 0, _short_name(entry, index), ha="center", va="center", fontsize=7,
                    color="black" if device == "disk" or index in split else "white", clip_on=True,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1} if index in split else None)
        left += width
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, 0.5)
    ax.set_yticks([])
    ax.set_xticks([])
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)


def _legend_handles(summary: DeviceMapSummary, with_numbers: bool) -> list[Patch]:
    handles = []
    for row in summary.rows:
        text = device_label(row.device)
        if with_numbers:
            text += f": {len(row.layers)} layers, {format_bytes(row.bytes)}"
        handles.append(Patch(facecolor=device_colour(row.device), label=text))
    if summary.split_layers:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="////", label="split layer"))
    return handles


def draw_device_map(device_map: DeviceMap, model: torch.nn.Module, *, dtype: torch.dtype | str | None = None,
                    title: str = "", ax: Axes | None = None, min_fraction: float = 0.004,
                    label_every: int | None = None) -> Figure:
    """The map as one horizontal strip in module order: one bar per map entry, width by bytes, colour by device.

    The order is registration order (`named_modules`), as in the map, not always the order the forward
    calls them: Llama registers `norm` before `rotary_emb` but calls `rotary_emb` first.

    Widths follow accelerate's sizes in `dtype`; entries under `min_fraction` of the total (norms, rotary)
    are widened to it so every one stays visible. Decoder layers are labelled by number.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 1.5), layout="constrained")
    else:
        fig = ax.figure
    sizes, _ = _sizes(model, dtype)
    summary = summarize_device_map(device_map, model, dtype)
    _draw_strip(ax, device_map, model, sizes, set(summary.split_layers), min_fraction, label_every)
    ax.legend(handles=_legend_handles(summary, with_numbers=True), loc="upper center", bbox_to_anchor=(0.5, -0.05),
              ncol=min(4, len(summary.rows) + bool(summary.split_layers)), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return fig


def draw_device_maps(device_maps: Mapping[str, DeviceMap], model: torch.nn.Module, *,
                     dtype: torch.dtype | str | None = None, title: str = "", min_fraction: float = 0.004,
                     label_every: int | None = None) -> Figure:
    """Several maps of the same model as stacked strips (one row per label), with one legend of devices."""
    fig, axes = plt.subplots(len(device_maps), 1, figsize=(10, 0.75 + 0.8 * len(device_maps)), layout="constrained",
                             squeeze=False)
    sizes, _ = _sizes(model, dtype)
    seen: dict[Device, None] = {}
    split = False
    for ax, (label, device_map) in zip(axes[:, 0], device_maps.items(), strict=True):
        summary = summarize_device_map(device_map, model, dtype)
        _draw_strip(ax, device_map, model, sizes, set(summary.split_layers), min_fraction, label_every)
        counts = "   ".join(f"{device_label(r.device)}: {len(r.layers)}" for r in summary.rows)
        ax.set_title(f"{label}  —  decoder layers per device: {counts}", fontsize=9, loc="left")
        seen.update(dict.fromkeys(summary.devices))
        split = split or bool(summary.split_layers)
    handles = [Patch(facecolor=device_colour(d), label=device_label(d)) for d in device_order(seen)]
    if split:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="////", label="split layer"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# --- the offload folder ------------------------------------------------------------------------------

@dataclass(frozen=True)
class OffloadFolder:
    """What accelerate wrote to an offload folder: one raw `.dat` file per tensor, and `index.json`."""

    folder: Path
    tensors: dict[str, dict]  # index.json: name -> {"dtype": ..., "shape": [...]}
    dat_bytes: dict[str, int]  # name -> size of its .dat file

    @property
    def total_bytes(self) -> int:
        return sum(self.dat_bytes.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        by_dtype: Counter = Counter()
        for name, info in self.tensors.items():
            by_dtype[info["dtype"]] += self.dat_bytes.get(name, 0)
        return dict(by_dtype)

    def __repr__(self) -> str:
        dtypes = ", ".join(f"{format_bytes(n)} of {d}" for d, n in self.bytes_by_dtype().items())
        return (f"OffloadFolder({len(self.dat_bytes)} .dat files + index.json ({len(self.tensors)} entries), "
                f"{format_bytes(self.total_bytes)}: {dtypes or 'empty'}\n  folder: {self.folder})")


def read_offload_folder(folder: str | Path) -> OffloadFolder:
    """Read an offload folder: its index.json and the size of every .dat file."""
    folder = Path(folder)
    index_path = folder / "index.json"
    tensors = json.loads(index_path.read_text()) if index_path.is_file() else {}
    dat = {p.name.removesuffix(".dat"): p.stat().st_size for p in sorted(folder.glob("*.dat"))}
    return OffloadFolder(folder, tensors, dat)


class BudgetError(ValueError):
    """A memory budget that no device map can work with."""


def check_budget(model: torch.nn.Module, max_memory: Mapping[Device, int], dtype: torch.dtype | None = None) -> int:
    """Check that the execution device's budget holds the largest unsplittable layer; return that layer's bytes.

    This is accelerate's planning rule, not a run-time need. `infer_auto_device_map`
    (accelerate/utils/modeling.py) subtracts the largest no-split block (`get_max_layer_size`) from the
    budget of each main device (GPU 0 and CPU RAM, or CPU RAM alone) and places a module only where it
    fits in what is left. Below the largest layer nothing fits, so the planner gives the execution
    device nothing and everything goes to slower tiers (without a GPU: all of it to disk, which
    `load_checkpoint_and_dispatch` then refuses, notebook 11). At run time the default hooks hold one
    module's weights at a time (notebook 06), and `max_memory` is not enforced at all: it only feeds the
    planner. Passing this check is necessary, not sufficient: the device must also fit its first block
    (the embedding) beside the reserve.
    """
    from .sizes import unsplittable_blocks

    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    blocks = {name: sum(p.numel() * (itemsize or p.element_size()) for p in block.parameters())
              for name, block in unsplittable_blocks(model).items()}
    name, largest = max(blocks.items(), key=lambda item: item[1])
    gpus = [d for d in max_memory if isinstance(d, int)]
    device = min(gpus) if gpus else "cpu"
    if device not in max_memory:
        raise BudgetError(f"max_memory has no budget for the execution device {device_label(device)}")
    budget = int(max_memory[device])
    if budget < largest:
        raise BudgetError(f"the budget for {device_label(device)} ({format_bytes(budget)}) is smaller than the "
                          f"largest layer, {name} ({format_bytes(largest)}): accelerate's planner keeps that much "
                          f"free on {device_label(device)} (its largest-layer reserve), so it would place nothing "
                          f"there and send the whole model to slower tiers. Raise it to at least "
                          f"{format_bytes(largest)} plus the first block and room for activations, or load in a "
                          f"smaller dtype.")
    return largest
