"""Plan inference for a model on one GPU: what fits where, and how many seconds per token to expect.

The plan is accelerate's own: `device_map="auto"` computed on the meta device (`plan_device_map`), under a
GPU budget that first sets aside room for the runtime, the KV cache and the activations. The expected speed
comes from the bytes each token moves over each link (PCIe, the disk) and the measured bandwidth of that link.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device_maps import DeviceMapSummary, plan_device_map, summarize_device_map
from .memory import GPU, activation_bytes, format_bytes, kv_cache_bytes
from .models import meta_model

#: PCIe x16 payload rate per direction on paper, by generation (GB/s): each generation doubles the last.
PCIE_GB_PER_S = {3: 16.0, 4: 32.0, 5: 64.0}

#: Memory bandwidth from the vendors' datasheets (bytes/s), by the names in helpers.memory.COMMON_GPUS.
DATASHEET_MEMORY_BANDWIDTH = {"T4 16 GB": 320e9, "RTX 4090 24 GB": 1008e9, "A100 40 GB": 1555e9,
                              "A100 80 GB": 2039e9, "H100 80 GB": 3350e9}


@dataclass(frozen=True)
class Links:
    """Bandwidths (bytes/s) that set the speed of offloaded inference, and where they come from."""

    pinned_h2d: float  # page-locked host memory -> GPU (a streamer that pins its weights)
    pageable_h2d: float  # ordinary host memory -> GPU (accelerate's CPU tier)
    disk_read: float  # cold reads: a model that needs the disk does not fit in the page cache
    device_memory: float  # the GPU's memory bandwidth: a batch-1 decode step reads every resident weight once
    source: str
    disk_read_mapped: float | None = None  # accelerate's way: one memory-mapped file per tensor (None: disk_read)

    @property
    def accelerate_disk_read(self) -> float:
        return self.disk_read_mapped or self.disk_read

    def with_pcie(self, factor: float, device_memory: float, source: str) -> Links:
        """Another GPU on the same host: PCIe `factor` times as fast (0.5 from PCIe 5 to 4), its own memory rate.

        Pinned copies run at the link's speed and scale with it. Pageable copies ran far below the link (the CPU
        copies through a staging buffer), so they keep their rate unless the slower link caps them.
        """
        pinned = self.pinned_h2d * factor
        return Links(pinned, min(self.pageable_h2d, pinned), self.disk_read, device_memory, source,
                     self.disk_read_mapped)

    def __repr__(self) -> str:
        mapped = f" (mapped per tensor {self.disk_read_mapped / 1e9:.2f})" if self.disk_read_mapped else ""
        return (f"Links(pinned {self.pinned_h2d / 1e9:.1f} GB/s, pageable {self.pageable_h2d / 1e9:.1f} GB/s, "
                f"disk {self.disk_read / 1e9:.2f} GB/s{mapped}, device memory {self.device_memory / 1e12:.2f} TB/s;"
                f"\n  {self.source})")


def links_from_results(run: dict, device_memory: float) -> Links:
    """The links measured by benchmarks/offload_benchmark.py (a committed data/results/*.json)."""
    bw = run["bandwidth"]
    return Links(bw["pinned_h2d"], bw["pageable_h2d"], bw["disk_read_cold"], device_memory,
                 f"measured on {run['card']}, {run['date']} (data/results)")


@dataclass(frozen=True)
class SpeedEstimate:
    """Seconds per decode step (batch 1): accelerate's hooks, and the bound a prefetching streamer can reach."""

    resident_seconds: float  # every weight on the GPU: compute (reading the weights from device memory)
    pcie_seconds: float  # offloaded bytes (RAM and disk tiers) over PCIe
    disk_seconds: float  # disk-tier bytes read from the disk in large sequential reads
    accelerate_seconds: float  # synchronous: compute + pageable copies + mapped disk reads, nothing overlapped
    bound_seconds: float  # overlapped: the slowest of compute, PCIe and disk

    def __repr__(self) -> str:
        return (f"SpeedEstimate(accelerate {self.accelerate_seconds:.3g} s/token = compute "
                f"{self.resident_seconds:.3g} + pageable PCIe + mapped disk reads; bound "
                f"{self.bound_seconds:.3g} s/token = max(compute {self.resident_seconds:.3g}, pinned PCIe "
                f"{self.pcie_seconds:.3g}, disk {self.disk_seconds:.3g}))")


def estimate_speed(gpu_bytes: int, cpu_bytes: int, disk_bytes: int, links: Links,
                   resident_seconds: float | None = None) -> SpeedEstimate:
    """Expected seconds per token from the bytes on each tier; `resident_seconds` defaults to all bytes / HBM rate."""
    total = gpu_bytes + cpu_bytes + disk_bytes
    resident = resident_seconds if resident_seconds is not None else total / links.device_memory
    offloaded = cpu_bytes + disk_bytes
    disk = disk_bytes / links.disk_read
    accelerate = resident + offloaded / links.pageable_h2d + disk_bytes / links.accelerate_disk_read
    bound = max(resident, offloaded / links.pinned_h2d, disk)
    return SpeedEstimate(resident, offloaded / links.pinned_h2d, disk, accelerate, bound)


@dataclass(frozen=True)
class InferencePlan:
    """One model on one GPU (plus RAM and disk): the budgets, accelerate's device map, the expected speed."""

    model_name: str
    dtype: str
    gpu: GPU
    runtime_bytes: int  # CUDA context, cuBLAS workspaces, allocator slack
    kv_cache_bytes: int
    activation_bytes: int
    gpu_weight_budget: int  # what is left for weights: max_memory[0]
    cpu_weight_budget: int  # max_memory["cpu"]
    device_map: dict
    summary: DeviceMapSummary
    speed: SpeedEstimate
    links: Links
    prompt_tokens: int
    new_tokens: int

    def bytes_on(self, device) -> int:
        return self.summary.bytes_on(device)

    @property
    def verdict(self) -> str:
        n = self.summary.num_layers
        layers = {d: self.summary.layers_on(d) for d in (0, "cpu", "disk")}
        if layers["cpu"] == 0 and layers["disk"] == 0:
            where = f"all {n} decoder layers on the GPU: no offloading"
        else:
            where = (f"{layers[0]} of {n} decoder layers on the GPU, {layers['cpu']} in CPU RAM, "
                     f"{layers['disk']} on disk")
        return (f"{where}; expect about {self.speed.accelerate_seconds:.2g} s/token with accelerate's hooks, "
                f"{self.speed.bound_seconds:.2g} s/token at best (a prefetching streamer)")

    def __repr__(self) -> str:
        def row(label: str, n: int) -> str:
            return f"  {label:<34}{format_bytes(n, 'GB'):>12}"

        return "\n".join([
            f"InferencePlan({self.model_name} in {self.dtype} on {self.gpu.name}, prompt {self.prompt_tokens:,} "
            f"+ {self.new_tokens:,} new tokens",
            row("GPU memory (box)", self.gpu.memory_bytes),
            row("- runtime (CUDA context, workspaces)", self.runtime_bytes),
            row("- KV cache", self.kv_cache_bytes),
            row("- activations (prefill)", self.activation_bytes),
            row("= GPU budget for weights", self.gpu_weight_budget),
            row("CPU RAM budget for weights", self.cpu_weight_budget),
            f"  placed: GPU {format_bytes(self.bytes_on(0), 'GB')}, CPU {format_bytes(self.bytes_on('cpu'), 'GB')}, "
            f"disk {format_bytes(self.bytes_on('disk'), 'GB')}",
            f"  {self.speed!r}",
            f"  {self.verdict})"])


def plan_inference(config, gpu: GPU, ram_bytes: int, links: Links, *, dtype: torch.dtype = torch.float16,
                   prompt_tokens: int = 4096, new_tokens: int = 256, batch_size: int = 1,
                   runtime_bytes: int = 2**30, ram_reserve_bytes: int = 16 * 10**9,
                   resident_seconds: float | None = None, model=None) -> InferencePlan:
    """Budgets, accelerate's "auto" map and the expected speed for `config` on `gpu` with `ram_bytes` of RAM.

    The GPU's budget for weights is its memory less the runtime, the KV cache of `prompt_tokens + new_tokens`
    and the activations of a `prompt_tokens` prefill; RAM keeps `ram_reserve_bytes` for the OS and the process.
    `model` may be a ready meta skeleton of `config` (it is built otherwise).
    """
    name = str(dtype).removeprefix("torch.")
    kv = kv_cache_bytes(config, batch_size, prompt_tokens + new_tokens, name)
    act = activation_bytes(config, batch_size, prompt_tokens, name)
    gpu_budget = gpu.memory_bytes - runtime_bytes - kv - act
    cpu_budget = max(0, ram_bytes - ram_reserve_bytes)
    if gpu_budget <= 0:
        raise ValueError(f"{gpu.name} has no room for weights: the runtime, a KV cache of "
                         f"{format_bytes(kv, 'GB')} and activations of {format_bytes(act, 'GB')} take all "
                         f"{format_bytes(gpu.memory_bytes, 'GB')}; use a shorter prompt or a smaller batch")
    model = model if model is not None else meta_model(config, dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = plan_device_map(model, {0: gpu_budget, "cpu": cpu_budget}, "auto", no_split, dtype)
    summary = summarize_device_map(device_map, model, dtype)
    speed = estimate_speed(summary.bytes_on(0), summary.bytes_on("cpu"), summary.bytes_on("disk"), links,
                           resident_seconds)
    return InferencePlan(getattr(config, "_name_or_path", "") or config.model_type, name, gpu, runtime_bytes, kv,
                         act, gpu_budget, cpu_budget, device_map, summary, speed, links, prompt_tokens, new_tokens)
