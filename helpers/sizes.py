"""How big a model and its largest layer are in each dtype, computed from its skeleton on the meta device.

"Largest layer" follows accelerate's definition (`accelerate.utils.calculate_maximum_sizes`): walk
the module tree from the top; a module with no children, or whose class is one of the model's
`_no_split_modules` (Llama: `LlamaDecoderLayer`), is one block that a device map never splits.
The biggest such block has to fit on one device at a time, which is why the later notebooks care.
Sizes here are weights only; buffers (Llama's rotary `inv_freq`) are counted apart, in their own dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
from dataclasses import dataclass
from unittest import mock

import torch
from accelerate import init_empty_weights
from transformers import AutoModel, PretrainedConfig

from .memory import dtype_name, format_bytes, weights_bytes
from .models import load_config, meta_model

#: The dtypes `accelerate estimate-memory` reports, in its order.
DEFAULT_DTYPES: tuple[str, ...] = ("float32", "float16", "int8", "int4")


def unsplittable_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The blocks a device map keeps whole, by name: leaf modules and `_no_split_modules` classes."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    blocks: dict[str, torch.nn.Module] = {}
    todo = list(model.named_children())
    while todo:
        name, module = todo.pop(0)
        children = list(module.named_children())
        if not children or type(module).__name__ in no_split:
            blocks[name] = module
        else:  # open it up, keeping the module order (depth first, as accelerate does)
            todo = [(f"{name}.{child_name}", child) for child_name, child in children] + todo
    return blocks


def largest_layer(model: torch.nn.Module) -> tuple[int, tuple[str, ...]]:
    """Parameters in the biggest unsplittable block, and the names of every block that big."""
    counts = {name: sum(p.numel() for p in block.parameters())
              for name, block in unsplittable_blocks(model).items()}
    biggest = max(counts.values())
    return biggest, tuple(name for name, count in counts.items() if count == biggest)


@dataclass(frozen=True)
class SizeTable:
    """A model's weights in each dtype: the whole model, and its largest unsplittable layer."""

    model: str
    parameters: int
    largest_layer_parameters: int
    largest_layer_names: tuple[str, ...]
    buffer_bytes: int  # buffers in their own dtype (Llama: rotary inv_freq); not weights, so not in the rows
    dtypes: tuple[str, ...] = DEFAULT_DTYPES

    def total_bytes(self, dtype: str | torch.dtype) -> int:
        """Bytes of all weights stored in `dtype`."""
        return weights_bytes(self.parameters, dtype)

    def largest_layer_bytes(self, dtype: str | torch.dtype) -> int:
        """Bytes of the largest layer's weights stored in `dtype`."""
        return weights_bytes(self.largest_layer_parameters, dtype)

    @property
    def largest_layer_label(self) -> str:
        first, others = self.largest_layer_names[0], len(self.largest_layer_names) - 1
        return first + (f" (and {others} more of the same size)" if others else "")

    def __repr__(self) -> str:
        def cell(n: int, decimal: str, binary: str) -> str:
            return f"{format_bytes(n, decimal):>12} {format_bytes(n, binary):>12}"

        rows = [f"  {d:<8} {cell(self.total_bytes(d), 'GB', 'GiB')}   "
                f"{cell(self.largest_layer_bytes(d), 'MB', 'MiB')}" for d in self.dtypes]
        return "\n".join([
            f"SizeTable({self.model}: {self.parameters:,} parameters; largest layer "
            f"{self.largest_layer_parameters:,} parameters = {self.largest_layer_label}",
            f"  {'dtype':<8} {'total':^25}   {'largest layer':^25}".rstrip(), *rows, ")"])


def sizes_of(model: torch.nn.Module, name: str, dtypes: tuple[str, ...] = DEFAULT_DTYPES) -> SizeTable:
    """Size table of an already built model (a meta skeleton costs nothing to measure)."""
    biggest, names = largest_layer(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return SizeTable(model=name, parameters=sum(p.numel() for p in model.parameters()),
                     largest_layer_parameters=biggest, largest_layer_names=names, buffer_bytes=buffers,
                     dtypes=tuple(dtype_name(d) for d in dtypes))


def model_sizes(config: PretrainedConfig | str, dtypes: tuple[str, ...] = DEFAULT_DTYPES) -> SizeTable:
    """Build `config`'s causal-LM skeleton on the meta device and tabulate its sizes in each dtype."""
    config = config if isinstance(config, PretrainedConfig) else load_config(config)
    return sizes_of(meta_model(config), config.name_or_path or config.model_type, dtypes)


def accelerate_estimate_table(config: PretrainedConfig, dtypes: tuple[str, ...] = DEFAULT_DTYPES) -> str:
    """The table `accelerate estimate-memory` prints, for a local config: its hub look-up replaced by an offline twin.

    The command's `create_empty_model` asks the hub for the config, then builds
    `AutoModel.from_config(config, torch_dtype=torch.float32)` under `init_empty_weights()`. We do
    that same build on our config (with `dtype=`, the transformers 5 spelling) and let the rest of
    the command (`gather_data`, `calculate_maximum_sizes`, `convert_bytes`, its table) run as shipped.
    """
    from accelerate.commands import estimate

    unknown = set(dtypes) - set(DEFAULT_DTYPES)
    if unknown:
        raise ValueError(f"estimate-memory only knows {DEFAULT_DTYPES}, not {sorted(unknown)}")

    def create_empty_model_offline(model_name, library_name, trust_remote_code=False, access_token=None):
        with init_empty_weights():
            return AutoModel.from_config(copy.deepcopy(config), dtype=torch.float32)

    args = argparse.Namespace(model_name=config.name_or_path or config.model_type, library_name="transformers",
                              trust_remote_code=False, dtypes=list(dtypes))
    printed = io.StringIO()
    with mock.patch.object(estimate, "create_empty_model", create_empty_model_offline), \
            contextlib.redirect_stdout(printed):
        estimate.estimate_command(args)
    return printed.getvalue()


def estimate_table_rows(table: str) -> dict[str, dict[str, str]]:
    """Parse estimate-memory's box table into {dtype: {column: cell}}, cells exactly as printed."""
    lines = [line.strip("│").split("│") for line in table.splitlines() if line.count("│") > 2]
    header, *rows = [[cell.strip() for cell in line] for line in lines]
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}
