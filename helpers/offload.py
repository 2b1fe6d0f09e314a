"""A minimal offloader written with plain PyTorch forward hooks: what accelerate's hooks do, in a few dozen lines.

The weights of the offloaded blocks stay where `weights` keeps them (host memory: a dict of
tensors, or a memory-mapped safetensors state dict). Just before a block's forward, a forward
pre-hook copies its weights onto the execution device; just after, a forward hook replaces them
with meta tensors, which frees the device copy. Nothing is ever copied back: the host copy was
never changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


def set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` ("mlp.up_proj.weight") of `root` by `value`."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


@dataclass
class MinimalOffloader:
    """Keeps the weights of `blocks` in `weights` and brings each block's onto `device` only for its forward."""

    model: torch.nn.Module
    weights: Mapping[str, torch.Tensor]  # full name -> host tensor; never modified
    blocks: list[str]  # the offloaded modules, e.g. ["model.layers.3", "model.layers.4"]
    device: torch.device
    handles: list = field(default_factory=list)  # the torch hook handles, to remove them

    def attach(self) -> MinimalOffloader:
        """Load everything else onto the device, leave the blocks on meta, and register the two hooks per block."""
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if name in self.weights and any(name.startswith(block + ".") for block in self.blocks):
                set_tensor(self.model, name, torch.empty_like(tensor, device="meta"))  # no storage until needed
            else:  # resident: a copy on the device (buffers not in the checkpoint keep their own values)
                set_tensor(self.model, name, self.weights.get(name, tensor).to(self.device, copy=True))
        for block in self.blocks:
            module = self.model.get_submodule(block)
            empty = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta}
            self.handles.append(module.register_forward_pre_hook(self._loader(block, list(empty))))
            self.handles.append(module.register_forward_hook(self._freer(empty)))
        return self

    def _loader(self, block: str, names: list[str]):
        def load(module, args):  # runs just before module.forward: copy the block's weights onto the device
            for name in names:
                set_tensor(module, name, self.weights[f"{block}.{name}"].to(self.device, copy=True))
        return load

    def _freer(self, empty: dict[str, torch.Tensor]):
        def free(module, args, output):  # runs just after module.forward: meta tensors replace the device copies
            for name, meta in empty.items():
                set_tensor(module, name, meta)
        return free

    def remove(self) -> None:
        """Unregister the hooks (the offloaded blocks stay on meta)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __repr__(self) -> str:
        return (f"MinimalOffloader({len(self.blocks)} blocks whose weights stay in host memory, executed on "
                f"{self.device}, {len(self.handles)} torch hooks)")


def minimal_offload(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], blocks: list[str],
                    device: str | torch.device) -> MinimalOffloader:
    """Offload `blocks` of `model` (a skeleton is fine) to `weights`; everything else goes to `device`."""
    return MinimalOffloader(model, weights, list(blocks), torch.device(device)).attach()
