"""The ways to load a checkpoint, each a few lines, each marking its phases on a memory timeline.

These run inside a child process (helpers.child.run_in_child) so each starts from a clean
baseline. The notebooks print their source: the lines here are the lesson.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PretrainedConfig

from .checkpoints import read_index
from .measure import MemoryTimeline, read_host_memory
from .models import load_config


def _start(config: str | PretrainedConfig, timeline: MemoryTimeline) -> PretrainedConfig:
    """Load the config and import the model code first, so the timeline measures only the loading."""
    config = load_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)  # imports the modeling code; costs no weights
    timeline.reset()
    return config


@torch.no_grad()
def _fingerprint(model: torch.nn.Module) -> dict:
    """A small summary proving what got loaded: parameter count, dtype, and a checksum of one weight."""
    weight = model.get_input_embeddings().weight
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(weight.dtype),
            "device": str(weight.device), "checksum": float(weight.sum())}  # reads every value, copies none


def naive_load(config_name: str | PretrainedConfig, pickle_path: str | Path, timeline: MemoryTimeline,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The notes' normal path: build the model (random init), torch.load the file, load_state_dict, move it."""
    config = _start(config_name, timeline)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # 1st copy: random weights
    timeline.mark("model built (random init)")
    state_dict = torch.load(pickle_path, weights_only=True)  # 2nd copy: the file's tensors
    timeline.mark("torch.load done")
    model.load_state_dict(state_dict)  # copies into the 1st copy
    timeline.mark("load_state_dict done")
    del state_dict
    timeline.mark("state_dict freed")
    if device != "cpu":
        model.to(device)  # the whole model must fit on the device
        timeline.mark(f"moved to {device}")
    return _fingerprint(model)


def meta_then_load(config_name: str, pickle_path: str | Path, timeline: MemoryTimeline) -> dict:
    """Fix 1: build on the meta device (no random init), then adopt the loaded tensors (assign=True)."""
    config = _start(config_name, timeline)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # shapes only
    timeline.mark("model built (meta)")
    state_dict = torch.load(pickle_path, weights_only=True)  # the only copy
    timeline.mark("torch.load done")
    model.load_state_dict(state_dict, assign=True)  # parameters *become* the loaded tensors
    timeline.mark("load_state_dict done")
    return _fingerprint(model)


def mmap_load(config_name: str, pickle_path: str | Path, timeline: MemoryTimeline) -> dict:
    """Fix 2: meta device + torch.load(mmap=True): tensors stay pages of the file until touched."""
    config = _start(config_name, timeline)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    timeline.mark("model built (meta)")
    state_dict = torch.load(pickle_path, weights_only=True, mmap=True)
    timeline.mark("torch.load(mmap=True) done")
    model.load_state_dict(state_dict, assign=True)
    timeline.mark("load_state_dict done")
    result = _fingerprint(model)  # reading every embedding value pulls those pages in
    timeline.mark("embedding read")
    return result


def safetensors_load(config_name: str, checkpoint_folder: str | Path, timeline: MemoryTimeline) -> dict:
    """Fix 3: meta device + safetensors shards, memory-mapped, one shard at a time."""
    config = _start(config_name, timeline)
    folder = Path(checkpoint_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    timeline.mark("model built (meta)")
    for shard in sorted(set(read_index(folder)["weight_map"].values())):
        model.load_state_dict(load_file(folder / shard), strict=False, assign=True)
        timeline.mark(f"{shard} loaded")
    return _fingerprint(model)


def dispatch_load(config_name: str | PretrainedConfig, checkpoint_folder: str | Path, budget_bytes: int,
                  offload_folder: str | Path, timeline: MemoryTimeline, dtype: torch.dtype = torch.float32,
                  prompt_tokens: int = 16) -> dict:
    """The fix, previewed: empty skeleton + load_checkpoint_and_dispatch under the budget, then a forward pass.

    With a GPU the budget is the GPU's share (the rest goes to CPU RAM); without one, CPU RAM is the
    fast tier (the budget) and disk the slow one.
    """
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    config = _start(config_name, timeline)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    timeline.mark("skeleton built (meta)")
    max_memory = {0: budget_bytes, "cpu": 64 * 2**30} if torch.cuda.is_available() else {"cpu": budget_bytes}
    model = load_checkpoint_and_dispatch(model, str(checkpoint_folder), device_map="auto", max_memory=max_memory,
                                         no_split_module_classes=model._no_split_modules,
                                         offload_folder=str(offload_folder), dtype=dtype)
    timeline.mark("dispatched")
    input_ids = torch.arange(prompt_tokens)[None] % config.vocab_size
    with torch.no_grad():
        logits = model(input_ids.to(next(iter(model.hf_device_map.values())) if torch.cuda.is_available() else "cpu")
                       ).logits
    timeline.mark("forward done")
    placement: dict[str, int] = {}
    for device in model.hf_device_map.values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    return {"placement": placement, "device_map": dict(model.hf_device_map),
            "last_logits": logits[0, -1, :8].float().cpu().tolist()}


def reference_logits(config_name: str | PretrainedConfig, checkpoint_folder: str | Path,
                     dtype: torch.dtype = torch.float32, prompt_tokens: int = 16) -> list[float]:
    """The same forward pass with the whole model in memory: the reference dispatch must match."""
    from safetensors.torch import load_file

    config = load_config(config_name) if isinstance(config_name, str) else config_name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder = Path(checkpoint_folder)
    for shard in sorted(set(read_index(folder)["weight_map"].values())):
        model.load_state_dict({k: v.to(dtype) for k, v in load_file(folder / shard).items()}, strict=False,
                              assign=True)
    model.tie_weights()  # assign=True replaced the embedding: point a tied lm_head at it again (a tied
    # checkpoint holds the weight once, so lm_head.weight is not in any shard)
    model.model.rotary_emb.to_empty(device="cpu")  # non-persistent buffer: recompute it
    model.model.rotary_emb.__init__(config)
    input_ids = torch.arange(prompt_tokens)[None] % config.vocab_size
    with torch.no_grad():
        return model(input_ids).logits[0, -1, :8].float().tolist()


def long_prompt_forward(config_name: str | PretrainedConfig, checkpoint_folder: str | Path,
                        prompt_lengths: list[int], timeline: MemoryTimeline, batch_size: int = 1,
                        device: str = "cpu") -> dict:
    """Load a model that fits, then run prefills of growing length until memory runs out.

    Returns the runtime's fixed cost (measured after a tiny warm-up forward: on a GPU mostly the
    cuBLAS workspace) and one row per prompt length: the memory the forward pass added on top
    (reserved private memory, what the cap counts, or CUDA memory), or the real error where it failed.
    """
    from safetensors.torch import load_file

    config = _start(config_name, timeline)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = Path(checkpoint_folder)
    for shard in sorted(set(read_index(folder)["weight_map"].values())):
        model.load_state_dict(load_file(folder / shard), strict=False, assign=True)
    model.model.rotary_emb.to_empty(device="cpu")
    model.model.rotary_emb.__init__(config)  # recompute the non-persistent rotary buffer
    model.to(device)
    on_gpu = device != "cpu"
    timeline.mark("weights loaded")
    loaded = torch.cuda.memory_allocated() if on_gpu else read_host_memory().data
    with torch.no_grad():
        model(torch.arange(8)[None].to(device), use_cache=True, logits_to_keep=1)  # warm-up
    overhead = (torch.cuda.memory_allocated() if on_gpu else read_host_memory().data) - loaded
    timeline.mark("warm-up forward")
    rows = []
    for length in prompt_lengths:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if on_gpu else read_host_memory().data
        timeline.mark(f"prefill {length}")
        input_ids = (torch.arange(length).repeat(batch_size, 1) % config.vocab_size).to(device)
        try:
            with torch.no_grad():
                out = model(input_ids, use_cache=True, logits_to_keep=1)
            timeline.sample()
            start = len(timeline.trace.t) - 1
            while start > 0 and timeline.trace.marks[-1][0] < timeline.trace.t[start - 1]:
                start -= 1
            peak = torch.cuda.max_memory_allocated() if on_gpu else max(timeline.trace.data[start:])
            rows.append({"tokens": length, "ok": True, "added": peak - before})
            del out
        except RuntimeError as exc:
            timeline.mark(f"OOM at {length}")
            rows.append({"tokens": length, "ok": False, "error": str(exc).splitlines()[0]})
            break
    return {"overhead": overhead, "rows": rows}


# --- progress bars: noise in a notebook that loads many times -----------------------------------------


@contextlib.contextmanager
def no_accelerate_bars():
    """Within the block, accelerate draws no progress bars while loading.

    `load_checkpoint_in_model` (accelerate/utils/modeling.py) draws a per-weight bar whenever
    `is_tqdm_available()`, and has no switch for it; the name is answered False there for the block.
    """
    import accelerate.utils.modeling as accelerate_modeling

    with mock.patch.object(accelerate_modeling, "is_tqdm_available", return_value=False):
        yield


def hide_loading_bars() -> None:
    """For the rest of this process, no loading progress bars: a notebook's setup calls it when bars are noise.

    transformers' "Loading weights" bars have a switch (`transformers.logging.disable_progress_bar`);
    accelerate's have none, so its `is_tqdm_available` is replaced in accelerate/utils/modeling.py by a
    function answering False. Calling it again changes nothing.
    """
    import accelerate.utils.modeling as accelerate_modeling
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    accelerate_modeling.is_tqdm_available = _no_tqdm


def _no_tqdm() -> bool:
    return False
