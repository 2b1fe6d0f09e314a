"""A layer-wise split over every GPU of this machine, traced and timed: the committed results notebook 10 plots.

On a machine with two or more GPUs, one run:
  * plans the Llama-2-70B replica over all N GPUs with device_map="auto" (80 GB cards, as notebook 10);
  * dispatches it for real over cuda:0..N-1 and traces one forward pass of a 4-token prompt (batch 1)
    with helpers.tracing: when each block ran, on which GPU;
  * times a forward pass split over the N GPUs and with the whole model on cuda:0 (best of 5);
and writes everything to --out as JSON:

    PYTHONPATH=$PWD python3 benchmarks/multi_gpu_pipeline.py --out data/results/multi-gpu-<card-slug>-x<N>.json

Without two GPUs it stops with a message: there is nothing to measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

GiB = 2**30


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON file (default: data/results/multi-gpu-<card>-x<N>.json)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        print(f"this machine has {n_gpus} GPU(s): a split over several GPUs needs at least two", file=sys.stderr)
        return 1

    import accelerate
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from helpers import multi_gpu
    from helpers.checkpoints import make_checkpoint
    from helpers.device_maps import plan_device_map
    from helpers.models import replica_config, virtual_a100
    from helpers.paths import RESULTS_DIR

    replica = replica_config()
    checkpoint = make_checkpoint(replica, max_shard_size=int(virtual_a100(replica).budget_bytes * 9.2 / 80))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(replica, dtype=torch.float32)
    plan = plan_device_map(skeleton, {**dict.fromkeys(range(n_gpus), 75 * GiB), "cpu": 200 * GiB}, "auto",
                           skeleton._no_split_modules)
    input_ids = torch.arange(1, 5)[None]

    model = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch.float32)
    model, timeline = multi_gpu.trace_split(model, plan, input_ids)
    assert timeline.really_split, "the blocks did not run on the planned GPUs"
    split_seconds = multi_gpu.time_forward(model, input_ids, args.repeats)
    single = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch.float32).to("cuda:0")
    one_gpu_seconds = multi_gpu.time_forward(single, input_ids.to("cuda:0"), args.repeats)

    card = torch.cuda.get_device_name(0)
    results = {
        "card": card, "n_gpus": n_gpus, "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "model": {"name": "llama-2-70b-replica", "num_hidden_layers": replica.num_hidden_layers,
                  "hidden_size": replica.hidden_size, "dtype": "float32", "prompt_tokens": input_ids.shape[1]},
        "device_map": dict(plan),
        "timeline": timeline.to_dict(),
        "seconds_per_forward": {f"split over {n_gpus} GPUs": split_seconds, "one GPU": one_gpu_seconds},
        "overlapping_blocks": len(timeline.overlaps()),
    }
    out = args.out or RESULTS_DIR / f"multi-gpu-{slug(card)}-x{n_gpus}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(timeline)
    print(f"one forward pass: {split_seconds * 1e3:.2f} ms split over {n_gpus} GPUs, "
          f"{one_gpu_seconds * 1e3:.2f} ms on cuda:0 alone; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
