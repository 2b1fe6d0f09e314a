"""Decode speed of quantised weights on one GPU: float16 resident against bitsandbytes int8 and NF4 (notebook 12).

For each format the same checkpoint (a Llama with deterministic random float16 weights, Llama-2-7B's shape by
default, written once to --work) is loaded the way people load it, `from_pretrained(..., device_map={"": 0})`:

  * float16: `dtype=torch.float16`, every weight resident;
  * int8: `BitsAndBytesConfig(load_in_8bit=True)` (LLM.int8, threshold 6.0 as bitsandbytes' default);
  * nf4: `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)`;
  * nf4-dq: the same with `bnb_4bit_use_double_quant=True`.

Then greedy decoding (`generate`, `do_sample=False`, a fixed number of new tokens, `min_new_tokens` equal so no
run stops early) at batch 1 and batch 32 after one warm-up call, timed with `torch.cuda.synchronize()` around it,
--repeats times (the median is the result; every time is kept): tokens/s = batch x new tokens / seconds (the
prompt's prefill included, printed separately). GPU memory after the load (`torch.cuda.memory_allocated`) and the
stored bytes of helpers.quantization.measure_footprint are recorded, and the GPU's memory bandwidth is measured
(a device-to-device copy, bytes read + written / seconds) so that each step can be set against its memory bound,
stored bytes / bandwidth: decoding reads every weight once per step.

Writes data/results/quantization-<card-slug>.json with the card, the date and the library versions; notebook 12
reads every such file and plots it.

    PYTHONPATH=$PWD python3 benchmarks/quantization_speed.py             # one GPU; Llama-2-7B shape, about 3 min
    PYTHONPATH=$PWD python3 benchmarks/quantization_speed.py --layers 8  # a quicker 8-layer model of that shape
    PYTHONPATH=$PWD python3 benchmarks/quantization_speed.py --smoke     # CPU smoke test of the code (tiny model)

Without CUDA it exits with a message (status 2) unless --smoke is given; a smoke run never writes data/results/.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ("float16", "int8", "nf4", "nf4-dq")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_checkpoint(config, folder: Path, device: str, dtype: torch.dtype) -> None:
    """Deterministic random weights (std = initializer_range), saved once as safetensors."""
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 2**31, repeats: int = 5) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` (the median of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def time_generate(model, batch: int, prompt: int, new_tokens: int, vocab: int, device: str,
                  repeats: int = 1) -> dict:
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    mask = {"attention_mask": torch.ones_like(ids), "pad_token_id": 0}  # no padding: every prompt is full length
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, **mask}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, **mask)  # warm-up
        sync(device)
        start = time.perf_counter()
        model(ids)  # the prefill alone, to print beside the decode
        sync(device)
        prefill = time.perf_counter() - start
        every = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            sync(device)
            every.append(time.perf_counter() - start)
            assert out.shape == (batch, prompt + new_tokens), out.shape
    seconds = sorted(every)[len(every) // 2]
    return {"batch_size": batch, "prompt_tokens": prompt, "new_tokens": new_tokens, "seconds": seconds,
            "seconds_every_repeat": every, "prefill_seconds": prefill, "tokens_per_s": batch * new_tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="llama-2-7b", help="a committed config (data/configs), default llama-2-7b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (same width)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per batch size (median kept)")
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test on a tiny config; writes no result")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        print("quantization_speed.py measures GPU decode speed and needs CUDA: no CUDA device is visible "
              f"(torch {torch.__version__}). Run it on a GPU machine, or pass --smoke to test the code on this CPU.")
        return 2

    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM

    from helpers.models import load_config
    from helpers.paths import RESULTS_DIR
    from helpers.quantization import load_kwargs, measure_footprint

    device = "cuda:0" if on_gpu else "cpu"
    dtype = torch.float16
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    if args.smoke:
        overrides = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 512}
        args.batches, args.new_tokens, args.prompt, args.repeats = [1, 4], 4, 8, 2
    config = load_config(args.config, **overrides)
    card = torch.cuda.get_device_name(0) if on_gpu else "CPU smoke test"
    out = args.out or (Path(tempfile.gettempdir()) / "quantization-smoke.json" if args.smoke
                       else RESULTS_DIR / f"quantization-{slug(card)}.json")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "bitsandbytes": bitsandbytes.__version__, "cuda": torch.version.cuda}
    print(f"{card}: {versions}", flush=True)
    results = {"card": card, "slug": slug(card), "date": datetime.date.today().isoformat(), "versions": versions,
               "model": f"{args.config}" + (f", {config.num_hidden_layers} layers" if overrides else ""),
               "parameters": None, "runs": [], "loads": {},
               "copy_bandwidth_bytes_per_s": copy_bandwidth(device) if on_gpu else None}
    if on_gpu:
        print(f"device-to-device copy: {results['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.work or Path(tmp)) / f"{args.config}-{config.num_hidden_layers}"
        start = time.perf_counter()
        write_checkpoint(config, folder, device, dtype)
        print(f"checkpoint in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
        for fmt in FORMATS:
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": device}, **load_kwargs(fmt, dtype))
            model.eval()
            footprint = measure_footprint(model, fmt)
            results["parameters"] = results["parameters"] or sum(p.numel() for p in model.parameters())
            results["loads"][fmt] = {"seconds": time.perf_counter() - start, "stored_bytes": footprint.total,
                                     "gpu_allocated": torch.cuda.memory_allocated() if on_gpu else None,
                                     "gpu_peak": torch.cuda.max_memory_allocated() if on_gpu else None}
            print(f"{fmt}: loaded in {results['loads'][fmt]['seconds']:.1f} s, {footprint}", flush=True)
            for batch in args.batches:
                run = {"format": fmt, **time_generate(model, batch, args.prompt, args.new_tokens,
                                                      config.vocab_size, device, args.repeats)}
                results["runs"].append(run)
                every = ", ".join(f"{s:.2f}" for s in run["seconds_every_repeat"])
                print(f"  batch {batch:3d}: {run['tokens_per_s']:9.1f} tokens/s (median of {every} s for "
                      f"{run['new_tokens']} new tokens; prefill {run['prefill_seconds'] * 1e3:.1f} ms)", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2) + "\n")  # after every run: a crash keeps what ran
            del model
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
