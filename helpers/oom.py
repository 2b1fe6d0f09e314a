"""Predicting where memory runs out, to set beside where it really does (helpers.child runs it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .memory import activation_bytes, format_bytes, kv_cache_bytes
from .models import meta_model


@dataclass(frozen=True)
class LoadPrediction:
    """Where building the model runs out: the parameter whose allocation crosses the budget."""

    parameter: str  # the first parameter that no longer fits
    parameter_bytes: int
    allocated_before: int  # bytes of parameters already allocated when it is requested
    budget_bytes: int
    model_bytes: int

    def __repr__(self) -> str:
        return (f"LoadPrediction(fails allocating {self.parameter} ({format_bytes(self.parameter_bytes)}) "
                f"with {format_bytes(self.allocated_before)} of {format_bytes(self.model_bytes)} allocated, "
                f"{self.allocated_before / self.model_bytes:.0%} of the model; "
                f"budget {format_bytes(self.budget_bytes)})")


def predict_load_failure(config: PretrainedConfig, dtype: torch.dtype, budget_bytes: int) -> LoadPrediction | None:
    """Walk the parameters in construction order; return the first whose allocation exceeds the budget.

    `ModelClass(config)` allocates parameters module by module in this order (named_parameters is
    registration order), so the running total says exactly where the first copy stops fitting.
    Returns None when the whole model fits.
    """
    model = meta_model(config, dtype=dtype)
    sizes = [(name, p.numel() * p.element_size()) for name, p in model.named_parameters()]
    total = sum(size for _, size in sizes)
    allocated = 0
    for name, size in sizes:
        if allocated + size > budget_bytes:
            return LoadPrediction(name, size, allocated, budget_bytes, total)
        allocated += size
    return None


def predict_prefill_bytes(config: PretrainedConfig, tokens: int, batch_size: int = 1,
                          dtype: str = "float32") -> int:
    """Memory a prefill adds on top of the weights: the KV cache plus one layer's activations (eager attention)."""
    return kv_cache_bytes(config, batch_size, tokens, dtype) + activation_bytes(config, batch_size, tokens, dtype)


def first_prompt_that_fails(config: PretrainedConfig, lengths: list[int], room_bytes: int, batch_size: int = 1,
                            dtype: str = "float32") -> int | None:
    """The first prompt length whose predicted prefill memory exceeds the room left after the weights."""
    for length in lengths:
        if predict_prefill_bytes(config, length, batch_size, dtype) > room_bytes:
            return length
    return None


# --- on a GPU: the caching allocator reserves memory in segments ---------------------------------

_SMALL_SIZE = 2**20  # tensors up to 1 MiB share 2 MiB segments
_SMALL_SEGMENT = 2 * 2**20
_LARGE_SEGMENT = 20 * 2**20  # tensors between 1 and 10 MiB share 20 MiB segments
_MIN_LARGE_ALLOC = 10 * 2**20  # bigger tensors get their own segment, rounded up to 2 MiB


def cuda_segment_for(nbytes: int) -> int:
    """Size of the segment PyTorch's CUDA caching allocator reserves when no cached block fits `nbytes`."""
    if nbytes <= _SMALL_SIZE:
        return _SMALL_SEGMENT
    if nbytes < _MIN_LARGE_ALLOC:
        return _LARGE_SEGMENT
    return -(-nbytes // (2 * 2**20)) * (2 * 2**20)


def predict_cuda_load_failure(config: PretrainedConfig, dtype: torch.dtype,
                              budget_bytes: int) -> LoadPrediction | None:
    """Like predict_load_failure, for `model.to("cuda")` under a CUDA memory budget.

    The budget (set_per_process_memory_fraction) limits *reserved* memory, and the allocator
    reserves in segments (2 MiB for tensors up to 1 MiB, 20 MiB for tensors up to 10 MiB, else the
    tensor rounded up to 2 MiB), so the move fails when the next segment does not fit: up to one
    segment before the tensor bytes alone would reach the budget. Tensors are moved in module order
    (each module's parameters, then its buffers).
    """
    model = meta_model(config, dtype=dtype)
    tensors = []
    for module in model.modules():  # the order Module.to() visits them in
        tensors += [(f"{module.__class__.__name__}.{n}", t) for n, t in module.named_parameters(recurse=False)]
        tensors += [(f"{module.__class__.__name__}.{n}", t) for n, t in module.named_buffers(recurse=False)]
    names = {id(p): n for n, p in model.named_parameters()}
    free_tails: dict[bool, list[int]] = {True: [], False: []}  # small pool, large pool: free bytes per segment
    reserved = allocated = 0
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    for name, tensor in tensors:
        size = max(512, -(-tensor.numel() * tensor.element_size() // 512) * 512)
        small = size <= _SMALL_SIZE
        fitting = [i for i, free in enumerate(free_tails[small]) if free >= size]
        if fitting:
            best = min(fitting, key=lambda i: free_tails[small][i])  # best fit, as the allocator does
            free_tails[small][best] -= size
        else:
            segment = cuda_segment_for(size)
            if reserved + segment > budget_bytes:
                return LoadPrediction(names.get(id(tensor), name), tensor.numel() * tensor.element_size(),
                                      allocated, budget_bytes, total)
            reserved += segment
            free_tails[small].append(segment - size)
        allocated += tensor.numel() * tensor.element_size()
    return None
