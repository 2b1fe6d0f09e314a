"""Offloaded inference on one GPU: accelerate's hooks against the project's streamer, and the hardware bound.

One run measures, on an 8-layer, 4096-wide Llama in float16 (about 404 MB per decoder layer):
  * host-to-device bandwidth for layer-sized copies, from pinned and from pageable memory, and the
    disk's read rate (a freshly written file, dropped from the page cache);
  * decode (batch 1, one token with the KV cache of a 16-token prompt) and a 512-token prefill with
    every weight on the GPU;
  * accelerate (init_empty_weights + load_checkpoint_in_model + dispatch_model, i.e. what
    load_checkpoint_and_dispatch runs) and the streamer (helpers.streaming) with all 8 layers on
    the CPU, 4 on the CPU, and 4 on the CPU + 4 on disk; "disk" layers' files are dropped from the
    page cache before every timed step, so every step really reads the disk;
  * the streamer built up step by step (pinned memory, non_blocking, side stream, prefetch depth);
  * host memory (RSS, anonymous and file-backed) while the streamer runs.
It prints a table of each time against its bound, max(time with every weight resident, offloaded
bytes / measured pinned bandwidth), and writes every number to --out as JSON.

    PYTHONPATH=$PWD python3 benchmarks/offload_benchmark.py --out data/results/<card-slug>.json

Each measurement runs in a fresh child process (helpers.child.run_in_child), so memory readings
start clean and one failure does not take the others down. `--tiny` runs a small model (a smoke
test that also works without a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from helpers import streaming
from helpers.child import run_in_child
from helpers.measure import read_host_memory, reset_peak_rss
from helpers.paths import cache_dir

PLACEMENTS = {  # name -> (layers on "cpu", layers on "disk"), out of 8
    "all_cpu": (8, 0),
    "half_cpu": (4, 0),
    "half_cpu_half_disk": (4, 4),
}
LADDER = [  # the streamer built up step by step (all layers on the CPU, decode)
    ("one flat copy per layer, pageable, blocking", dict(pinned=False, non_blocking=False, side_stream=False, depth=0)),
    ("+ pinned (page-locked) host memory", dict(pinned=True, non_blocking=False, side_stream=False, depth=0)),
    ("+ non_blocking copies", dict(pinned=True, non_blocking=True, side_stream=False, depth=0)),
    ("+ side stream, 1 layer ahead", dict(pinned=True, non_blocking=True, side_stream=True, depth=1)),
    ("+ 2 layers ahead", dict(pinned=True, non_blocking=True, side_stream=True, depth=2)),
]
STREAMER = dict(pinned=True, non_blocking=True, side_stream=True, depth=2)  # the full streamer
RESIDENT_STEPS = 20  # timed decode steps of the all-resident run, whose fastest step is the bound's compute term


def model_config(tiny: bool):
    from helpers.models import load_config

    if tiny:
        values = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=2000)
    else:
        values = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000)
    config = load_config("llama-2-7b", num_hidden_layers=8, dtype="float16", **values)
    config._name_or_path = "offload-bench-tiny" if tiny else "offload-bench-8x4096"
    return config


def device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _skeleton(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16)


def _start_cuda() -> None:
    if torch.cuda.is_available():
        torch.ones(1, device="cuda").add_(1)  # the CUDA context: part of the resident process
        torch.cuda.synchronize()


def _evictor(paths: list[Path]):
    if not paths:
        return None
    return lambda: [streaming.drop_from_page_cache(p) for p in paths]


def _offload_files(offload_folder: Path, config, disk_layers: list[int]) -> list[Path]:
    return [p for i in disk_layers for p in offload_folder.glob(f"model.layers.{i}.*.dat")]


def _warm_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a moment before timing, so it runs at its steady clocks (an idle GPU clocks down)."""
    if not torch.cuda.is_available():
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def _timings(model, config, steps: int, prefill_repeats: int, before_step, prefill_tokens: int) -> dict:
    # On a GPU, time_decode times a replay of the same KV-cache lengths: each length seen for the first time in a
    # process cost ~65 ms more on an H100 (benchmarks/decode_warmup_diagnosis.py, data/results/diagnostics/).
    _warm_gpu()
    prefill = streaming.time_prefill(model, device(), tokens=prefill_tokens, repeats=prefill_repeats,
                                     warmup=1, before_step=before_step)
    decode = streaming.time_decode(model, device(), steps=steps, warmup=2, before_step=before_step)
    return {"decode": decode["seconds"], "decode_min": decode["min_seconds"], "decode_all": decode["all_seconds"],
            "prefill": prefill["seconds"], "prefill_min": min(prefill["all_seconds"]),
            "prefill_all": prefill["all_seconds"],
            # numpy, not tensors: tensors sent from a child are shared through file descriptors that die with it
            "decode_logits": decode["logits"].numpy(), "prefill_logits": prefill["logits"].numpy()}


# --- children ------------------------------------------------------------------------------------


def bandwidth_child(layer_bytes: int, disk_probe_bytes: int) -> dict:
    """Host-to-device bandwidth (pinned, pageable) for one layer-sized copy, and the disk's read rate."""
    result = {"copy_bytes": layer_bytes}
    if torch.cuda.is_available():
        _start_cuda()
        result["pinned_h2d"] = streaming.h2d_bandwidth(layer_bytes, pinned=True, repeats=8)
        result["pageable_h2d"] = streaming.h2d_bandwidth(layer_bytes, pinned=False, repeats=8)
        # PyTorch's own pinned allocator rounds each block up to a power of two:
        before = read_host_memory()
        pinned = torch.empty(layer_bytes, dtype=torch.uint8, pin_memory=True)
        after = read_host_memory()
        result["torch_pin_memory"] = {"requested": layer_bytes,
                                      "rss_added": (after.anon + after.file) - (before.anon + before.file)}
        try:
            stats = torch.cuda.host_memory_stats()
            result["torch_pin_memory"]["host_allocator_reserved"] = stats.get("reserved_bytes.current")
            result["torch_pin_memory"]["host_allocator_allocated"] = stats.get("allocated_bytes.current")
        except (AttributeError, RuntimeError):
            pass
        del pinned
    path = streaming.write_test_file(cache_dir("scratch") / "disk-probe.bin", disk_probe_bytes)
    try:
        # a shared disk reads faster at some moments than at others: a bound takes what the link can do
        result["disk_read_cold_all"] = [streaming.read_bandwidth(path, cold=True) for _ in range(3)]
        result["disk_read_cold"] = max(result["disk_read_cold_all"])
        result["disk_read_warm"] = streaming.read_bandwidth(path, cold=False)
    finally:
        path.unlink()
    return result


def resident_child(config, folder: str, steps: int, prefill_tokens: int) -> dict:
    """Every weight on the execution device: the compute term of the bound, and the resident process's host memory."""
    _start_cuda()
    start = read_host_memory()
    exec_device = 0 if torch.cuda.is_available() else "cpu"
    streamed = streaming.stream_model(_skeleton(config), folder, streaming.layer_device_map(8, exec_device))
    reset_peak_rss()
    result = _timings(streamed.model, config, steps, 10, None, prefill_tokens)
    peak = read_host_memory()
    # decode once more, after the prefills: a cross-check that the replayed decode is the steady state
    again = streaming.time_decode(streamed.model, device(), steps=steps, warmup=2)
    result["decode_after_prefill"], result["decode_after_prefill_all"] = again["seconds"], again["all_seconds"]
    result["host_memory"] = {"start_rss": start.anon + start.file, "start_anon": start.anon,
                             "peak_rss_during_run": peak.hwm, "anon_after": peak.anon, "file_after": peak.file}
    result["cuda_peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return result


def accelerate_child(config, folder: str, placement: dict, offload_folder: str, steps: int, prefill_repeats: int,
                     prefill_tokens: int) -> dict:
    """accelerate's hooks: the default offload path."""
    _start_cuda()
    start_memory = read_host_memory()
    exec_device = 0 if torch.cuda.is_available() else "cpu"
    device_map = streaming.layer_device_map(8, exec_device, placement)
    model = streaming.accelerate_model(config, folder, device_map, dtype=torch.float16, offload_folder=offload_folder)
    disk_layers = [i for i, d in placement.items() if d == "disk"]
    files = _offload_files(Path(offload_folder), config, disk_layers)
    reset_peak_rss()
    result = _timings(model, config, steps, prefill_repeats, _evictor(files), prefill_tokens)
    peak = read_host_memory()
    result["host_memory"] = {"start_rss": start_memory.anon + start_memory.file, "start_anon": start_memory.anon,
                             "peak_rss_during_run": peak.hwm, "anon_after": peak.anon, "file_after": peak.file}
    result["cuda_peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return result


def streamer_child(config, folder: str, placement: dict, options: dict, steps: int, prefill_repeats: int,
                   prefill_tokens: int, prefill: bool = True) -> dict:
    """The streamer at one placement with one set of options, and the host memory it needs."""
    _start_cuda()
    skeleton = _skeleton(config)
    start = read_host_memory()  # the resident process: interpreter, libraries, CUDA context, skeleton
    exec_device = 0 if torch.cuda.is_available() else "cpu"
    streamed = streaming.stream_model(skeleton, folder, streaming.layer_device_map(8, exec_device, placement),
                                      **options)
    after_setup = read_host_memory()
    disk = bool([d for d in placement.values() if d == "disk"])
    evict = _evictor(sorted({loc.path for loc in streaming.tensor_locations(folder).values()})) if disk else None
    reset_peak_rss()
    if prefill:
        result = _timings(streamed.model, config, steps, prefill_repeats, evict, prefill_tokens)
    else:
        decode = streaming.time_decode(streamed.model, device(), steps=steps, before_step=evict)
        result = {"decode": decode["seconds"], "decode_all": decode["all_seconds"],
                  "decode_logits": decode["logits"].numpy()}
    peak = read_host_memory()
    staging = len(streamed.streamer.staging) * streamed.streamer.layout.nbytes if streamed.streamer.staging else 0
    result["host_memory"] = {
        "start_rss": start.anon + start.file, "start_anon": start.anon, "start_file": start.file,
        "after_setup_rss": after_setup.anon + after_setup.file, "after_setup_anon": after_setup.anon,
        "peak_rss_during_run": peak.hwm, "anon_after": peak.anon, "file_after": peak.file,
        "host_store_bytes": streamed.host_bytes, "staging_bytes": staging,
    }
    result["stats"] = repr(streamed.streamer.stats)
    result["slots"] = streamed.streamer.depth + 1
    result["cuda_peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    streamed.close()
    return result


def ladder_child(config, folder: str, steps: int) -> list[dict]:
    """The streamer built up step by step, all layers on the CPU, decode only, in one process."""
    _start_cuda()
    exec_device = 0 if torch.cuda.is_available() else "cpu"
    rows = []
    for label, options in LADDER:
        streamed = streaming.stream_model(_skeleton(config), folder,
                                          streaming.layer_device_map(8, exec_device, streaming.split_placement(8, 8)),
                                          **options)
        _warm_gpu()
        decode = streaming.time_decode(streamed.model, device(), steps=steps, warmup=2)
        rows.append({"step": label, "options": options, "decode": decode["seconds"],
                     "decode_all": decode["all_seconds"], "decode_logits": decode["logits"].numpy()})
        streamed.close()
        del streamed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# --- the run -------------------------------------------------------------------------------------


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _child(fn, *args, **kwargs):
    started = time.perf_counter()
    result = run_in_child(fn, *args, interval=0.05, timeout=540, **kwargs)
    status = "ok" if result.ok else f"{result.error_type}: {str(result.error_message)[:300]}"
    print(f"  {fn.__name__}: {status} ({time.perf_counter() - started:.1f} s)", flush=True)
    if not result.ok:
        print(result.output[-3000:], flush=True)
        return {"error": f"{result.error_type}: {result.error_message}"}
    return result.value


def _compare(a: dict, b: dict) -> dict:
    """Are two runs' logits identical (same kernels on the same bytes)? Max difference otherwise."""
    out = {}
    if "error" in a or "error" in b:
        return {}
    for key in ("decode_logits", "prefill_logits"):
        if key in a and key in b:
            x, y = torch.from_numpy(a[key]), torch.from_numpy(b[key])
            n = min(len(x), len(y))  # decode: the steps both ran (runs with disk layers time fewer)
            x, y = (x[:n], y[:n]) if key == "decode_logits" else (x, y)
            out[key.removesuffix("_logits")] = {"equal": bool(torch.equal(x, y)),
                                                "max_abs_diff": float((x - y).abs().max())}
    return out


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.endswith("_logits")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="a small model: a smoke test, also without a GPU")
    parser.add_argument("--steps", type=int, default=5, help="timed decode steps per measurement")
    parser.add_argument("--skip-ladder", action="store_true")
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    args = parser.parse_args(argv)
    from accelerate import __version__ as accelerate_version
    from transformers import __version__ as transformers_version

    from helpers.checkpoints import make_checkpoint
    from helpers.memory import format_bytes

    started = time.perf_counter()
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"
    config = model_config(args.tiny)
    prefill_tokens = 64 if args.tiny else 512
    print(f"{card}: torch {torch.__version__}, transformers {transformers_version}, accelerate {accelerate_version}",
          flush=True)
    checkpoint = make_checkpoint(config, dtype=torch.float16, max_shard_size="2GB", progress=False)
    print(f"checkpoint: {checkpoint} ({time.perf_counter() - started:.1f} s)", flush=True)
    folder = str(checkpoint.folder)
    offload_folder = str(cache_dir("offload") / f"bench-{checkpoint.folder.name}")
    skeleton = _skeleton(config)
    layout = streaming.layer_layout(skeleton.model.layers[0])
    layer_bytes = layout.nbytes
    total_bytes = checkpoint.total_size
    print(f"one decoder layer: {format_bytes(layer_bytes, 'MB')}; model {format_bytes(total_bytes, 'GB')}", flush=True)

    results: dict = {
        "card": card, "slug": slug(card), "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers_version,
                     "accelerate": accelerate_version, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                  "num_hidden_layers": 8, "num_attention_heads": config.num_attention_heads,
                  "vocab_size": config.vocab_size, "dtype": "float16", "layer_bytes": layer_bytes,
                  "total_bytes": total_bytes, "prompt_tokens": 16, "prefill_tokens": prefill_tokens},
        "streamer_options": STREAMER,
        "definitions": {
            "resident process": "peak host RSS of the all-resident run (weights on the GPU, after the same steps)",
            "decode": "seconds for one decode step, batch 1, one token with the KV cache of a 16-token prompt "
                      "(median of the timed steps)",
            "prefill": f"seconds for one forward of {prefill_tokens} tokens, batch 1 (median)",
            "bound": "max(fastest step with every weight resident, offloaded bytes / measured pinned H2D bandwidth)",
            "bound_tiered": "max(resident time, offloaded bytes / pinned H2D, disk bytes / cold disk read rate)",
            "disk": "offloaded files are dropped from the page cache (posix_fadvise DONTNEED) before every timed step",
        },
    }
    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    print("bandwidth:", flush=True)
    bandwidth = _child(bandwidth_child, layer_bytes, 2**30 if not args.tiny else 64 * 2**20)
    results["bandwidth"] = bandwidth
    pinned_bw = bandwidth.get("pinned_h2d") or bandwidth.get("disk_read_warm")
    disk_bw = bandwidth.get("disk_read_cold")
    print(f"  {json.dumps({k: v for k, v in bandwidth.items() if not isinstance(v, dict)})}", flush=True)

    print("resident:", flush=True)
    # the compute floor: enough steps that the fastest is the steady state (each timed with CUDA events on a GPU)
    resident = _child(resident_child, config, folder, max(args.steps, RESIDENT_STEPS), prefill_tokens)
    results["resident"] = _strip(resident)
    save()

    results["placements"] = {}
    for name in args.placements:
        n_cpu, n_disk = PLACEMENTS[name]
        placement = streaming.split_placement(8, cpu=n_cpu, disk=n_disk)
        steps = args.steps if not n_disk else max(2, args.steps // 2)
        repeats = 3 if not n_disk else 1
        print(f"{name}:", flush=True)
        acc = _child(accelerate_child, config, folder, placement, offload_folder, steps, repeats, prefill_tokens)
        stream = _child(streamer_child, config, folder, placement, STREAMER, steps, repeats, prefill_tokens)
        offloaded = (n_cpu + n_disk) * layer_bytes
        entry = {"cpu_layers": n_cpu, "disk_layers": n_disk, "offloaded_bytes": offloaded,
                 "accelerate": _strip(acc), "streamer": _strip(stream),
                 "streamer_equals_accelerate": _compare(stream, acc),
                 "streamer_equals_resident": _compare(stream, resident)}
        if "error" not in resident and pinned_bw:
            floor = {k: resident.get(f"{k}_min", resident[k]) for k in ("decode", "prefill")}
            entry["bound"] = {k: max(floor[k], offloaded / pinned_bw) for k in ("decode", "prefill")}
            disk_term = n_disk * layer_bytes / disk_bw if disk_bw and n_disk else 0.0
            entry["bound_tiered"] = {k: max(entry["bound"][k], disk_term) for k in ("decode", "prefill")}
        results["placements"][name] = entry
        save()
        if name == "all_cpu":
            all_cpu_accelerate = acc

    if not args.skip_ladder:
        print("ladder:", flush=True)
        ladder = _child(ladder_child, config, folder, args.steps)
        if isinstance(ladder, list) and "all_cpu" in args.placements:
            results["ladder"] = [{**_strip(row), "equals_accelerate": _compare(row, all_cpu_accelerate).get("decode")}
                                 for row in ladder]
        else:
            results["ladder"] = ladder

    results["wall_seconds"] = time.perf_counter() - started
    save()
    results["checks"] = checks(results)
    save()
    print(report(results))
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


def checks(results: dict) -> dict:
    """The issue's targets, evaluated on this run's numbers."""
    out = {}
    entry = results.get("placements", {}).get("all_cpu", {})
    stream, acc = entry.get("streamer", {}), entry.get("accelerate", {})
    if "bound" in entry and "decode" in stream:
        out["streamer_decode_over_bound"] = stream["decode"] / entry["bound"]["decode"]
        out["streamer_within_1.25x_of_bound"] = out["streamer_decode_over_bound"] <= 1.25
    if "decode" in stream and "decode" in acc:
        out["accelerate_over_streamer_decode"] = acc["decode"] / stream["decode"]
        out["streamer_at_least_4x_faster"] = out["accelerate_over_streamer_decode"] >= 4
    memory = stream.get("host_memory")
    resident_memory = results.get("resident", {}).get("host_memory")
    if memory and resident_memory:
        # the resident process: the same model, every weight on the GPU, after running the same steps
        allowed = resident_memory["peak_rss_during_run"] + entry["offloaded_bytes"]
        out["host_peak_over_offloaded_plus_process"] = memory["peak_rss_during_run"] / allowed
        out["host_within_1.1x"] = out["host_peak_over_offloaded_plus_process"] <= 1.1
        out["host_peak_over_offloaded_plus_process_at_start"] = (
            memory["peak_rss_during_run"] / (memory["start_rss"] + entry["offloaded_bytes"]))
    equal = entry.get("streamer_equals_accelerate", {})
    if equal:
        out["streamer_equals_accelerate"] = all(v["equal"] for v in equal.values())
    return out


def report(results: dict) -> str:
    """The table: each time, its bound, and the ratio."""
    lines = [f"\n{results['card']}, {results['date']}: torch {results['versions']['torch']}, transformers "
             f"{results['versions']['transformers']}, accelerate {results['versions']['accelerate']}"]
    bw = results.get("bandwidth", {})
    if "pinned_h2d" in bw:
        lines.append(f"host->device, {bw['copy_bytes'] / 1e6:.0f} MB copies: pinned {bw['pinned_h2d'] / 1e9:.1f} GB/s, "
                     f"pageable {bw['pageable_h2d'] / 1e9:.1f} GB/s")
    if "disk_read_cold" in bw:
        lines.append(f"disk read: cold {bw['disk_read_cold'] / 1e9:.2f} GB/s, warm (page cache) "
                     f"{bw['disk_read_warm'] / 1e9:.2f} GB/s")
    resident = results.get("resident", {})
    rows = []
    for name, entry in results.get("placements", {}).items():
        if "bound" not in entry:
            continue
        for step in ("decode", "prefill"):
            for method in ("accelerate", "streamer"):
                value = entry[method].get(step)
                if value is not None:
                    rows.append((f"{name} {step} {method}", value, entry.get("bound_tiered", entry["bound"])[step]))
    if "decode" in resident:
        rows.insert(0, ("resident decode", resident["decode"], resident["decode"]))
        rows.insert(1, ("resident prefill", resident["prefill"], resident["prefill"]))
    lines.append(streaming.ratio_table(rows))
    ladder = results.get("ladder")
    bound = results.get("placements", {}).get("all_cpu", {}).get("bound", {}).get("decode")
    if isinstance(ladder, list) and bound:
        lines.append("\nthe streamer step by step (all layers on the CPU, decode):")
        lines.append(streaming.ratio_table([(row["step"], row["decode"], bound) for row in ladder]))
    process = resident.get("host_memory", {}).get("peak_rss_during_run")
    if "decode_after_prefill" in resident:
        lines.append(f"resident decode again after the prefills: {resident['decode_after_prefill']:.4f} s")
    for name, entry in results.get("placements", {}).items():
        memory = entry.get("streamer", {}).get("host_memory")
        if memory and process:
            allowed = process + entry["offloaded_bytes"]
            lines.append(f"{name}: streamer host peak RSS {memory['peak_rss_during_run'] / 1e9:.2f} GB vs resident "
                         f"process {process / 1e9:.2f} GB + offloaded {entry['offloaded_bytes'] / 1e9:.2f} GB = "
                         f"{allowed / 1e9:.2f} GB ({memory['peak_rss_during_run'] / allowed:.3f}x); equal to "
                         f"accelerate: {entry.get('streamer_equals_accelerate')}")
    lines.append(f"checks: {json.dumps(results.get('checks', {}))}")
    return "\n".join(lines)


if __name__ == "__main__":
    # Children are started with "spawn" and import their function by module name: run main() from the
    # module as `benchmarks.offload_benchmark`, not as __main__ (needs the repository root on PYTHONPATH).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import offload_benchmark

    sys.exit(offload_benchmark.main())
