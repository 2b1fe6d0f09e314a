"""Where the parts of any causal language model are, read from the model itself (no Llama names assumed).

Llama calls its parts `model.embed_tokens`, `model.layers.N` and `lm_head`; GPT-2 calls them `transformer.wte`,
`transformer.h.N` and `lm_head`; other families have other names. accelerate's planner never looks at names: it
keeps whole the modules whose class is in `no_split_module_classes` (transformers declares them on every model
as `_no_split_modules`) and measures everything else. `layout_of` reads a model the same way:

- the **blocks**: the `ModuleList` whose children are all instances of a `_no_split_modules` class;
- the **embedding**: `model.get_input_embeddings()`, and the **head**: `model.get_output_embeddings()`, the two
  accessors transformers defines on every causal LM; their names are found by identity among the modules;
- **tied**: the model declares its head's weight to be the embedding's (`all_tied_weights_keys`, transformers 5),
  so a checkpoint stores it once. The declaration, not the tensors, is read: under `init_empty_weights` a fresh
  skeleton's head and embedding are two tensors until `tie_weights()` runs (notebook 11, section 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class LayoutError(ValueError):
    """The model has no recognisable stack of decoder blocks (no `_no_split_modules`, or none of them in a list)."""


@dataclass(frozen=True)
class ModelLayout:
    """The names of a model's parts: its blocks, its embedding, its head, and whether head and embedding are tied."""

    model_class: str
    block_class: str  # e.g. "LlamaDecoderLayer", "GPT2Block": from the model's _no_split_modules
    blocks: str  # the ModuleList holding them, e.g. "model.layers", "transformer.h"
    num_blocks: int
    embedding: str  # e.g. "model.embed_tokens", "transformer.wte"
    head: str | None  # e.g. "lm_head"; None for a model without an output projection
    tied: bool  # the model declares the head's weight to be the embedding's

    def block(self, index: int) -> str:
        """The module name of block `index`, e.g. 'model.layers.3'."""
        return f"{self.blocks}.{index}"

    def block_index(self, name: str) -> int | None:
        """The block number of a module or tensor name ('model.layers.7.mlp' -> 7), or None outside the blocks."""
        match = re.match(re.escape(self.blocks) + r"\.(\d+)(?:\.|$)", name)
        return int(match.group(1)) if match else None

    def __repr__(self) -> str:
        head = f"{self.head} (tied to the embedding)" if self.tied else str(self.head)
        return (f"ModelLayout({self.model_class}: embedding {self.embedding}, {self.num_blocks} x {self.block_class} "
                f"in {self.blocks}.N, head {head})")


def _name_of(model: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def layout_of(model: torch.nn.Module) -> ModelLayout:
    """Read the layout of a transformers causal LM (a skeleton on meta is enough: nothing is computed)."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    if not no_split:
        raise LayoutError(f"{type(model).__name__} declares no _no_split_modules: there is no decoder block class "
                          "to keep whole, so accelerate's planner could cut anything; pass no_split_module_classes "
                          "yourself")
    blocks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module)
              and all(type(child).__name__ in no_split for child in module)]
    if not blocks:
        raise LayoutError(f"no list of {sorted(no_split)} blocks found in {type(model).__name__}")
    blocks_name, block_list = max(blocks, key=lambda item: len(item[1]))  # the decoder stack is the longest list
    embedding = _name_of(model, model.get_input_embeddings())
    head_module = model.get_output_embeddings()
    head = _name_of(model, head_module)
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    tied = head is not None and tied_keys.get(f"{head}.weight") == f"{embedding}.weight"
    return ModelLayout(type(model).__name__, type(block_list[0]).__name__, blocks_name, len(block_list), embedding,
                       head, tied)
