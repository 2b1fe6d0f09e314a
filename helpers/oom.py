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
