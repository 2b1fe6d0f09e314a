"""Plan inference for a model on one GPU: what fits where, and how many seconds per token to expect.

The plan is accelerate's own: `device_map="auto"` computed on the meta device (`plan_device_map`), under a
GPU budget that first sets aside room for the runtime, the KV cache and the activations. The expected speed
comes from the bytes each token moves over each link (PCIe, the disk) and the measured bandwidth of that link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate.utils import compute_module_sizes
from accelerate.utils.modeling import get_max_layer_size

from .device_maps import DeviceMapSummary, block_names, plan_device_map, summarize_device_map
from .memory import GPU, activation_bytes, compute_dtype, format_bytes, kv_cache_bytes
from .models import meta_model


def _gb(n: float) -> str:
    """Bytes in decimal GB, or in MB below 0.01 GB (a small model's layers would all read 0.00 GB)."""
    return format_bytes(n, "MB" if 0 < abs(n) < 10**7 else "GB")


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
        # a link given as inf (never the bottleneck) or nan (not used: the compute time is measured) says so
        disk = (f"disk {self.disk_read / 1e9:.2f} GB/s{mapped}" if math.isfinite(self.disk_read)
                else "disk not used (infinite rate)")
        memory = (f"device memory {self.device_memory / 1e12:.2f} TB/s" if math.isfinite(self.device_memory)
                  else "device memory not used (compute measured)")
        return (f"Links(pinned {self.pinned_h2d / 1e9:.1f} GB/s, pageable {self.pageable_h2d / 1e9:.1f} GB/s, "
                f"{disk}, {memory};\n  {self.source})")


def links_from_results(run: dict, device_memory: float) -> Links:
    """The links measured by benchmarks/offload_benchmark.py (a committed data/results/*.json)."""
    bw = run["bandwidth"]
    return Links(bw["pinned_h2d"], bw["pageable_h2d"], bw["disk_read_cold"], device_memory,
                 f"measured on {run['card']}, {run['date']} (data/results)")


@dataclass(frozen=True)
class SpeedEstimate:
    """Seconds per decode step (batch 1): accelerate's hooks, and the bound a prefetching streamer can reach.

    Two rates for the same bytes: `pcie_seconds` is the floor from page-locked (pinned) memory, which a streamer
    that pins its weights reaches; `pageable_seconds` is the rate accelerate's CPU tier copies at, because it
    copies from ordinary (pageable) memory, one tensor at a time, blocking (accelerate/utils/modeling.py,
    `set_module_tensor_to_device`: `value.to(device)`, then `empty_cache()` per tensor).
    """

    resident_seconds: float  # every weight on the GPU: compute (reading the weights from device memory)
    pcie_seconds: float  # offloaded bytes (RAM and disk tiers) over PCIe from pinned memory: the floor
    disk_seconds: float  # disk-tier bytes read from the disk in large sequential reads
    accelerate_seconds: float  # synchronous: compute + pageable copies + mapped disk reads, nothing overlapped
    bound_seconds: float  # overlapped: the slowest of compute, PCIe and disk
    pageable_seconds: float = float("nan")  # offloaded bytes over PCIe from pageable memory: accelerate's rate

    def __repr__(self) -> str:
        mapped_disk = self.accelerate_seconds - self.resident_seconds - self.pageable_seconds
        disk_term = f" + mapped disk reads {mapped_disk:.3g}" if self.disk_seconds > 0 else ""
        return (f"SpeedEstimate(accelerate {self.accelerate_seconds:.3g} s/token = compute "
                f"{self.resident_seconds:.3g} + PCIe from pageable memory {self.pageable_seconds:.3g}{disk_term}; "
                f"bound {self.bound_seconds:.3g} s/token = max(compute {self.resident_seconds:.3g}, PCIe from "
                f"pinned memory {self.pcie_seconds:.3g}, disk {self.disk_seconds:.3g}))")


def estimate_speed(gpu_bytes: int, cpu_bytes: int, disk_bytes: int, links: Links,
                   resident_seconds: float | None = None) -> SpeedEstimate:
    """Expected seconds per token from the bytes on each tier; `resident_seconds` defaults to all bytes / HBM rate."""
    total = gpu_bytes + cpu_bytes + disk_bytes
    resident = resident_seconds if resident_seconds is not None else total / links.device_memory
    offloaded = cpu_bytes + disk_bytes
    disk = disk_bytes / links.disk_read
    pageable = offloaded / links.pageable_h2d
    accelerate = resident + pageable + disk_bytes / links.accelerate_disk_read
    bound = max(resident, offloaded / links.pinned_h2d, disk)
    return SpeedEstimate(resident, offloaded / links.pinned_h2d, disk, accelerate, bound, pageable)


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
    largest_layer_reserve: bool = True  # False: the budget was raised by accelerate's reserve, to cancel it
    quantization: str | None = None  # "int8", "nf4", "nf4-dq": bitsandbytes' stored bytes were placed

    #: What bitsandbytes says when a map sends quantised modules to the CPU or the disk (transformers 5.24,
    #: quantizers/quantizer_bnb_8bit.py and quantizer_bnb_4bit.py, `validate_environment`), the first sentence.
    BNB_REFUSAL = "Some modules are dispatched on the CPU or the disk."

    def bytes_on(self, device) -> int:
        return self.summary.bytes_on(device)

    @property
    def fits_on_gpu(self) -> bool:
        """Every weight on the GPU: nothing in CPU RAM or on disk, so nothing crosses PCIe per token."""
        return self.bytes_on("cpu") == 0 and self.bytes_on("disk") == 0

    @property
    def bnb_refuses(self) -> bool:
        """A quantised plan whose map bitsandbytes' `validate_environment` rejects: some modules on the CPU or the
        disk, and not all of them on the CPU (without `llm_int8_enable_fp32_cpu_offload`)."""
        devices = set(self.device_map.values())
        return bool(self.quantization) and devices != {"cpu"} and bool(devices & {"cpu", "disk"})

    @property
    def verdict(self) -> str:
        n = self.summary.num_layers
        layers = {d: self.summary.layers_on(d) for d in (0, "cpu", "disk")}
        if self.fits_on_gpu:
            where = f"all {n} decoder layers on the GPU: no offloading"
        else:
            where = (f"{layers[0]} of {n} decoder layers on the GPU, {layers['cpu']} in CPU RAM, "
                     f"{layers['disk']} on disk")
        expect = "at least" if self.quantization else "about"  # the stored bytes at the memory rate: a floor
        verdict = (f"{where}; expect {expect} {self.speed.accelerate_seconds:.2g} s/token with accelerate's hooks "
                   f"(pageable copies), {self.speed.bound_seconds:.2g} s/token at best (a prefetching streamer from "
                   "pinned memory)")
        if self.bnb_refuses:
            verdict += (f"; bitsandbytes refuses this map (\"{self.BNB_REFUSAL} ...\") unless "
                        "llm_int8_enable_fp32_cpu_offload=True")
        return verdict

    def __repr__(self) -> str:
        def row(label: str, n: int) -> str:
            return f"  {label:<34}{_gb(n):>12}"

        return "\n".join([
            f"InferencePlan({self.model_name} in {self.dtype} on {self.gpu.name}, prompt {self.prompt_tokens:,} "
            f"+ {self.new_tokens:,} new tokens" + (f" (quantised weights as bitsandbytes stores them, scales "
                                                   f"included; the rest in {self.summary.dtype})"
                                                   if self.quantization else ""),
            row("GPU memory (box)", self.gpu.memory_bytes),
            row("- runtime (CUDA context, workspaces)", self.runtime_bytes),
            row("- KV cache", self.kv_cache_bytes),
            row("- activations (prefill)", self.activation_bytes),
            row("= GPU budget for weights", self.gpu_weight_budget),
            row("CPU RAM budget for weights", self.cpu_weight_budget),
            f"  placed: GPU {_gb(self.bytes_on(0))}, CPU {_gb(self.bytes_on('cpu'))}, "
            f"disk {_gb(self.bytes_on('disk'))}",
            f"  {self.speed!r}",
            f"  {self.verdict})"])


def plan_inference(config, gpu: GPU, ram_bytes: int, links: Links, *, dtype: torch.dtype = torch.float16,
                   prompt_tokens: int = 4096, new_tokens: int = 256, batch_size: int = 1,
                   runtime_bytes: int = 2**30, ram_reserve_bytes: int = 16 * 10**9,
                   resident_seconds: float | None = None, model=None,
                   largest_layer_reserve: bool = True, quantization: str | None = None) -> InferencePlan:
    """Budgets, accelerate's "auto" map and the expected speed for `config` on `gpu` with `ram_bytes` of RAM.

    The GPU's budget for weights is its memory less the runtime, the KV cache of `prompt_tokens + new_tokens`
    and the activations of a `prompt_tokens` prefill (both in the dtype the model computes in: float16 for
    int8 weights); RAM keeps `ram_reserve_bytes` for the OS and the process. `model` may be a ready meta
    skeleton of `config` (it is built otherwise).

    accelerate's `infer_auto_device_map` always keeps the largest unsplittable layer free on the GPU (a planning
    rule: with the default hooks one module's weights are loaded at a time). `largest_layer_reserve=False`
    cancels that rule by adding the same bytes to the GPU's budget, so the weights may fill the whole budget.

    `quantization` ("int8", "nf4", "nf4-dq"): the Linear layers bitsandbytes quantises are placed at the bytes it
    stores, scales included (helpers.quantization.stored_skeleton, the bytes of `predict_footprint`); the other
    parameters, the KV cache and the activations stay in `dtype` (a float dtype). transformers' own
    `from_pretrained(device_map="auto")` plans such a model with 1 or 0.5 byte per quantised weight (no scales;
    `quantizers/quantizer_bnb_*bit.py::quantized_element_size`) and 90% of each budget (`adjust_max_memory`).
    Offloaded modules are counted at their stored bytes too, and the verdict says that bitsandbytes refuses such a
    map without `llm_int8_enable_fp32_cpu_offload` (`InferencePlan.bnb_refuses`). The compute term reads the
    stored bytes at the memory rate: a floor for bitsandbytes' dequantising kernels ("expect at least").
    """
    if quantization is not None:
        from .quantization import BNB_FORMATS  # here: helpers.quantization imports this module

        if quantization not in BNB_FORMATS:
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {BNB_FORMATS}")
        if not dtype.is_floating_point:
            raise ValueError(f"quantization={quantization!r} keeps the rest of the model in a float dtype, not {dtype}")
    name = quantization or str(dtype).removeprefix("torch.")
    kv = kv_cache_bytes(config, batch_size, prompt_tokens + new_tokens, compute_dtype(dtype))
    act = activation_bytes(config, batch_size, prompt_tokens, compute_dtype(dtype))
    gpu_budget = gpu.memory_bytes - runtime_bytes - kv - act
    cpu_budget = max(0, ram_bytes - ram_reserve_bytes)
    if gpu_budget <= 0:
        raise ValueError(f"{gpu.name} has no room for weights: the runtime, a KV cache of "
                         f"{format_bytes(kv, 'GB')} and activations of {format_bytes(act, 'GB')} take all "
                         f"{format_bytes(gpu.memory_bytes, 'GB')}; use a shorter prompt or a smaller batch")
    model = model if model is not None else meta_model(config, dtype)
    if quantization is not None and getattr(model, "stored_format", None) != quantization:
        from .quantization import stored_skeleton

        model = stored_skeleton(model, quantization)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    gpu_max_memory = gpu_budget if largest_layer_reserve else gpu_budget + largest_layer_bytes(model, no_split, dtype)
    device_map = plan_device_map(model, {0: gpu_max_memory, "cpu": cpu_budget}, "auto", no_split, dtype)
    summary = summarize_device_map(device_map, model, dtype)
    speed = estimate_speed(summary.bytes_on(0), summary.bytes_on("cpu"), summary.bytes_on("disk"), links,
                           resident_seconds)
    return InferencePlan(getattr(config, "_name_or_path", "") or config.model_type, name, gpu, runtime_bytes, kv,
                         act, gpu_budget, cpu_budget, device_map, summary, speed, links, prompt_tokens, new_tokens,
                         largest_layer_reserve, quantization)


def largest_layer(model, no_split_module_classes: list[str],
                  dtype: torch.dtype | str | None = None) -> tuple[int, list[str]]:
    """What accelerate's `infer_auto_device_map` keeps free on the GPU (its `get_max_layer_size` call): the bytes
    of the largest unsplittable module, and its name(s): a decoder block, or a larger leaf such as a big embedding."""
    modules = [*model.named_parameters(recurse=False), *model.named_children(), *model.named_buffers(recurse=False)]
    size, names = get_max_layer_size(modules, compute_module_sizes(model, dtype=dtype), no_split_module_classes)
    return int(size), list(names)


def largest_layer_bytes(model, no_split_module_classes: list[str], dtype: torch.dtype | str | None = None) -> int:
    """The bytes accelerate's `infer_auto_device_map` keeps free on the GPU (see `largest_layer`)."""
    return largest_layer(model, no_split_module_classes, dtype)[0]


def describe_largest(names: list[str], blocks: list[str]) -> str:
    """'one decoder layer' when the largest modules are blocks, else the first one's name (and how many more)."""
    if names and set(names) <= set(blocks):
        return "one decoder layer"
    more = f" (and {len(names) - 1} more of its size)" if len(names) > 1 else ""
    return f"`{names[0]}`{more}" if names else "nothing"


#: The rows of `reserve_table`, in order: each sets aside one more thing on the GPU than the row above.
RESERVE_ROWS = ("weights only", "+ accelerate's largest-layer reserve", "+ KV cache and activations, short prompt",
                "+ long prompt and runtime")


@dataclass(frozen=True)
class ReserveRow:
    """One row of `reserve_table`: what the GPU sets aside, accelerate's map under that budget, and its speed."""

    name: str
    adds: str  # what this row sets aside beyond the row above
    plan: InferencePlan

    largest_layer: int  # accelerate's reserve, kept free when plan.largest_layer_reserve

    @property
    def room_for_weights(self) -> int:
        """What accelerate may fill with weights: the card less everything this row sets aside."""
        return self.plan.gpu_weight_budget - (self.largest_layer if self.plan.largest_layer_reserve else 0)

    @property
    def gpu_layers(self) -> int:
        return self.plan.summary.layers_on(0)

    @property
    def offloaded_layers(self) -> int:
        return self.plan.summary.num_layers - self.gpu_layers

    @property
    def offloaded_bytes(self) -> int:
        return self.plan.bytes_on("cpu") + self.plan.bytes_on("disk")


@dataclass(frozen=True)
class ReserveTable:
    """The same model and card planned four times, each row reserving one more thing: why the answers differ."""

    rows: tuple[ReserveRow, ...]
    largest_layer: int

    def row(self, name: str) -> ReserveRow:
        """The row called `name` (one of RESERVE_ROWS)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row {name!r}; the rows are {[r.name for r in self.rows]}")

    @property
    def answer(self) -> ReserveRow:
        """The last row: everything a real request needs has its room. This is the plan to quote."""
        return self.rows[-1]

    HEADERS = ("row", "set aside on the GPU", "room for weights", "decoder layers on the GPU",
               "offloaded layers", "offloaded GB per token", "s/token floor, pinned PCIe",
               "s/token at accelerate's pageable rate")

    def table_rows(self) -> list[list]:
        """The rows as text cells, in the order of HEADERS (for helpers.widgets.markdown_table)."""
        links = self.rows[0].plan.links
        out = []
        for row in self.rows:
            out.append([row.name, row.adds, _gb(row.room_for_weights), row.gpu_layers,
                        row.offloaded_layers, f"{row.offloaded_bytes / 1e9:.2f}",
                        f"{row.offloaded_bytes / links.pinned_h2d:.2f}",
                        f"{row.offloaded_bytes / links.pageable_h2d:.2f}"])
        return out

    def __repr__(self) -> str:
        lines = [f"ReserveTable({self.rows[0].plan.model_name} in {self.rows[0].plan.dtype} on "
                 f"{self.rows[0].plan.gpu.name}; largest layer {_gb(self.largest_layer)}"]
        for cells in self.table_rows():
            lines.append(f"  {cells[0]:<44} GPU layers {cells[3]:>3}, offloaded {cells[5]:>7} GB: "
                         f"{cells[6]} s/token pinned, {cells[7]} s/token pageable")
        return "\n".join(lines) + ")"


def reserve_table(config, gpu: GPU, ram_bytes: int, links: Links, *, dtype: torch.dtype = torch.float16,
                  short_prompt: int = 512, prompt_tokens: int = 4096, new_tokens: int = 256,
                  runtime_bytes: int = 2**30, model=None, quantization: str | None = None) -> ReserveTable:
    """`plan_inference` four times on one card, each row setting aside one more thing before the weights.

    1. "weights only": the whole card for weights (accelerate's reserve cancelled);
    2. "+ accelerate's largest-layer reserve": its `infer_auto_device_map` rule;
    3. "+ KV cache and activations, short prompt": of a `short_prompt`-token prompt and `new_tokens` new tokens;
    4. "+ long prompt and runtime": the KV cache and activations of a `prompt_tokens`-token prompt instead, and
       `runtime_bytes` for the CUDA context and workspaces. This last row is the answer (`plan_inference`'s
       defaults), the others say where the other counts come from.
    The s/token columns are the transfer floors of the offloaded bytes: from pinned memory (a streamer) and at
    the pageable rate accelerate's CPU tier copies at; `row.plan.speed` adds the compute term.
    `quantization`: as in `plan_inference` (bitsandbytes' stored bytes placed).
    """
    model = model if model is not None else meta_model(config, dtype)
    if quantization is not None and getattr(model, "stored_format", None) != quantization:
        from .quantization import stored_skeleton

        model = stored_skeleton(model, quantization)
    common = dict(dtype=dtype, model=model, quantization=quantization)
    short_kv = kv_cache_bytes(config, 1, short_prompt + new_tokens, compute_dtype(dtype))
    short_act = activation_bytes(config, 1, short_prompt, compute_dtype(dtype))
    long_kv = kv_cache_bytes(config, 1, prompt_tokens + new_tokens, compute_dtype(dtype))
    long_act = activation_bytes(config, 1, prompt_tokens, compute_dtype(dtype))
    largest, largest_names = largest_layer(model, list(getattr(model, "_no_split_modules", None) or []), dtype)
    specs = [
        (RESERVE_ROWS[0], "nothing: the whole card holds weights",
         dict(prompt_tokens=0, new_tokens=0, runtime_bytes=0, largest_layer_reserve=False)),
        (RESERVE_ROWS[1], f"{describe_largest(largest_names, block_names(model))} ({_gb(largest)})",
         dict(prompt_tokens=0, new_tokens=0, runtime_bytes=0)),
        (RESERVE_ROWS[2], f"+ KV cache of {short_prompt:,} + {new_tokens:,} tokens ({_gb(short_kv)}), "
                          f"activations of a {short_prompt:,}-token prefill ({_gb(short_act)})",
         dict(prompt_tokens=short_prompt, new_tokens=new_tokens, runtime_bytes=0)),
        (RESERVE_ROWS[3], f"the same for {prompt_tokens:,} + {new_tokens:,} tokens ({_gb(long_kv)}, "
                          f"{_gb(long_act)}), + runtime ({_gb(runtime_bytes)})",
         dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runtime_bytes=runtime_bytes)),
    ]
    rows = tuple(ReserveRow(name, adds, plan_inference(config, gpu, ram_bytes, links, **common, **options), largest)
                 for name, adds, options in specs)
    return ReserveTable(rows, largest)
