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


#: Common cards. Vendors quote decimal GB, and even those are rounded: nvidia-smi lists an "80 GB" A100
#: as 81,920 MiB = 85.9 GB, and the CUDA runtime's total (torch.cuda.mem_get_info, an OOM message's
#: "total capacity") is several hundred MiB lower; we keep the box numbers, as a buyer would.
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
    head_dim is the config's own where it declares one (Gemma-2: 256, not hidden 2304 / 8 heads). Layers with a
    sliding window (Mistral-7B's and Phi-3-mini's configs declare one, Gemma-2 every other layer) keep at most the
    window's last tokens in transformers' cache (transformers/cache_utils.py, DynamicSlidingWindowLayer), so for a
    request longer than the window this counts more than the cache holds: an upper estimate.
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(2 * config.num_hidden_layers * batch_size * seq_len * kv_heads * head_dim
               * bytes_per_param(dtype))


#: Score matrices (batch x heads x tokens x tokens, in the compute dtype) alive at the peak of transformers'
#: eager attention (models/llama/modeling_llama.py, eager_attention_forward), per compute dtype. Measured with
#: measure_eager_attention: 2.0 in float32 on CPU (2.12 on an H200, with the q-sized tensors); 5.0 in float16
#: and bfloat16 on CPU; on an H200 4.19 (float16) and 5.12 (bfloat16). The softmax runs in float32
#: (`softmax(..., dtype=torch.float32).to(query.dtype)`), so half precision holds its scores, a float32 copy
#: (two matrices' worth) and the cast back. We keep the largest count measured for each dtype.
EAGER_SCORE_MATRICES: dict[str, float] = {"float32": 2, "float16": 5, "bfloat16": 5}


def intermediate_size(config) -> int:
    """The width of a decoder block's MLP, read from any config: `intermediate_size` (Llama, Mistral, Qwen2, Phi-3,
    Gemma-2), OPT's `ffn_dim`, Falcon's `ffn_hidden_size`, or GPT-2's `n_inner`, where None means 4 x the hidden size
    (transformers/models/gpt2/modeling_gpt2.py, GPT2Block: `config.n_inner if config.n_inner is not None else
    4 * hidden_size`)."""
    for name in ("intermediate_size", "ffn_dim", "ffn_hidden_size"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    if hasattr(config, "n_inner"):
        return int(config.n_inner or 4 * config.hidden_size)
    raise ValueError(f"{type(config).__name__} names no MLP width (intermediate_size, ffn_dim, ffn_hidden_size or "
                     "n_inner): the activation estimate needs it")


def activation_bytes(config, batch_size: int, seq_len: int, dtype: str | torch.dtype = "float16") -> int:
    """Peak bytes of live activations in one decoder layer during a prefill of `seq_len` tokens.

    Inference keeps no activations for backward, so only one layer's working set is alive at a
    time. Its largest terms: the residual stream and the MLP's gate, up and product tensors
    (batch x tokens x (2 hidden + 3 intermediate), the MLP width read by `intermediate_size`, so any
    family plans), plus EAGER_SCORE_MATRICES[dtype] score matrices of batch x heads x tokens x tokens
    in `dtype`: what transformers' eager attention holds at its peak (2 in float32; 5 in
    float16/bfloat16, whose softmax runs in float32), as measured by measure_eager_attention. For
    eager attention it is the largest count measured per dtype (CPU and H200), so a device with other
    softmax kernels could hold more; fused attention (SDPA, flash) never materialises the scores, so
    for those it is an upper estimate.
    """
    name = dtype_name(dtype)
    b = bytes_per_param(name)
    hidden, inter = config.hidden_size, intermediate_size(config)
    stream = batch_size * seq_len * (2 * hidden + 3 * inter) * b
    scores = EAGER_SCORE_MATRICES[name] * batch_size * config.num_attention_heads * seq_len * seq_len * b
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


@dataclass(frozen=True)
class AttentionPeak:
    """Peak memory of one eager_attention_forward call above its inputs, in score matrices of its dtype."""

    dtype: str
    device: str
    shape: tuple[int, int, int, int]  # batch, heads, tokens, head_dim
    peak_bytes: int
    score_bytes: int  # one batch x heads x tokens x tokens matrix in dtype
    how: str

    @property
    def score_matrices(self) -> float:
        return self.peak_bytes / self.score_bytes


def measure_eager_attention(dtype: str | torch.dtype, *, batch: int = 1, heads: int = 8, kv_heads: int = 2,
                            tokens: int = 512, head_dim: int = 64, device: str | None = None) -> AttentionPeak:
    """Run transformers' real eager_attention_forward (causal mask, no dropout) and measure its peak above its inputs.

    On CUDA: torch.cuda.max_memory_allocated after a warm-up call and reset_peak_memory_stats. On a CPU:
    torch.profiler's memory timeline (profile_memory=True; _memory_profile is a private torch API), which records
    each tensor's creation and destruction; the running sum's maximum is the peak. The q-sized tensors
    (repeated K/V, output) count too; they shrink as tokens grow.
    """
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    name = dtype_name(dtype)
    torch_dtype = {v: k for k, v in _TORCH_NAMES.items()}[name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)

    def rand(n_heads: int) -> torch.Tensor:
        return torch.randn(batch, n_heads, tokens, head_dim, generator=gen).to(device=device, dtype=torch_dtype)

    query, key, value = rand(heads), rand(kv_heads), rand(kv_heads)
    mask = torch.full((tokens, tokens), torch.finfo(torch_dtype).min, dtype=torch_dtype).triu(1)
    mask = mask.expand(batch, 1, tokens, tokens).contiguous().to(device)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)

    def call() -> None:
        out, weights = eager_attention_forward(module, query, key, value, mask, head_dim**-0.5)
        del out, weights

    if device.startswith("cuda"):
        call()  # warm-up: the first matmul allocates cuBLAS's workspace, which is no part of the peak
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak, how = torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    else:
        import os
        import sys

        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action

        sys.stderr.flush()
        saved_stderr = os.dup(2)  # the profiler's C++ side prints start/stop lines to fd 2; keep them out
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                             with_stack=True) as prof:
                    call()
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        live = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
            peak = max(peak, live)
        how = "torch.profiler memory timeline"
    score = batch * heads * tokens * tokens * bytes_per_param(name)
    return AttentionPeak(name, device, (batch, heads, tokens, head_dim), int(peak), int(score), how)


def eager_score_matrices(dtype: str | torch.dtype, *, tokens: int = 512, **shape) -> float:
    """Score matrices alive at eager attention's peak, without the q-sized tensors.

    The peak is s score matrices (tokens^2 each) plus q-sized tensors (tokens x head_dim): in units of one score
    matrix, r(t) = s + c / t. Measuring at t and 2t gives s = 2 r(2t) - r(t), whatever c is.
    """
    r1 = measure_eager_attention(dtype, tokens=tokens, **shape).score_matrices
    r2 = measure_eager_attention(dtype, tokens=2 * tokens, **shape).score_matrices
    return 2 * r2 - r1
