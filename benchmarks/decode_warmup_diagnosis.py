"""Why the first decode steps of a fresh process are slow on a GPU: a per-shape cost, or a per-process one?

The offload benchmark saw resident decode at ~80 ms per step in a fresh process and ~11 ms when the same steps
were repeated. Each decode step has a new KV-cache length, so anything built and cached per shape (an attention
plan, a GEMM heuristic) is paid once per length. This runs the benchmark's resident model three ways (SDPA as
configured, SDPA with cuDNN attention off, eager attention), each time: new lengths, the same lengths again, then
lengths never seen; and writes the per-step times to data/results/diagnostics/<card>-decode-shapes.json.

    PYTHONPATH=$PWD python3 benchmarks/decode_warmup_diagnosis.py --out data/results/diagnostics/x.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def decode_steps(model, prompt_tokens: int, steps: int) -> list[float]:
    ids = ((torch.arange(prompt_tokens)[None] * 7 + 3) % model.config.vocab_size).cuda()
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = model(ids, use_cache=True)
    cache, token = getattr(out, cache_name), out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(token, use_cache=True, **{cache_name: cache})
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
    return times


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=8, vocab_size=32000)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cudnn_sdp_enabled_by_default": torch.backends.cuda.cudnn_sdp_enabled(), "runs": {}}
    ms = lambda xs: [round(x * 1e3, 2) for x in xs]  # noqa: E731
    for name in ("sdpa", "sdpa_without_cudnn", "eager"):
        torch.backends.cuda.enable_cudnn_sdp(name != "sdpa_without_cudnn")
        model.set_attn_implementation("eager" if name == "eager" else "sdpa")
        base = {"sdpa": 16, "sdpa_without_cudnn": 100, "eager": 200}[name]  # lengths no earlier run used
        first = decode_steps(model, base, 12)
        again = decode_steps(model, base, 12)
        unseen = decode_steps(model, base + 40, 12)
        result["runs"][name] = {"new_lengths_ms": ms(first), "same_lengths_again_ms": ms(again),
                                "unseen_lengths_ms": ms(unseen)}
        print(f"{name:20s} new lengths {statistics.median(first) * 1e3:7.2f} ms | same again "
              f"{statistics.median(again) * 1e3:7.2f} ms | unseen lengths {statistics.median(unseen) * 1e3:7.2f} ms",
              flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
