"""Your own model in notebooks 05, 07 and 09: the `BIGMODEL_CHECKPOINT` setting, read once for all three.

- `resolve_checkpoint` turns the setting into a folder: a local folder as it is; a hub id from your hub cache,
  offline, when it is there; from the hub when it is not and the network is allowed. An id that is neither
  cached nor reachable stops with `CannotTeach`, which says what to do (no traceback).
- `lesson_budget` chooses the budget that keeps a lesson about offloading true for any model: the virtual
  A100's ratio where it can, raised to what accelerate needs to put the embedding and one whole block in the
  fast tier when that is more (the issue a tied 150k-word embedding raises: at the ratio, everything went to disk).
- `check_fits_machine` stops a notebook at its first cell, with what is needed, when the model cannot be taught
  on this machine (05 keeps a whole reference copy in memory to compare the dispatched model against).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .device_maps import block_names, device_of, plan_device_map
from .layout import layout_of
from .memory import format_bytes

SETTING = "BIGMODEL_CHECKPOINT"
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class CannotTeach(RuntimeError):
    """This notebook cannot run its lesson on the model you chose; the message says why and what would work.

    Raised by the first cell, so that *Run All* stops there. In Jupyter it shows as its message alone (IPython
    renders an exception's `_render_traceback_()` instead of a traceback), since the stack says nothing useful.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\033[1;31mCannotTeach:\033[0m {self}"]


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the checkpoint a notebook runs comes from."""

    setting: str  # the value of BIGMODEL_CHECKPOINT ("" for the suite's own model)
    folder: Path | None  # None for the suite's own model (the notebook builds it)
    source: str  # "the suite's own model", "a local folder", "your hub cache (offline)", "downloaded from the hub"
    repo_id: str | None = None

    def __repr__(self) -> str:
        where = f": {self.folder}" if self.folder else ""
        return f"ResolvedCheckpoint({self.setting or 'default'!r} from {self.source}{where})"


def setting_value() -> str:
    """The value of BIGMODEL_CHECKPOINT, or "" when it is not set."""
    return os.environ.get(SETTING, "").strip()


def resolve_checkpoint(setting: str | None = None, *, allow_download: bool = True) -> ResolvedCheckpoint:
    """The folder behind `setting` (default: the environment variable): local folder, cached hub id, or download."""
    setting = setting_value() if setting is None else setting.strip()
    if not setting:
        return ResolvedCheckpoint("", None, "the suite's own model")
    path = Path(setting).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CannotTeach(f"{SETTING}={setting!r} is a folder without config.json: point it at the folder that "
                              "save_pretrained wrote (config.json and *.safetensors)")
        if not any(path.glob("*.safetensors")):
            raise CannotTeach(f"{SETTING}={setting!r} holds no *.safetensors file: these notebooks read safetensors "
                              "checkpoints (convert with save_pretrained(..., safe_serialization=True))")
        return ResolvedCheckpoint(setting, path.resolve(), "a local folder")
    if path.suffix or setting.count("/") != 1:
        raise CannotTeach(f"{SETTING}={setting!r} is neither a folder on this machine nor a hub id "
                          "(`organisation/name`)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the local cache first: no request at all
        folder = snapshot_download(setting, allow_patterns=_PATTERNS, local_files_only=True)
        return ResolvedCheckpoint(setting, Path(folder), "your hub cache (offline)", setting)
    except LocalEntryNotFoundError:
        pass
    offline = constants.is_offline_mode()
    if offline or not allow_download:
        why = "HF_HUB_OFFLINE is set" if offline else "downloads are not allowed here"
        raise CannotTeach(f"{setting!r} is not in your hub cache ({constants.HF_HUB_CACHE}) and {why}. "
                          f"Download it once where there is a network (`hf download {setting}`), or set "
                          f"{SETTING} to a local folder, or unset it to use the suite's own model.")
    try:
        folder = snapshot_download(setting, allow_patterns=_PATTERNS)
    except Exception as error:  # no network, gated repository, unknown id: say which, without a traceback
        raise CannotTeach(f"{setting!r} is not in your hub cache ({constants.HF_HUB_CACHE}) and could not be "
                          f"downloaded: {type(error).__name__}: {str(error).splitlines()[0][:300]}. Download it "
                          f"once where there is a network (`hf download {setting}`), or set {SETTING} to a local "
                          "folder.") from None
    return ResolvedCheckpoint(setting, Path(folder), "downloaded from the hub", setting)


@dataclass(frozen=True)
class LessonBudget:
    """The fast tier's budget for a dispatch lesson: the virtual A100's ratio, or more when a block would not fit."""

    ratio_bytes: int  # model / 3.449: the virtual A100 for this model
    minimum_bytes: int  # the least that accelerate's plan puts the first block in, whole
    model_bytes: int

    @property
    def bytes(self) -> int:
        return max(self.ratio_bytes, self.minimum_bytes)

    @property
    def raised(self) -> bool:
        return self.minimum_bytes > self.ratio_bytes

    @property
    def ratio(self) -> float:
        """Model bytes per budget byte: 3.449 unless raised."""
        return self.model_bytes / self.bytes

    def __repr__(self) -> str:
        if not self.raised:
            return (f"LessonBudget({format_bytes(self.bytes)}: the model / {self.ratio:.3f}, the virtual A100; "
                    f"one decoder block fits from {format_bytes(self.minimum_bytes)})")
        return (f"LessonBudget({format_bytes(self.bytes)}, raised from the virtual A100's "
                f"{format_bytes(self.ratio_bytes)}: at that ratio accelerate would place no whole decoder block in "
                f"the fast tier (it needs the embedding and what precedes the blocks, a block, and its reserve for "
                f"the largest layer); the model is now {self.ratio:.3f} budgets instead of "
                f"{self.model_bytes / self.ratio_bytes:.3f})")




def _quiet_plan(model: torch.nn.Module, max_memory: dict, strategy: str, no_split: list[str] | None,
                dtype: torch.dtype | None) -> dict:
    """`plan_device_map` without warnings: these trial plans (GPU 0 alone, a bisection's guesses) are never dispatched.

    On a GPU, `infer_auto_device_map` warns "Current model requires N bytes of buffer for offloaded layers, which
    seems does not fit any GPU's remaining memory" whenever a trial budget leaves GPU 0 less than its reserve plus
    the offloaded modules' buffers (it counts the reserve as used when it moves on to the next device).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_device_map(model, max_memory, strategy, no_split, dtype)


def _bisect_bytes(low: int, high: int, holds: Callable[[int], bool], step: int = 1024) -> tuple[int, int]:
    """Narrow [low, high] to `step` bytes around where `holds` turns True (False at low, True at high, monotone):
    (the largest byte count tried where it does not hold, the smallest where it does)."""
    while high - low > step:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle
    return low, high


def minimum_budget(model: torch.nn.Module, dtype: torch.dtype | None = None, first="cpu",
                   no_split: list[str] | None = None) -> int:
    """The least budget (to 1 KiB) for which accelerate's planner puts the first decoder block, whole, on `first`.

    Found by bisection over accelerate's own `infer_auto_device_map` (each plan is arithmetic on the skeleton),
    so it is the planner's answer, reserve included, whatever the model's layout.
    """
    from accelerate.utils import compute_module_sizes

    no_split = list(model._no_split_modules) if no_split is None else no_split
    first_block = block_names(model)[0]  # read once: the layout does not change between plans

    def holds_first_block(budget: int) -> bool:
        return device_of(first_block, _quiet_plan(model, {first: budget}, "sequential", no_split, dtype)) == first

    return _bisect_bytes(0, int(compute_module_sizes(model, dtype=dtype)[""]) * 2, holds_first_block)[1]


def lesson_budget(model: torch.nn.Module, ratio_bytes: int, dtype: torch.dtype | None = None,
                  first="cpu") -> LessonBudget:
    """The budget to dispatch `model` under: `ratio_bytes` (the virtual A100), raised to `minimum_budget` if needed.

    Raises CannotTeach when even that budget would hold the whole model: nothing would be offloaded.
    """
    from accelerate.utils import compute_module_sizes

    total = int(compute_module_sizes(model, dtype=dtype)[""])
    budget = LessonBudget(ratio_bytes, minimum_budget(model, dtype, first), total)
    plan = _quiet_plan(model, {first: budget.bytes}, "sequential", list(model._no_split_modules), dtype)
    if all(device == first for device in plan.values()):
        layout = layout_of(model)
        raise CannotTeach(f"{layout.model_class} has {layout.num_blocks} decoder block(s): the least budget that holds "
                          f"its embedding, one block and accelerate's reserve ({format_bytes(budget.bytes)}) holds "
                          "the whole model, so nothing would be offloaded. The lesson needs a model with more blocks.")
    return budget


def lesson_cpu_budget(model: torch.nn.Module, gpu_bytes: int, dtype: torch.dtype | None = None) -> int:
    """CPU RAM's budget beside a GPU of `gpu_bytes`, so that the dispatch uses all three tiers.

    Two GPU budgets: for the replica (3.449 budgets) that leaves about half a budget of blocks to the disk. A model
    whose lesson budget was raised is fewer budgets, and two would hold all of it beside the GPU: then the most
    (to 1 KiB) for which accelerate's "auto" plan still puts the last decoder block on disk, found by bisection.
    """
    no_split = list(model._no_split_modules)
    last_block = block_names(model)[-1]

    def leaves_disk(cpu_bytes: int) -> bool:
        plan = _quiet_plan(model, {0: gpu_bytes, "cpu": cpu_bytes}, "auto", no_split, dtype)
        return device_of(last_block, plan) == "disk"

    if leaves_disk(2 * gpu_bytes):
        return 2 * gpu_bytes
    # lesson_budget saw to it that GPU 0 alone does not hold the model: with no CPU RAM the last block is on disk
    return _bisect_bytes(0, 2 * gpu_bytes, lambda cpu_bytes: not leaves_disk(cpu_bytes))[0]


def check_fits_machine(needed_bytes: int, available_bytes: int, what: str) -> None:
    """Stop (CannotTeach) when `needed_bytes` exceed what this machine has available, saying what was needed."""
    if needed_bytes > available_bytes:
        raise CannotTeach(f"{what} needs about {format_bytes(needed_bytes, 'GB')}, and this machine has "
                          f"{format_bytes(available_bytes, 'GB')} available. Choose a smaller checkpoint, or unset "
                          f"{SETTING} to use the suite's own model.")
