"""Several GPUs, split by layers: where each block really runs, when each GPU works, and what a pipeline can reach.

A device map over GPUs 0..N-1 is a *layer-wise* split: the hidden state goes through GPU 0's layers,
then moves to GPU 1, and so on. With one request in flight, one GPU computes while the others wait.
`pipeline_timeline` turns a `helpers.tracing` trace of one forward pass into per-device busy intervals;
on a machine without the planned GPUs, the same forward runs on one device and each block keeps the
colour of the GPU the plan gives it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from .device_maps import Device, DeviceMap, device_colour, device_label, device_of, device_order, layer_index
from .paths import RESULTS_DIR

#: Committed measurements of a layer-wise split on a machine with several GPUs (benchmarks/multi_gpu_pipeline.py).
RESULTS_GLOB = "multi-gpu-*.json"


def run_devices(planned: DeviceMap) -> dict[str, Device]:
    """Where each block will really run: the planned GPUs when this machine has them all, else one device for all
    (GPU 0 when there is one GPU, else the CPU)."""
    gpus = [d for d in planned.values() if isinstance(d, int)]
    if gpus and max(gpus) < torch.cuda.device_count():
        return dict(planned)
    single: Device = 0 if torch.cuda.is_available() else "cpu"
    return dict.fromkeys(planned, single)


def synchronize_all() -> None:
    """Wait for every GPU (a no-op without CUDA): timings after it include all queued work."""
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.synchronize(index)


@dataclass(frozen=True)
class BlockRun:
    """One block of the device map during the traced forward pass."""

    block: str
    planned: Device  # the device the plan gives it
    ran_on: str  # where it computed in this run ("cuda:1", "cpu")
    start: float  # seconds since the trace began
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class PipelineTimeline:
    """Per block, when it ran and on which device: the picture of a layer-wise split at batch 1."""

    runs: tuple[BlockRun, ...]

    @property
    def devices(self) -> list[Device]:
        return device_order(r.planned for r in self.runs)

    @property
    def span(self) -> float:
        """From the first block's start to the last block's end, in seconds."""
        return max(r.end for r in self.runs) - min(r.start for r in self.runs)

    @property
    def really_split(self) -> bool:
        """True when every block ran on the device the plan gave it (not on one stand-in device)."""
        return all(r.ran_on == _device_name(str(r.planned)) for r in self.runs)

    def busy(self, device: Device) -> float:
        """Seconds the blocks planned on `device` spent computing."""
        return sum(r.seconds for r in self.runs if r.planned == device)

    def utilisation(self, device: Device) -> float:
        """The share of the forward pass during which `device` computed."""
        return self.busy(device) / self.span

    def overlaps(self) -> list[tuple[BlockRun, BlockRun]]:
        """Pairs of blocks on different devices that computed at the same time (a naive split has none)."""
        runs = sorted(self.runs, key=lambda r: r.start)
        return [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]
                if a.planned != b.planned and b.start < a.end]

    def handoffs(self) -> int:
        """How often the hidden state moved to the next device: consecutive blocks on different devices."""
        runs = sorted(self.runs, key=lambda r: r.start)
        return sum(a.planned != b.planned for a, b in zip(runs, runs[1:], strict=False))

    def to_dict(self) -> dict:
        return {"runs": [asdict(r) for r in self.runs]}

    @classmethod
    def from_dict(cls, data: Mapping) -> PipelineTimeline:
        return cls(tuple(BlockRun(**r) for r in data["runs"]))

    def __repr__(self) -> str:
        where = ", ".join(sorted({r.ran_on for r in self.runs}))
        lines = [f"PipelineTimeline({len(self.runs)} blocks in {self.span * 1e3:.1f} ms, computed on {where}",
                 f"  {'planned on':<10} {'blocks':>6} {'busy':>10} {'share of the pass':>18}"]
        for device in self.devices:
            count = sum(r.planned == device for r in self.runs)
            lines.append(f"  {device_label(device):<10} {count:>6} {self.busy(device) * 1e3:>7.1f} ms "
                         f"{self.utilisation(device):>17.1%}")
        return "\n".join(lines) + ")"


def pipeline_timeline(trace, planned: DeviceMap) -> PipelineTimeline:
    """Per device-map block of a `helpers.tracing.HookTrace`: its start and end, the planned device, where it ran."""
    return PipelineTimeline(tuple(BlockRun(row.block, device_of(row.block, planned), _device_name(row.placed),
                                           row.start, row.end) for row in trace.summary()))


def trace_split(model: torch.nn.Module, planned: DeviceMap, input_ids: torch.Tensor):
    """Dispatch `model` as planned (or all on one stand-in device, see `run_devices`), warm up, trace one forward.

    Returns the dispatched model and the per-block timeline. `force_hooks=True` attaches accelerate's
    hooks even when every block runs on one device, so the trace sees the same block boundaries.
    """
    from accelerate import dispatch_model

    from .tracing import trace_hooks

    model = dispatch_model(model, device_map=run_devices(planned), force_hooks=True)
    with torch.no_grad():
        model(input_ids)  # warm-up: the first pass pays one-time costs (allocations, kernel selection)
        with trace_hooks(model) as trace:
            model(input_ids)
    return model, pipeline_timeline(trace, planned)


def _device_name(placed: str) -> str:
    return f"cuda:{placed}" if placed.isdigit() else placed


def pipeline_efficiency(stages: int, micro_batches: int) -> float:
    """The share of time each GPU works when `micro_batches` flow through `stages` GPUs in a pipeline (GPipe).

    The first micro-batch needs `stages` steps to reach the last GPU, and the last one leaves GPU 0
    `micro_batches` steps after the first: M micro-batches take M + N - 1 steps, of which each GPU
    works M. With one request (M = 1), that is 1 / N.
    """
    return micro_batches / (micro_batches + stages - 1)


def plot_pipeline_timeline(timeline: PipelineTimeline, *, title: str = "") -> Figure:
    """One row per planned device, one bar per block while it computed: the staircase of a layer-wise split."""
    devices = timeline.devices
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.45 * len(devices)), layout="constrained")
    t0 = min(r.start for r in timeline.runs)
    row = {d: i for i, d in enumerate(devices)}
    for run in timeline.runs:
        left, width = (run.start - t0) * 1e3, max(run.seconds * 1e3, 1e-3)
        ax.barh(row[run.planned], width, left=left, height=0.7, color=device_colour(run.planned),
                edgecolor="white", linewidth=0.5)
        index = layer_index(run.block)
        if index is not None:
            ax.text(left + width / 2, row[run.planned], str(index), ha="center", va="center", fontsize=7,
                    color="white", clip_on=True)
    span = timeline.span * 1e3
    for device in devices:
        ax.text(span * 1.01, row[device], f"busy {timeline.utilisation(device):.0%}", va="center", fontsize=8)
    suffix = "" if timeline.really_split else " (planned)"
    ax.set_yticks(range(len(devices)), [device_label(d) + suffix for d in devices])
    ax.invert_yaxis()
    ax.set_xlim(0, span * 1.12)
    ax.set_xlabel("ms since the forward pass began")
    ax.grid(axis="x", alpha=0.3)
    where = ", ".join(sorted({r.ran_on for r in timeline.runs}))
    ax.set_title(title or f"One forward pass, block by block (computed on {where})", fontsize=10, loc="left")
    return fig


def load_multi_gpu_results(folder: str | Path = RESULTS_DIR) -> list[dict]:
    """The committed multi-GPU measurements (data/results/multi-gpu-*.json), each with its file name; [] if none."""
    results = []
    for path in sorted(Path(folder).glob(RESULTS_GLOB)):
        data = json.loads(path.read_text())
        data["file"] = path.name
        results.append(data)
    return results


@dataclass(frozen=True)
class MultiGpuResult:
    """One committed run of benchmarks/multi_gpu_pipeline.py: a forward pass split over N GPUs and on one GPU."""

    file: str
    card: str
    n_gpus: int
    date: str
    split_seconds: float  # best forward pass with the replica split over the N GPUs by device_map="auto"
    one_gpu_seconds: float  # best forward pass with the whole replica on cuda:0
    timeline: PipelineTimeline  # the traced forward pass of the split

    @classmethod
    def from_dict(cls, data: Mapping) -> MultiGpuResult:
        """Read one result file's contents (as `load_multi_gpu_results` returns them)."""
        seconds = data["seconds_per_forward"]
        split = next(v for k, v in seconds.items() if k.startswith("split"))
        return cls(data.get("file", ""), data["card"], int(data["n_gpus"]), data["date"], float(split),
                   float(seconds["one GPU"]), PipelineTimeline.from_dict(data["timeline"]))

    @property
    def ratio(self) -> float:
        """Split time over one-GPU time: about 1 (or above, by the hand-offs) when the GPUs take turns."""
        return self.split_seconds / self.one_gpu_seconds

    @property
    def mean_utilisation(self) -> float:
        """The share of the traced pass each GPU computed, on average: at most 1 / N for a layer-wise split."""
        devices = self.timeline.devices
        return sum(self.timeline.busy(d) for d in devices) / (len(devices) * self.timeline.span)

    def __repr__(self) -> str:
        return (f"MultiGpuResult({self.n_gpus} x {self.card}, {self.date}: one forward pass "
                f"{self.split_seconds * 1e3:.2f} ms split, {self.one_gpu_seconds * 1e3:.2f} ms on one GPU "
                f"({self.ratio:.2f}x); each GPU busy {self.mean_utilisation:.1%} of the pass on average, "
                f"1/{self.n_gpus} = {1 / self.n_gpus:.1%}; {self.file})")


def plot_multi_gpu_results(results: list[MultiGpuResult]) -> Figure:
    """Per committed run: the forward pass split vs on one GPU, and each GPU's mean busy share vs 1/N."""
    results = sorted(results, key=lambda r: (r.n_gpus, r.card, r.date))
    labels = [f"{r.n_gpus} x {r.card}\n{r.date}" for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.6 + 0.6 * max(2, len(results))), layout="constrained")
    rows = range(len(results))
    left.barh([i - 0.2 for i in rows], [r.split_seconds * 1e3 for r in results], height=0.4,
              color=device_colour(1), label="split over the N GPUs")
    left.barh([i + 0.2 for i in rows], [r.one_gpu_seconds * 1e3 for r in results], height=0.4,
              color=device_colour(0), label="whole model on one GPU")
    left.set_yticks(list(rows), labels)
    left.invert_yaxis()
    left.set_xlabel("ms per forward pass (best of the run's repeats)")
    left.legend(fontsize=8, loc="lower right")
    right.barh(list(rows), [r.mean_utilisation for r in results], height=0.5, color=device_colour(1),
               label="measured: mean busy share per GPU")
    right.scatter([1 / r.n_gpus for r in results], list(rows), marker="|", s=400, color="black", zorder=3,
                  label="1/N: the most a layer-wise split allows")
    right.set_yticks(list(rows), [""] * len(results))
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("share of the forward pass each GPU computed")
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle("Committed multi-GPU runs (data/results/multi-gpu-*.json)", fontsize=10, x=0.01, ha="left")
    return fig


def time_forward(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """The best of `repeats` forward passes, in seconds, with every GPU synchronized before the clock is read."""
    best = float("inf")
    for _ in range(repeats):
        synchronize_all()
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids)
        synchronize_all()
        best = min(best, time.perf_counter() - start)
    return best
