"""The capstone at full scale: Llama-2-70B's real shape on one GPU capped at 80 GB, accelerate against the streamer.

Notebook 09 plans Llama-2-70B in float16 on an A100-80GB with 128 GB of host RAM and predicts its seconds per
token. This script runs that plan for real on one larger GPU (an H200) whose PyTorch allocator is capped so that
allocator + CUDA context = 80 GB (torch.cuda.set_per_process_memory_fraction; the context is measured and counted):

  * the model: Llama-2-70B's config (data/configs) on init_empty_weights, with deterministic random float16 weights
    generated layer by layer ON THE GPU (std 0.02, norms 1): no 138 GB download, and no weight is ever written to
    disk (one H200 host has 64 GiB of disk and 128 GiB of RAM);
  * the placement: 09's plan (plan_inference: the "+ long prompt and runtime" row of reserve_table): its first
    decoder layers on the GPU, its other decoder layers in host RAM. 09's plan also puts model.norm and lm_head in
    RAM; here they stay on the GPU for both methods (the streamer streams whole decoder layers only), and every
    byte count below is of the placement actually run;
  * the offloaded layers live in ONE page-aligned host buffer (one host copy, about 74 GB), each layer a flat
    byte range laid out by helpers.streaming.layer_layout, the model's parameters views into it;
  * (a) accelerate: dispatch_model(device_map, main_device=0) with those views as ordinary (pageable) memory:
    its hooks copy each offloaded module's tensors on every forward. Greedy tokens and s/token at batch 1;
  * (b) the streamer (helpers.streaming.LayerStreamer, notebook 08) on the SAME bytes, page-locked in place
    (pin_in_place): greedy tokens and s/token at batch 1, tokens/s at batch 1, 8, 32, 64 and the largest batch
    whose KV cache the 80 GB budget holds (formula printed);
  * (c) in the same run: pinned and pageable host-to-device bandwidth at the layer size (h2d_bandwidth); the
    resident compute time per step, measured with every one of the 80 layers computing on the GPU: the offloaded
    layers all bound to ONE resident copy of one offloaded layer's bytes (same shapes, same kernels, no copies);
    the bound max(resident compute, offloaded bytes / pinned bandwidth) at every batch;
  * (d) accelerate's and the streamer's greedy tokens at batch 1 must be equal (asserted after the JSON is written);
  * (e) everything goes to --out (default data/results/capstone-70b-<card-slug>.json), with 09's predictions for
    the measured links (helpers.planner.estimate_speed) beside the measurements.

Expected time on one H200 (PCIe 5, about 50 GB/s pinned, about 8 GB/s pageable): setup 15 s; weights 30-60 s
(74 GB copied device -> pageable host memory, first touch of every page); bandwidth 5 s; accelerate 60-90 s
(5 forwards of about 9-12 s each); pin in place 10-20 s; streamer 60 s (about 30 forwards of about 1.5 s);
resident compute 15 s. In all about 4-5 minutes; it prints each phase's time as it goes, and writes the JSON after
every phase, so a run that dies shows where and keeps what it measured.

    PYTHONPATH=$PWD python3 benchmarks/capstone_70b.py               # the full run (one H200, about 5 min)
    PYTHONPATH=$PWD python3 benchmarks/capstone_70b.py --tiny --out /tmp/capstone-tiny.json   # smoke test

`--tiny` runs an 8-layer, 256-wide Llama with grouped-query attention (half its layers "in RAM"): on a GPU every
phase; without one, the pieces that run on a CPU (weights into one host buffer as views, accelerate's dispatch,
greedy tokens, the resident timings at a few batch sizes) and the streamer's fields marked as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import streaming
from helpers.memory import activation_bytes, format_bytes, gpu_by_name, kv_cache_bytes
from helpers.models import load_config, meta_model
from helpers.offload import set_tensor
from helpers.paths import RESULTS_DIR
from helpers.planner import (
    DATASHEET_MEMORY_BANDWIDTH,
    PCIE_GB_PER_S,
    Links,
    estimate_speed,
    links_from_results,
    plan_inference,
)

BUDGET_BYTES = 80 * 10**9  # an A100-80GB: CUDA context + everything PyTorch allocates
HOST_RAM_PLANNED = 128 * 10**9  # 09's host
PLAN_PROMPT, PLAN_NEW = 4096, 256  # 09's plan reserves room for this request
PROMPT_TOKENS = 16  # the short prompt of every timed run
NEW_TOKENS = 5  # batch-1 greedy run: prefill + 4 decode steps (the first a warm-up, median of the other 3)
BATCH_STEPS = 4  # decode steps per batch size: 1 warm-up + 3 timed
BATCHES = (1, 8, 32, 64)
TINY_MAX_BATCH = 256  # --tiny: the largest batch tried (a smoke test)
WEIGHT_STD = 0.02
SEED = 70
DEPTH = 1  # the streamer's prefetch depth: 2 device slots of one layer each
H200_MEMORY_BANDWIDTH = 4.8e12  # NVIDIA H200 datasheet (HBM3e), bytes/s: the datasheet compute term
ALLOCATOR_SLACK = 0.9  # the largest batch uses at most 90% of the free budget (fragmentation, temporaries)


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def model_config(tiny: bool):
    if tiny:
        return load_config("llama-2-70b", num_hidden_layers=8, hidden_size=256, intermediate_size=688,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=2000, dtype="float16")
    return load_config("llama-2-70b", dtype="float16")


def skeleton(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16)


def placement_from_plan(config, tiny: bool) -> tuple[dict[int, str], dict]:
    """09's plan: which decoder layers go to RAM. Returns {layer: "cpu"} and what the plan said."""
    n = config.num_hidden_layers
    if tiny:
        return streaming.split_placement(n, cpu=n // 2), {"tiny": f"the last {n // 2} of {n} layers in RAM"}
    h100_run = json.loads((RESULTS_DIR / "nvidia-h100-80gb-hbm3.json").read_text())
    h100_links = links_from_results(h100_run, DATASHEET_MEMORY_BANDWIDTH["H100 80 GB"])
    a100_links = h100_links.with_pcie(PCIE_GB_PER_S[4] / PCIE_GB_PER_S[5], DATASHEET_MEMORY_BANDWIDTH["A100 80 GB"],
                                      f"derived from {h100_run['card']} ({h100_run['date']}): PCIe 5 -> 4, A100 HBM")
    plan = plan_inference(config, gpu_by_name("A100 80 GB"), HOST_RAM_PLANNED, a100_links, prompt_tokens=PLAN_PROMPT,
                          new_tokens=PLAN_NEW, model=meta_model(config, torch.float16))
    layers = {i: plan.device_map.get(f"model.layers.{i}") for i in range(n)}
    placement = {i: "cpu" for i, d in layers.items() if d == "cpu"}
    assert all(d in (0, "cpu") for d in layers.values()), f"09's plan has layers elsewhere: {layers}"
    others = {k: v for k, v in plan.device_map.items() if not k.startswith("model.layers.")}
    info = {"gpu_layers": plan.summary.layers_on(0), "cpu_layers": plan.summary.layers_on("cpu"),
            "non_layer_modules": others, "gpu_weight_budget": plan.gpu_weight_budget,
            "runtime_bytes": plan.runtime_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
            "activation_bytes": plan.activation_bytes, "bytes_on_gpu": plan.bytes_on(0),
            "bytes_on_cpu": plan.bytes_on("cpu"), "prompt_tokens": PLAN_PROMPT, "new_tokens": PLAN_NEW,
            "a100_links": {"pinned_h2d": a100_links.pinned_h2d, "pageable_h2d": a100_links.pageable_h2d,
                           "device_memory": a100_links.device_memory, "source": a100_links.source},
            "a100_prediction": {"accelerate_seconds": plan.speed.accelerate_seconds,
                                "bound_seconds": plan.speed.bound_seconds,
                                "resident_seconds": plan.speed.resident_seconds,
                                "pcie_seconds": plan.speed.pcie_seconds}}
    return placement, info


def bind_layer(layer: torch.nn.Module, layout: streaming.LayerLayout, flat: torch.Tensor) -> None:
    """Make a decoder layer's parameters typed views into a flat uint8 buffer laid out by `layout`."""
    for span, view in zip(layout.spans, layout.views(flat), strict=True):
        set_tensor(layer, span.name, view)


def fill_(t: torch.Tensor, name: str, generator: torch.Generator) -> None:
    if name.endswith("norm.weight"):
        t.fill_(1)
    else:
        t.normal_(0.0, WEIGHT_STD, generator=generator)


@torch.no_grad()
def build_weights(model, placement: dict[int, str], layout, device: torch.device) -> torch.Tensor | None:
    """Random weights generated on `device`: resident modules stay there, offloaded layers go to one host buffer."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    layers = model.model.layers
    offloaded = sorted(placement)
    host = streaming.page_aligned_empty(len(offloaded) * layout.nbytes) if offloaded else None
    scratch = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device) if offloaded else None
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("model.layers."):
            continue
        if tensor.is_meta:
            value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            fill_(value, name, generator)
        else:  # a buffer with real values (rotary inv_freq)
            value = tensor.to(device)
        set_tensor(model, name, value)
    for i, layer in enumerate(layers):
        if i in placement:
            k = offloaded.index(i)
            flat = host[k * layout.nbytes:(k + 1) * layout.nbytes]
            for span, view in zip(layout.spans, layout.views(scratch), strict=True):
                fill_(view, span.name, generator)
            flat.copy_(scratch)  # device -> pageable host memory (synchronous)
            bind_layer(layer, layout, flat)
        else:
            for name, tensor in layer.named_parameters():
                value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                fill_(value, name, generator)
                set_tensor(layer, name, value)
    del scratch
    return host


def prompt_ids(batch: int, tokens: int, vocab: int, device) -> torch.Tensor:
    """A deterministic short prompt per row (rows differ)."""
    return ((torch.arange(tokens)[None] * 7 + 3 + 11 * torch.arange(batch)[:, None]) % vocab).to(device)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def greedy(model, device: torch.device, batch: int, new_tokens: int, *, passes: int = 1) -> dict:
    """Greedy decoding with the KV cache: a prefill of PROMPT_TOKENS, then new_tokens - 1 decode steps, each timed.

    The first decode step is a warm-up; "seconds" is the median of the others. With passes=2 the whole sequence is
    run once untimed first (each KV-cache length seen for the first time in a process costs extra on a GPU:
    benchmarks/decode_warmup_diagnosis.py).
    """
    name = streaming.cache_argument(model)
    for _ in range(passes):
        ids = prompt_ids(batch, PROMPT_TOKENS, model.config.vocab_size, device)
        with Timer(device) as prefill:
            out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
        tokens, times = [token], []
        for _ in range(new_tokens - 1):
            with Timer(device) as step:
                out = model(token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            times.append(step.seconds)
        last_logits = out.logits[0, -1].float().cpu()
        del cache, out
    timed = times[1:] if len(times) > 1 else times
    return {"seconds": statistics.median(timed), "all_seconds": times, "prefill_seconds": prefill.seconds,
            "tokens": torch.cat(tokens, dim=1).cpu().tolist(), "batch": batch, "last_logits": last_logits}


def max_batch(config, free_bytes: int, tokens: int) -> tuple[int, str]:
    """The largest batch whose KV cache (of `tokens` tokens) and prefill activations fit in ALLOCATOR_SLACK x free."""
    per_sequence = (kv_cache_bytes(config, 1, tokens, "float16") + activation_bytes(config, 1, PROMPT_TOKENS, "float16")
                    + config.vocab_size * 4)
    batch = int(ALLOCATOR_SLACK * free_bytes // per_sequence)
    formula = (f"floor({ALLOCATOR_SLACK} x free {format_bytes(free_bytes, 'GB')} / per sequence "
               f"{format_bytes(per_sequence, 'MB')}) = {batch}; per sequence = KV cache 2 x {config.num_hidden_layers} "
               f"layers x {tokens} tokens x {config.num_key_value_heads} KV heads x "
               f"{config.hidden_size // config.num_attention_heads} x 2 bytes + activations of a {PROMPT_TOKENS}-token "
               f"prefill (helpers.memory.activation_bytes) + one row of float32 logits")
    return batch, formula


def run_batches(model, device, batches, results_key: str, results: dict, started: float, passes: int) -> list[dict]:
    rows = []
    for batch in batches:
        try:
            run = greedy(model, device, batch, BATCH_STEPS, passes=passes)
            rows.append({"batch": batch, "seconds_per_step": run["seconds"], "all_seconds": run["all_seconds"],
                         "prefill_seconds": run["prefill_seconds"], "tokens_per_second": batch / run["seconds"]})
            log(f"  {results_key} batch {batch}: {run['seconds'] * 1e3:.1f} ms per step, "
                f"{batch / run['seconds']:.1f} tokens/s", started)
        except torch.OutOfMemoryError as error:
            rows.append({"batch": batch, "error": f"OutOfMemoryError: {str(error)[:300]}"})
            log(f"  {results_key} batch {batch}: out of memory", started)
        except RuntimeError as error:  # e.g. an attention kernel that refuses a shape: recorded, the next batch runs
            rows.append({"batch": batch, "error": f"RuntimeError: {str(error)[:300]}"})
            log(f"  {results_key} batch {batch}: FAILED ({str(error)[:120]})", started)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def host_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def pcie_info() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.max,pcie.link.gen.current,"
                               "pcie.link.width.current", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the JSON (default data/results/capstone-70b-<card-slug>.json)")
    parser.add_argument("--tiny", action="store_true", help="a small Llama: a smoke test, also without a GPU")
    parser.add_argument("--no-cap", action="store_true", help="do not cap CUDA memory at 80 GB (diagnosis only)")
    args = parser.parse_args(argv)
    from accelerate import __version__ as accelerate_version
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules
    from transformers import __version__ as transformers_version

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda:0" if on_gpu else "cpu")
    card = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or 'unknown'})"
    out = args.out or RESULTS_DIR / f"capstone-70b-{slug(card)}{'-tiny' if args.tiny else ''}.json"
    config = model_config(args.tiny)
    log(f"{card}: torch {torch.__version__}, transformers {transformers_version}, accelerate {accelerate_version}; "
        f"writing {out}", started)

    results: dict = {
        "card": card, "slug": slug(card), "date": datetime.date.today().isoformat(), "tiny": args.tiny,
        "versions": {"torch": torch.__version__, "transformers": transformers_version,
                     "accelerate": accelerate_version, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "host": {"ram_bytes": host_ram(), "cpus": os.cpu_count(), "platform": platform.platform(),
                 "pcie": pcie_info() if on_gpu else None},
        "model": {"config": "llama-2-70b" + (" (tiny overrides)" if args.tiny else ""),
                  "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
                  "num_key_value_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
                  "dtype": "float16", "weights": f"random normal(0, {WEIGHT_STD}), norms 1, seed {SEED}, "
                                                 f"generated on {device.type}"},
        "settings": {"prompt_tokens": PROMPT_TOKENS, "new_tokens_batch_1": NEW_TOKENS, "batch_steps": BATCH_STEPS,
                     "streamer_depth": DEPTH, "batches": list(BATCHES)},
        "definitions": {
            "seconds_per_step": "one decode step (one new token per sequence, KV cache of a short prompt), timed "
                                "with CUDA events on a GPU; median of the steps after the first (a warm-up)",
            "resident": "every one of the layers computing on the GPU with no copies: the offloaded layers all "
                        "bound to one resident copy of one offloaded layer's bytes (same shapes, same kernels); "
                        "each batch's sequence is run twice and the second pass timed",
            "bound": "max(resident seconds per step at that batch, offloaded bytes / measured pinned bandwidth)",
            "budget": "CUDA context (measured) + PyTorch's allocator cap = 80 GB",
        },
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        results["wall_seconds"] = time.perf_counter() - started
        results["peak_host_rss"] = peak_rss()
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    # --- 1. setup: the plan, the CUDA context, the cap (about 15 s) ---
    placement, plan_info = placement_from_plan(config, args.tiny)
    results["plan_09"] = plan_info
    model = skeleton(config)
    layers = model.model.layers
    layout = streaming.layer_layout(layers[0])
    n = config.num_hidden_layers
    n_cpu = len(placement)
    offloaded_bytes = n_cpu * layout.nbytes
    device_map = streaming.layer_device_map(n, 0 if on_gpu else "cpu", placement)
    results["placement"] = {"gpu_layers": n - n_cpu, "cpu_layers": n_cpu, "cpu_layer_indices": sorted(placement),
                            "layer_bytes": layout.nbytes, "offloaded_bytes": offloaded_bytes,
                            "device_map": device_map,
                            "differs_from_09": "model.norm and lm_head stay on the GPU (09's plan puts them in RAM): "
                                               "the streamer streams whole decoder layers only"}
    log(f"placement: {n - n_cpu} decoder layers on the GPU, {n_cpu} in host RAM "
        f"({format_bytes(offloaded_bytes, 'GB')} offloaded, {format_bytes(layout.nbytes, 'GB')} per layer)", started)
    budget = {"budget_bytes": BUDGET_BYTES}
    if on_gpu:
        torch.ones(1, device=device).add_(1)
        a = torch.randn(1024, 1024, device=device, dtype=torch.float16)
        (a @ a).sum().item()  # cuBLAS handle and workspace exist now
        del a
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(device)
        runtime = total - free - torch.cuda.memory_reserved(device)
        budget.update(total_bytes=total, runtime_bytes=runtime, allocator_cap_bytes=BUDGET_BYTES - runtime,
                      capped=not args.no_cap)
        if not args.no_cap:
            torch.cuda.set_per_process_memory_fraction((BUDGET_BYTES - runtime) / total, device)
        log(f"CUDA context and runtime outside PyTorch's allocator: {format_bytes(runtime, 'GB')}; allocator capped "
            f"at {format_bytes(BUDGET_BYTES - runtime, 'GB')} of {format_bytes(total, 'GB')} "
            f"(context + cap = {format_bytes(BUDGET_BYTES, 'GB')})", started)
    results["budget"] = budget
    save()

    # --- 2. weights: generated on the GPU; offloaded layers into one host buffer (30-60 s) ---
    t0 = time.perf_counter()
    host = build_weights(model, placement, layout, device)
    if on_gpu:
        torch.cuda.synchronize()
    results["weights_seconds"] = time.perf_counter() - t0
    results["host_buffer_bytes"] = 0 if host is None else host.numel()
    results["cuda_allocated_after_weights"] = torch.cuda.memory_allocated(device) if on_gpu else 0
    log(f"weights generated in {results['weights_seconds']:.1f} s: host buffer "
        f"{format_bytes(results['host_buffer_bytes'], 'GB')}, GPU allocated "
        f"{format_bytes(results['cuda_allocated_after_weights'], 'GB')}; peak host RSS "
        f"{format_bytes(peak_rss(), 'GB')}", started)
    save()

    # --- 3. bandwidth at the layer size (about 5 s) ---
    if on_gpu:
        pinned_bw = streaming.h2d_bandwidth(layout.nbytes, pinned=True, repeats=5)
        pageable_bw = streaming.h2d_bandwidth(layout.nbytes, pinned=False, repeats=5)
        # accelerate copies tensor by tensor: 09 (section 4) predicts it with the pageable rate at the mean tensor size
        tensor_bytes = layout.nbytes // len(layout.spans)
        pageable_tensor_bw = streaming.h2d_bandwidth(tensor_bytes, pinned=False, repeats=5)
        results["bandwidth"] = {"copy_bytes": layout.nbytes, "pinned_h2d": pinned_bw, "pageable_h2d": pageable_bw,
                                "tensor_copy_bytes": tensor_bytes, "pageable_h2d_tensor": pageable_tensor_bw}
        log(f"host->device, {format_bytes(layout.nbytes, 'GB')} copies: pinned {pinned_bw / 1e9:.1f} GB/s, "
            f"pageable {pageable_bw / 1e9:.1f} GB/s; pageable at the mean tensor size "
            f"({format_bytes(tensor_bytes, 'MB')}): {pageable_tensor_bw / 1e9:.1f} GB/s", started)
        gc.collect()
        torch.cuda.empty_cache()
    else:
        results["bandwidth"] = {"skipped": "no GPU"}
    save()

    # --- 4. accelerate at batch 1 (60-90 s on an H200 host) ---
    t0 = time.perf_counter()
    accelerate_run = {}
    try:  # a failure here is recorded and the streamer still runs
        model = dispatch_model(model, device_map=device_map, main_device=0 if on_gpu else "cpu")
        log(f"accelerate: dispatch_model in {time.perf_counter() - t0:.1f} s", started)
        accelerate_run = greedy(model, device, 1, NEW_TOKENS)
        results["accelerate"] = {k: v for k, v in accelerate_run.items() if k != "last_logits"}
        log(f"accelerate: {accelerate_run['seconds']:.3f} s per token at batch 1 (steps "
            f"{accelerate_run['all_seconds']}), tokens {accelerate_run['tokens'][0]}", started)
    except Exception as error:  # noqa: BLE001
        results["accelerate"] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        log(f"accelerate FAILED: {results['accelerate']['error']}", started)
    remove_hook_from_submodules(model)
    for i in placement:  # the offloaded layers: views into the host buffer again, whatever the hooks left
        bind_layer(layers[i], layout, host[sorted(placement).index(i) * layout.nbytes:][:layout.nbytes])
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    save()

    # --- 5. the streamer on the same bytes, page-locked in place (about 80 s) ---
    resident_batches = list(BATCHES)
    if on_gpu and placement:
        t0 = time.perf_counter()
        try:
            streaming.pin_in_place(host)
            pinned = True
        except RuntimeError as error:  # reported, and the streamer still runs (from pageable memory: not the bound)
            pinned = False
            results["pin_error"] = str(error)
            log(f"streamer: page-locking the host buffer FAILED ({error}); streaming from pageable memory", started)
        results["pinned"] = pinned
        results["pin_seconds"] = time.perf_counter() - t0
        log(f"streamer: {format_bytes(host.numel(), 'GB')} page-locked in place in {results['pin_seconds']:.1f} s",
            started)
        sources = {i: host[k * layout.nbytes:(k + 1) * layout.nbytes] for k, i in enumerate(sorted(placement))}
        streamer = streaming.LayerStreamer(layers, sources, layout, device, depth=DEPTH).attach()
        try:
            stream_run = greedy(model, device, 1, NEW_TOKENS)
            results["streamer"] = {k: v for k, v in stream_run.items() if k != "last_logits"}
            if "last_logits" in accelerate_run:
                difference = (stream_run["last_logits"] - accelerate_run["last_logits"]).abs().max().item()
                results["streamer"]["last_logits_equal_accelerate"] = bool(
                    torch.equal(stream_run["last_logits"], accelerate_run["last_logits"]))
                results["streamer"]["last_logits_max_abs_diff"] = difference
            log(f"streamer: {stream_run['seconds']:.3f} s per token at batch 1 (steps {stream_run['all_seconds']}), "
                f"tokens {stream_run['tokens'][0]}", started)
            save()
            free = (BUDGET_BYTES - budget["runtime_bytes"]) - torch.cuda.memory_allocated(device)
            biggest, formula = max_batch(config, free, PROMPT_TOKENS + BATCH_STEPS)
            if args.tiny and biggest > TINY_MAX_BATCH:  # a tiny model's budget holds absurd batches (469,567 on
                # an H200, where the batch runs then failed inside cuDNN's attention): a smoke test needs none
                formula += f"; capped at {TINY_MAX_BATCH} for --tiny"
                biggest = TINY_MAX_BATCH
            results["max_batch"] = {"batch": biggest, "free_bytes": free, "formula": formula}
            log(f"largest batch in the budget: {formula}", started)
            batches = [*BATCHES, biggest] if biggest > BATCHES[-1] else list(BATCHES)
            resident_batches = batches
            rows = run_batches(model, device, batches, "streamer", results, started, passes=1)
            if biggest > BATCHES[-1] and "error" in rows[-1]:  # the estimate was too generous: say so, try 70%
                smaller = max(BATCHES[-1] + 1, int(0.7 * biggest))
                results["max_batch"]["fallback"] = smaller
                rows += run_batches(model, device, [smaller], "streamer", results, started, passes=1)
                resident_batches = [*BATCHES, smaller]
            results["streamer_batches"] = rows
            results["streamer_stats"] = repr(streamer.stats)
        except Exception as error:  # noqa: BLE001  recorded; the resident phase still runs
            results["streamer_error"] = f"{type(error).__name__}: {str(error)[:500]}"
            results.setdefault("streamer", {"error": results["streamer_error"]})
            results.setdefault("streamer_batches", [])
            log(f"streamer FAILED: {results['streamer_error']}", started)
        finally:
            streamer.remove()
            if pinned:
                streaming.unpin(host)
        del streamer  # its device slots go too
        gc.collect()
        torch.cuda.empty_cache()
        save()
    else:
        results["streamer"] = {"skipped": "no GPU: the streamer moves host memory to a GPU" if not on_gpu
                               else "nothing offloaded"}
        results["streamer_batches"] = []

    # --- 6. resident compute: every layer on the GPU, offloaded ones sharing one resident copy (about 15 s) ---
    shared = None
    if placement:
        first = sorted(placement)[0]
        shared = host[:layout.nbytes].to(device) if on_gpu else host[:layout.nbytes]
        for i in placement:
            bind_layer(layers[i], layout, shared)
    results["resident_batches"] = run_batches(model, device, resident_batches, "resident", results, started,
                                              passes=2 if on_gpu else 1)
    results["resident_shared_layer"] = None if shared is None else first
    del shared
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        results["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    save()

    # --- the bound, the ratios, 09's predictions for the measured links ---
    summarize(results, on_gpu, layout.nbytes, n)
    save()
    print(report(results), flush=True)
    log(f"wrote {out}", started)
    acc_tokens, stream_tokens = results["accelerate"].get("tokens"), results["streamer"].get("tokens")
    if stream_tokens is not None and acc_tokens is not None:
        assert acc_tokens == stream_tokens, f"greedy tokens differ: accelerate {acc_tokens}, streamer {stream_tokens}"
    return 0


def summarize(results: dict, on_gpu: bool, layer_bytes: int, n_layers: int) -> None:
    placement = results["placement"]
    resident = {row["batch"]: row["seconds_per_step"] for row in results["resident_batches"] if "error" not in row}
    acc = results["accelerate"].get("seconds")
    stream = results["streamer"].get("seconds")
    summary: dict = {"accelerate_seconds": acc, "streamer_seconds": stream, "resident_seconds": resident.get(1)}
    if stream is not None and acc is not None:
        summary["tokens_equal"] = results["accelerate"]["tokens"] == results["streamer"]["tokens"]
        summary["accelerate_over_streamer"] = acc / stream
    bw = results["bandwidth"]
    if "pinned_h2d" in bw and 1 in resident:
        transfer = placement["offloaded_bytes"] / bw["pinned_h2d"]
        bound = streaming.Bound(resident[1], placement["offloaded_bytes"], bw["pinned_h2d"])
        summary["transfer_seconds"] = transfer
        summary["bound_seconds"] = bound.seconds
        summary["bound"] = repr(bound)
        if stream is not None:
            summary["streamer_over_bound"] = stream / bound.seconds
        by_batch = []
        b1 = next((r for r in results["streamer_batches"] if r["batch"] == 1 and "error" not in r), None)
        for row in results["streamer_batches"]:
            entry = {"batch": row["batch"]}
            if "error" in row:
                entry["error"] = row["error"]
            else:
                entry.update(streamer_seconds=row["seconds_per_step"], tokens_per_second=row["tokens_per_second"])
                if b1:
                    entry["throughput_over_batch_1"] = row["tokens_per_second"] / b1["tokens_per_second"]
            if row["batch"] in resident:
                entry["resident_seconds"] = resident[row["batch"]]
                entry["bound_seconds"] = max(resident[row["batch"]], transfer)
                entry["compute_dominates"] = resident[row["batch"]] > transfer
            by_batch.append(entry)
        summary["by_batch"] = by_batch
        # 09's estimate_speed with Links built from this run's bandwidths (no disk tier here)
        gpu_bytes = (n_layers - placement["cpu_layers"]) * layer_bytes
        pageable = bw.get("pageable_h2d_tensor", bw["pageable_h2d"])  # 09's method: at accelerate's copy size
        links = Links(bw["pinned_h2d"], pageable, float("inf"), H200_MEMORY_BANDWIDTH,
                      f"measured on {results['card']}, {results['date']}")
        predictions = {}
        for label, compute in (("measured_compute", resident[1]), ("datasheet_compute", None)):
            speed = estimate_speed(gpu_bytes, placement["offloaded_bytes"], 0, links, resident_seconds=compute)
            predictions[label] = {"accelerate_seconds": speed.accelerate_seconds, "bound_seconds": speed.bound_seconds,
                                  "resident_seconds": speed.resident_seconds, "pcie_seconds": speed.pcie_seconds,
                                  "pageable_seconds": speed.pageable_seconds}
        predictions["links"] = {"pinned_h2d": bw["pinned_h2d"], "pageable_h2d": pageable,
                                "pageable_source": "pageable_h2d_tensor: one copy of the mean tensor size, as "
                                                   "accelerate copies (09 section 4's method)"
                                if "pageable_h2d_tensor" in bw else "pageable_h2d: one layer-sized copy",
                                "device_memory": H200_MEMORY_BANDWIDTH,
                                "device_memory_source": "NVIDIA H200 datasheet, 4.8 TB/s"}
        predictions["gpu_bytes"] = gpu_bytes
        p = predictions["measured_compute"]
        if acc is not None:
            predictions["accelerate_measured_over_predicted"] = acc / p["accelerate_seconds"]
        if stream is not None:
            predictions["streamer_measured_over_predicted"] = stream / p["bound_seconds"]
        summary["predictions_09"] = predictions
    checks = {}
    if "streamer_over_bound" in summary:
        checks["streamer_within_1.1x_of_bound"] = summary["streamer_over_bound"] <= 1.1
    if "accelerate_over_streamer" in summary:
        checks["streamer_at_least_4x_faster_than_accelerate"] = summary["accelerate_over_streamer"] >= 4
    if "bound" in summary:
        preds = summary.get("predictions_09", {})
        for key in ("accelerate_measured_over_predicted", "streamer_measured_over_predicted"):
            if key in preds:
                checks[f"{key.split('_')[0]}_within_1.25x_of_prediction"] = 1 / 1.25 <= preds[key] <= 1.25
        b64 = next((e for e in summary.get("by_batch", [])
                    if e["batch"] == 64 and "throughput_over_batch_1" in e), None)
        if b64:
            checks["batch_64_at_least_40x_batch_1"] = b64["throughput_over_batch_1"] >= 40
    if "tokens_equal" in summary:
        checks["tokens_equal"] = summary["tokens_equal"]
    summary["checks"] = checks
    results["summary"] = summary


def report(results: dict) -> str:
    s = results["summary"]
    lines = [f"\n{results['card']}: {results['placement']['gpu_layers']} layers on the GPU, "
             f"{results['placement']['cpu_layers']} in RAM ({results['placement']['offloaded_bytes'] / 1e9:.1f} GB)"]
    lines.append(f"accelerate {s['accelerate_seconds']} s/token; streamer {s['streamer_seconds']} s/token; "
                 f"resident compute {s['resident_seconds']} s/step (batch 1)")
    if "bound" in s:
        lines.append(f"bound: {s['bound']}")
        for entry in s["by_batch"]:
            lines.append(f"  batch {entry['batch']:>5}: {json.dumps({k: v for k, v in entry.items() if k != 'batch'})}")
        lines.append(f"09's predictions for the measured links: {json.dumps(s['predictions_09'])}")
    lines.append(f"checks: {json.dumps(s['checks'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
