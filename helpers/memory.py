"""Memory arithmetic: bytes per parameter, GB vs GiB, and what inference needs beyond the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GB = 10**9  # a gigabyte: what GPU vendors and disk makers print on the box
GiB = 2**30  # a gibibyte: what nvidia-smi, torch and most tools actually report
MB = 10**6
MiB = 2**20

#: Bytes one parameter takes in each storage type. int4 packs two values per byte.
BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "int4": 0.5,
}

_TORCH_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int8: "int8"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalise a dtype (`torch.float16`, "fp16", "float16", "half") to a key of BYTES_PER_PARAM."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_NAMES:
            raise ValueError(f"no byte size known for {dtype}")
        return _TORCH_NAMES[dtype]
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
               "bf16": "bfloat16", "i8": "int8", "i4": "int4"}
    name = aliases.get(dtype.lower(), dtype.lower())
    if name not in BYTES_PER_PARAM:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(BYTES_PER_PARAM)}")
    return name


def bytes_per_param(dtype: str | torch.dtype) -> float:
    """Bytes one parameter takes in `dtype`."""
    return BYTES_PER_PARAM[dtype_name(dtype)]


def weights_bytes(n_params: int, dtype: str | torch.dtype) -> int:
    """Bytes the weights of an `n_params` model take in `dtype` (weights only)."""
    return int(n_params * bytes_per_param(dtype))


def format_bytes(n: float, unit: str = "auto") -> str:
    """Readable bytes: `format_bytes(80e9, "GB")` -> '80.00 GB'; "auto" picks binary units (GiB, MiB)."""
    units = {"B": 1, "KB": 10**3, "MB": MB, "GB": GB, "TB": 10**12,
             "KiB": 2**10, "MiB": MiB, "GiB": GiB, "TiB": 2**40}
    if unit == "auto":
        unit = next((u for u in ("TiB", "GiB", "MiB", "KiB") if abs(n) >= units[u]), "B")
    if unit == "B":
        return f"{int(n):,} B"
    return f"{n / units[unit]:,.2f} {unit}"


@dataclass(frozen=True)
class GPU:
    """A GPU model and the memory printed on its box (decimal gigabytes)."""

    name: str
    memory_gb: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GB)


#: Common cards. Vendors quote decimal GB, and even those are rounded: an "80 GB" A100 exposes
#: 81,920 MiB = 85.9 GB to CUDA; we keep the box numbers, as a buyer would.
COMMON_GPUS: tuple[GPU, ...] = (
    GPU("T4 16 GB", 16),
    GPU("RTX 4090 24 GB", 24),
    GPU("A100 40 GB", 40),
    GPU("A100 80 GB", 80),
    GPU("H100 80 GB", 80),
)


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: str | torch.dtype = "float16") -> int:
    """Bytes of the KV cache: 2 (K and V) x layers x batch x tokens x kv_heads x head_dim x bytes.

    With grouped-query attention (Llama-2-70B: 8 KV heads for 64 query heads) the cache is
    num_attention_heads / num_key_value_heads times smaller than with full multi-head attention.
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(2 * config.num_hidden_layers * batch_size * seq_len * kv_heads * head_dim
               * bytes_per_param(dtype))


def activation_bytes(config, batch_size: int, seq_len: int, dtype: str | torch.dtype = "float16") -> int:
    """Peak bytes of live activations in one decoder layer during a prefill of `seq_len` tokens.

    Inference keeps no activations for backward, so only one layer's working set is alive at a
    time. Its largest terms: the residual stream and the MLP's gate, up and product tensors
    (batch x tokens x (2 hidden + 3 intermediate)), plus, with eager attention, two score
    matrices of batch x heads x tokens x tokens (each step, such as adding the mask or the
    softmax, makes a new one while the old one is still alive). Fused attention (SDPA, flash)
    never materialises the scores, so for those this is an upper estimate.
    """
    b = bytes_per_param(dtype)
    hidden, inter = config.hidden_size, config.intermediate_size
    stream = batch_size * seq_len * (2 * hidden + 3 * inter) * b
    scores = 2 * batch_size * config.num_attention_heads * seq_len * seq_len * b
    return int(stream + scores)


def gpu_by_name(name: str, gpus: tuple[GPU, ...] = COMMON_GPUS) -> GPU:
    """The GPU called `name` in `gpus` (COMMON_GPUS by default)."""
    for gpu in gpus:
        if gpu.name == name:
            return gpu
    raise ValueError(f"unknown GPU {name!r}; choose one of {[g.name for g in gpus]}")


def compute_dtype(dtype: str | torch.dtype) -> str:
    """The dtype activations and the KV cache live in: the weights' float type, float16 for int8/int4 weights."""
    name = dtype_name(dtype)
    return name if name in ("float32", "float16", "bfloat16") else "float16"


@dataclass(frozen=True)
class FitReport:
    """Does a model fit on a GPU? Weights + KV cache + activations against the memory on the box."""

    model: str
    dtype: str
    gpu: GPU
    n_params: int
    batch_size: int
    seq_len: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    estimated_extras: bool  # False when no config was given: KV cache and activations not estimated

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def margin_bytes(self) -> int:
        """GPU memory left over (negative: how much is missing)."""
        return self.gpu.memory_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0

    @property
    def verdict(self) -> str:
        margin = abs(self.margin_bytes)
        how_much = f"{format_bytes(margin, 'GB')} ({format_bytes(margin, 'GiB')})"
        return f"fits, {how_much} to spare" if self.fits else f"does NOT fit: short by {how_much}"

    def __repr__(self) -> str:
        def row(label: str, n: int) -> str:
            return f"  {label:<12}{format_bytes(n, 'GB'):>13} {format_bytes(n, 'GiB'):>13}"

        extras = [row("KV cache", self.kv_cache_bytes), row("activations", self.activation_bytes)]
        if not self.estimated_extras:
            extras = ["  (no config: KV cache and activations not estimated)"]
        return "\n".join([
            f"FitReport({self.model}, {self.n_params:,} params in {self.dtype} on {self.gpu.name}, "
            f"batch {self.batch_size} x {self.seq_len:,} tokens",
            row("weights", self.weights_bytes), *extras, row("total", self.total_bytes),
            row("GPU", self.gpu.memory_bytes),
            f"  {self.verdict}", ")"])


def fit_report(n_params: int, dtype: str | torch.dtype, gpu: GPU | str, *, config=None, batch_size: int = 1,
               seq_len: int = 0, model: str = "custom") -> FitReport:
    """Weights in `dtype`, plus (given a config) KV cache and activations in compute_dtype(dtype), against `gpu`."""
    gpu = gpu if isinstance(gpu, GPU) else gpu_by_name(gpu)
    extras = compute_dtype(dtype)
    kv = kv_cache_bytes(config, batch_size, seq_len, extras) if config is not None else 0
    act = activation_bytes(config, batch_size, seq_len, extras) if config is not None else 0
    return FitReport(model, dtype_name(dtype), gpu, n_params, batch_size, seq_len,
                     weights_bytes(n_params, dtype), kv, act, config is not None)
