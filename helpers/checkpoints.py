"""A deterministic, cached factory of checkpoints: any config -> sharded safetensors + index.json.

Nothing is downloaded: weights are generated tensor by tensor from a seed (normal with the
config's `initializer_range`, norms at one), so a 70B-shaped *structure* at any scale can be
written with only one shard in memory at a time. The folder is keyed by config, seed, dtype and
shard size, written to a temporary name and renamed when complete, and reused when present.

The sharding is huggingface_hub's (`split_torch_state_dict_into_shards`, what `save_pretrained` and
`save_torch_state_dict` use), called on meta tensors so that the plan costs no memory; the shard file
names, `metadata.total_size` and `weight_map` of the index are the ones it returns. The shards are
written here one at a time, not by `save_torch_state_dict`, because that function needs the whole
state dict in memory at once (tests/test_checkpoints.py checks the result equals its output).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization import StateDictSplit
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from .memory import format_bytes
from .models import load_config, meta_model, scaled_config
from .paths import cache_dir

INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
_FACTORY_VERSION = 1  # bump when the generated values change
_PROGRESS_FROM_BYTES = 256 * 2**20  # show a progress bar for anything bigger


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or inconsistent (missing shard, missing tensor, truncated file)."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder written by the factory."""

    folder: Path
    shards: tuple[Path, ...]
    total_size: int  # bytes of tensor data, as index.json's metadata.total_size
    num_tensors: int
    dtype: torch.dtype
    seed: int
    reused: bool  # True when this call found it in the cache and wrote nothing

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_NAME

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    def __repr__(self) -> str:
        return (f"Checkpoint({len(self.shards)} shard(s), {self.num_tensors} tensors, "
                f"{format_bytes(self.total_size)} of {str(self.dtype).removeprefix('torch.')}, seed {self.seed}, "
                f"{'reused from cache' if self.reused else 'written'}\n  folder: {self.folder})")


def _as_config(config: PretrainedConfig | str | Path) -> PretrainedConfig:
    return config if isinstance(config, PretrainedConfig) else load_config(config)


def _parse_size(size: int | str) -> int:
    """Bytes as an int: "2GB" -> 2 * 10**9 by huggingface_hub's `parse_size_to_int` (`serialization/_base.py`:
    KB, MB, GB, TB, powers of ten, as `max_shard_size` is read by `save_pretrained`)."""
    return size if isinstance(size, int) else parse_size_to_int(size)


_NOT_IN_KEY = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")  # the dtype argument decides


def checkpoint_key(config: PretrainedConfig, seed: int, dtype: torch.dtype, max_shard_size: int) -> str:
    """The cache key: a hash of the config values, the seed, the dtype and the shard size."""
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    payload = json.dumps({"config": values, "seed": seed, "dtype": str(dtype), "shard": max_shard_size,
                          "version": _FACTORY_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tensor_specs(config: PretrainedConfig, dtype: torch.dtype) -> list[tuple[str, torch.Size]]:
    """Names and shapes of the tensors a checkpoint holds, in state_dict order (tied weights once)."""
    model = meta_model(config, dtype=dtype)
    specs = [(name, p.shape) for name, p in model.named_parameters()]  # shared parameters appear once
    persistent = set(model.state_dict())
    specs += [(name, b.shape) for name, b in model.named_buffers() if name in persistent]
    return specs


def generate_tensor(name: str, shape: torch.Size, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """One deterministic tensor: norms are ones, biases zeros, the rest normal(0, std) from a per-name seed."""
    if name.endswith("norm.weight") or re.search(r"\.ln_\w+\.weight$", name):  # RMSNorm/LayerNorm; GPT-2's ln_1
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(dtype)


def iter_tensors(config: PretrainedConfig | str, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the whole model, one tensor at a time."""
    config = _as_config(config)
    std = getattr(config, "initializer_range", 0.02)
    for name, shape in tensor_specs(config, dtype):
        yield name, generate_tensor(name, shape, seed, std, dtype)


def split_specs(specs: list[tuple[str, torch.Size]], dtype: torch.dtype, max_shard_size: int | str) -> StateDictSplit:
    """huggingface_hub's `split_torch_state_dict_into_shards` on meta tensors of these shapes (no memory used).

    Its rule (`serialization/_base.py`, `split_state_dict_into_shards_factory`): walk the tensors in
    order, close a shard when the next tensor would take it over `max_shard_size`, and give a tensor
    bigger than the limit a shard of its own (listed before the shard being filled).
    """
    state_dict = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in specs}
    return split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)


def plan_shards(specs: list[tuple[str, torch.Size]], dtype: torch.dtype, max_shard_size: int | str) -> list[list[str]]:
    """Tensor names grouped into shards, in file order, as `save_pretrained` would group them (see `split_specs`)."""
    return list(split_specs(specs, dtype, max_shard_size).filename_to_tensors.values())


def make_checkpoint(config: PretrainedConfig | str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    max_shard_size: int | str = "2GB", progress: bool | None = None) -> Checkpoint:
    """Write (or reuse) a sharded safetensors checkpoint of `config` with deterministic weights."""
    config = _as_config(config)
    shard_bytes = _parse_size(max_shard_size)
    key = checkpoint_key(config, seed, dtype, shard_bytes)
    name = getattr(config, "name_or_path", "") or config.model_type
    folder = cache_dir("checkpoints") / f"{Path(name).name or config.model_type}-{key}"
    if (folder / INDEX_NAME).is_file():
        return _describe(folder, dtype, seed, reused=True)

    specs = tensor_specs(config, dtype)
    split = split_specs(specs, dtype, shard_bytes)  # huggingface_hub's plan: file names, weight_map, total_size
    shapes = dict(specs)
    std = getattr(config, "initializer_range", 0.02)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = split.metadata["total_size"]
    show = progress if progress is not None else total >= _PROGRESS_FROM_BYTES

    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # only ever our own temporary folder
    tmp.mkdir(parents=True)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {folder.name}", disable=not show) as bar:
        for shard_name, group in split.filename_to_tensors.items():  # one shard in memory at a time
            tensors = {n: generate_tensor(n, shapes[n], seed, std, dtype) for n in group}
            save_file(tensors, tmp / shard_name, metadata={"format": "pt"})
            bar.update(sum(t.numel() * itemsize for t in tensors.values()))
            del tensors
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same checkpoint first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return _describe(folder, dtype, seed, reused=False)


def make_pickle_checkpoint(config: PretrainedConfig | str | Path, *, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write (or reuse) the same weights as one `torch.save` pickle file: the notes' "normal" format."""
    config = _as_config(config)
    key = checkpoint_key(config, seed, dtype, 0)
    folder = cache_dir("checkpoints", f"{Path(config.name_or_path).name or config.model_type}-pickle-{key}")
    path = folder / PICKLE_NAME
    if path.is_file():
        return path
    tmp = folder / f"{PICKLE_NAME}.tmp-{os.getpid()}"
    torch.save(dict(iter_tensors(config, seed, dtype)), tmp)
    config.save_pretrained(folder)
    tmp.rename(path)
    return path


def read_index(folder: str | Path) -> dict:
    """Read model.safetensors.index.json, with a clear error when it is missing or malformed."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: not a sharded safetensors checkpoint folder")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if "weight_map" not in index:
        raise CheckpointError(f"{path} has no 'weight_map'")
    return index


def weight_map(folder: str | Path) -> dict[str, str]:
    """Tensor name -> the safetensors file that holds it: the index's `weight_map` for a sharded checkpoint, or every
    tensor of the one file of an unsharded one (`model.safetensors`, what `save_pretrained` writes below its
    `max_shard_size`, which has no index)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return dict(read_index(folder)["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{folder} has no {INDEX_NAME} and {len(files)} safetensors files: an unsharded "
                              "checkpoint has exactly one")
    from safetensors import safe_open

    with safe_open(files[0], framework="pt") as f:
        return {name: files[0].name for name in f.keys()}


def read_safetensors_header(path: str | Path) -> dict:
    """Read a safetensors file's JSON header (names, dtypes, shapes, byte offsets) without its data.

    Written out as a lesson (the format is 8 bytes of header length, then JSON): the library's own view
    is `safetensors.safe_open(path, "pt")` with `.keys()`, `.metadata()` and `.get_slice(name).get_shape()`,
    which does not expose the byte offsets. tests/test_checkpoints.py checks that the two agree.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name} is truncated: {len(raw)} bytes, not even a header length")
        (length,) = struct.unpack("<Q", raw)
        if length > path.stat().st_size:
            raise CheckpointError(f"{path.name} is corrupt: header claims {length:,} bytes, file has "
                                  f"{path.stat().st_size:,}")
        try:
            return json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path.name} has a corrupt header ({exc})") from exc


def verify_checkpoint(folder: str | Path) -> dict[str, int]:
    """Check that index.json and the shards agree; return {shard: tensor count} or raise CheckpointError.

    Catches: a shard named in the index that is missing, a truncated shard, a tensor the index
    places in a shard that does not hold it, and total_size disagreeing with the shards.
    """
    folder = Path(folder)
    index = read_index(folder)
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(tensor)
    total = 0
    counts = {}
    for shard, tensors in sorted(by_shard.items()):
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"shard {shard} is named in {INDEX_NAME} for {len(tensors)} tensors "
                                  f"(e.g. {tensors[0]}) but does not exist in {folder}")
        header = read_safetensors_header(path)
        header.pop("__metadata__", None)
        missing = [t for t in tensors if t not in header]
        if missing:
            raise CheckpointError(f"{INDEX_NAME} places {missing[0]} in {shard}, which does not hold it "
                                  f"({len(missing)} such tensor(s))")
        (length,) = struct.unpack("<Q", path.open("rb").read(8))
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if path.stat().st_size < 8 + length + end:
            raise CheckpointError(f"shard {shard} is truncated: {path.stat().st_size:,} bytes, its header "
                                  f"needs {8 + length + end:,}")
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
        counts[shard] = len(header)
    declared = index.get("metadata", {}).get("total_size")
    if declared is not None and declared != total:
        raise CheckpointError(f"{INDEX_NAME} says total_size={declared:,} but the shards hold {total:,} bytes")
    return counts


def _describe(folder: Path, dtype: torch.dtype, seed: int, reused: bool) -> Checkpoint:
    index = read_index(folder)
    shards = tuple(sorted({folder / s for s in index["weight_map"].values()}))
    return Checkpoint(folder=folder, shards=shards, total_size=index["metadata"]["total_size"],
                      num_tensors=len(index["weight_map"]), dtype=dtype, seed=seed, reused=reused)


def check_matches_config(folder: str | Path, config: PretrainedConfig | str, dtype: torch.dtype | None = None) -> int:
    """Check that a checkpoint's tensors have the names and shapes the config's model expects.

    Returns the number of tensors checked; raises CheckpointError naming the first mismatch, which is
    far clearer than the size-mismatch error load_state_dict gives halfway through a load.
    """
    config = _as_config(config)
    expected = dict(tensor_specs(config, dtype or torch.float32))
    folder = Path(folder)
    weight_map = read_index(folder)["weight_map"]  # what loaders follow: a tensor not listed is never loaded
    missing = [n for n in expected if n not in weight_map]
    if missing:
        raise CheckpointError(f"{INDEX_NAME} lacks {len(missing)} tensor(s) the config's model needs, "
                              f"e.g. {missing[0]}: is it a checkpoint of this architecture, and is the index complete?")
    found: dict[str, list[int]] = {}
    for shard in sorted(set(weight_map.values())):
        header = read_safetensors_header(folder / shard)
        found.update({name: info["shape"] for name, info in header.items() if name != "__metadata__"})
    for name, shape in expected.items():
        if list(shape) != list(found[name]):
            raise CheckpointError(f"{name} has shape {tuple(found[name])} in the checkpoint but {tuple(shape)} "
                                  f"in the model built from the config: the config does not match this checkpoint "
                                  f"(compare hidden_size, intermediate_size, num_key_value_heads, vocab_size)")
    return len(expected)


def load_pickle_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a `torch.save` checkpoint safely: tensors only, never code (weights_only=True), clear error if not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path.name} contains more than tensors (a pickled Python object that would run code when loaded), "
            f"so it was refused. Load it with weights_only=False only if you trust its source, then re-save it "
            f"as safetensors. The unpickler said: {str(exc).splitlines()[-1][:300]}") from exc


def architecture_checkpoint(name: str, shards: int = 4, **scale) -> Checkpoint:
    """A checkpoint of a committed architecture (`helpers.models.OTHER_ARCHITECTURES`) at laptop scale, in about
    `shards` shards: `scaled_config(name, **scale)` through `make_checkpoint`. What the own-model test points
    BIGMODEL_CHECKPOINT at, and what you can try by hand (`print(architecture_checkpoint("gpt2").folder)`)."""
    config = scaled_config(name, **scale)
    total = sum(shape.numel() for _, shape in tensor_specs(config, torch.float32)) * 4
    return make_checkpoint(config, max_shard_size=total // shards + 1)


def sharded_copy(folder: str | Path, shards: int = 4) -> Path:
    """A sharded copy (with `model.safetensors.index.json`) of an unsharded checkpoint folder, in the suite's cache.

    For notebook 07, whose sections read a sharded checkpoint's index: a small model's `save_pretrained` writes one
    `model.safetensors` and no index. The copy is huggingface_hub's `save_torch_state_dict` (what `save_pretrained`
    calls) with a `max_shard_size` that gives about `shards` shards, plus every other file of the folder (config,
    tokenizer). It is keyed by the file's size and modification time, written to a temporary name and renamed, and
    reused when present. The tensors are read from the memory-mapped file and written once: the source is untouched.
    """
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if (folder / INDEX_NAME).is_file() or len(files) != 1:
        raise CheckpointError(f"{folder} is not an unsharded checkpoint (one .safetensors file and no index)")
    stat = files[0].stat()
    key = hashlib.sha256(f"{files[0].resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir("checkpoints") / f"{folder.name}-sharded-{key}"
    if (target / INDEX_NAME).is_file():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # only ever our own temporary folder
    tmp.mkdir(parents=True)
    state_dict = load_file(files[0])
    save_torch_state_dict(state_dict, tmp, max_shard_size=stat.st_size // shards + 1)
    for other in folder.iterdir():
        if other.is_file() and other.suffix != ".safetensors":
            shutil.copy2(other, tmp / other.name)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same copy first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
