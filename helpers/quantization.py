"""Quantised weights as bitsandbytes and torchao store them: the bytes predicted from shapes, and measured.

The arithmetic of notebook 01 (`helpers.memory.BYTES_PER_PARAM`: int8 = 1 byte, int4 = 0.5 byte for every
parameter) is the first answer. The libraries store more and less than that:

- only `nn.Linear` layers are quantised, and not the output head: transformers 5.24,
  `integrations/bitsandbytes.py::replace_with_bnb_linear` converts `type(module) is nn.Linear` (and Conv1D)
  unless `quantizers/base.py::get_keys_to_not_convert` names it (tied weights, the last parameter, the output
  embeddings). Embeddings and norms are not Linear: they stay in the float dtype of the load;
- LLM.int8 (bitsandbytes 0.50.2, `nn/modules.py::Int8Params._quantize` calls
  `functional.int8_vectorwise_quant`): 1 byte per weight + one float32 scale per output row (`SCB`);
- NF4 (`functional.quantize_4bit`, blocksize 64 by default in `nn/modules.py::Params4bit.__new__`): 4 bits per
  weight + one float32 absmax per block of 64 weights + the 16-value NF4 code (float32);
- NF4 with double quantisation (`compress_statistics=True` in `quantize_4bit`): the absmax values, less their
  mean (`offset`, one float32), are quantised again by `quantize_blockwise(..., blocksize=256)`: 1 byte per
  block + one float32 absmax per 256 blocks + that quantiser's 256-value code (float32);
- torchao 0.18 int8 weight-only (`Int8WeightOnlyConfig` -> `torchao.quantization.Int8Tensor`): int8 `qdata`,
  one float32 `scale` per output row (`Int8Tensor.from_hp`: `scale_dtype=torch.float32`) and one int8
  `zero_point` per row.

`predict_footprint` does this arithmetic on a model's shapes (a meta model is enough); `measure_footprint`
adds up the bytes of the tensors a loaded model really holds, including the scales that
`PreTrainedModel.get_memory_footprint` does not see (it counts parameters and buffers only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.memory import GPU, FitReport, fit_report, format_bytes

#: The formats this module knows, and what each stores for one quantised Linear weight.
FORMATS: dict[str, str] = {
    "float32": "4 bytes per weight",
    "float16": "2 bytes per weight",
    "int8": "bitsandbytes LLM.int8: 1 byte per weight + a float32 scale (SCB) per output row",
    "nf4": "bitsandbytes NF4: 0.5 byte per weight + a float32 absmax per 64 weights + 16-value code",
    "nf4-dq": "bitsandbytes NF4, double quantisation: 0.5 byte per weight + a 1-byte absmax per 64 weights"
              " + a float32 per 256 blocks + offset + codes",
    "torchao-int8": "torchao int8 weight-only: 1 byte per weight + a float32 scale + an int8 zero point per row",
}
NF4_BLOCKSIZE = 64  # bitsandbytes nn/modules.py Params4bit.__new__: blocksize None -> 64
NESTED_BLOCKSIZE = 256  # bitsandbytes functional.py quantize_4bit: quantize_blockwise(absmax - offset, blocksize=256)
NF4_CODE_VALUES = 16  # the NF4 lookup table kept in QuantState.code (float32)
DYNAMIC_CODE_VALUES = 256  # the 8-bit dynamic map of quantize_blockwise, kept in state2.code (float32)
FLOAT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    return fmt


def linear_weight_bytes(out_features: int, in_features: int, fmt: str, cpu_repacked: bool = False) -> tuple[int, int]:
    """(weight bytes, scale bytes) one Linear weight of this shape takes in `fmt` (bias not included).

    `cpu_repacked`: NF4 as bitsandbytes 0.50.2 holds it after its first forward on a CPU with AVX512-BF16
    (`nn/modules.py::Linear4bit.forward` -> `functional.py::_convert_weight_packed_for_cpu`): same packed
    bytes, but one bfloat16 absmax per block, the nested state dequantised and dropped (its offset kept).
    """
    n = out_features * in_features
    fmt = _format(fmt)
    if fmt in ("float32", "float16"):
        return n * (4 if fmt == "float32" else 2), 0
    if fmt == "int8":
        return n, 4 * out_features  # CB int8 [out, in], SCB float32 [out]
    if fmt == "torchao-int8":
        return n, out_features * (4 + 1)  # qdata int8 [out, in], scale float32 [out, 1], zero_point int8 [out, 1]
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    packed = math.ceil(n / 2)  # two 4-bit values per uint8
    if cpu_repacked:
        return packed, 2 * blocks + 4 * NF4_CODE_VALUES + (4 if fmt == "nf4-dq" else 0)
    if fmt == "nf4":
        return packed, 4 * blocks + 4 * NF4_CODE_VALUES
    # nf4-dq: 1-byte absmax per block, float32 absmax per 256 blocks, 256-value code, float32 offset, NF4 code
    return packed, blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * DYNAMIC_CODE_VALUES + 4 + 4 * NF4_CODE_VALUES


@dataclass(frozen=True)
class Footprint:
    """Bytes of a model in one format: quantised weights, their scales, and everything left in float."""

    format: str
    quantized_weights: int  # the int8 / packed 4-bit data of the quantised Linear layers (0 for float formats)
    scales: int  # SCB, absmax, codes, offsets, zero points
    unquantized: int  # parameters left in float (embeddings, norms, the head; all of them for float formats)
    buffers: int  # e.g. the rotary inv_freq

    @property
    def total(self) -> int:
        return self.quantized_weights + self.scales + self.unquantized + self.buffers

    def __repr__(self) -> str:
        return (f"Footprint({self.format}: total {format_bytes(self.total, 'MiB')} = quantised "
                f"{format_bytes(self.quantized_weights, 'MiB')} + scales {format_bytes(self.scales, 'MiB')} "
                f"+ float {format_bytes(self.unquantized, 'MiB')} + buffers {self.buffers:,} B)")


def quantized_linear_names(model: torch.nn.Module) -> list[str]:
    """The Linear layers transformers' bitsandbytes integration replaces (its own rules, called, not copied)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)]


def predict_footprint(model: torch.nn.Module, fmt: str, dtype: torch.dtype = torch.float16,
                      cpu_repacked: bool = False) -> Footprint:
    """The bytes `model` (any float model of the architecture, e.g. on meta) takes in `fmt`, from shapes only.

    For float formats every parameter is in that format; for quantised ones, the Linear layers of
    `quantized_linear_names` are stored as FORMATS says and every other parameter stays in `dtype`.
    `cpu_repacked`: NF4 after bitsandbytes repacked it for the CPU (see `linear_weight_bytes`).
    """
    fmt = _format(fmt)
    quantized = set(quantized_linear_names(model)) if fmt not in ("float32", "float16") else set()
    float_bytes = FLOAT_BYTES[{"float32": torch.float32, "float16": torch.float16}.get(fmt, dtype)]
    q = s = other = 0
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if name in quantized and pname == "weight":
                w, sc = linear_weight_bytes(param.shape[0], param.shape[1], fmt, cpu_repacked)
                q, s = q + w, s + sc
            else:
                other += param.numel() * float_bytes
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Footprint(fmt, q, s, other, buffers)


def _quant_state_bytes(state) -> int:
    """Bytes of every tensor in a bitsandbytes QuantState, nested state included."""
    if state is None:
        return 0
    total = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif type(value).__name__ == "QuantState":
            total += _quant_state_bytes(value)
    return total


def tensor_parts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors inside `t`: itself, or a tensor subclass's inner tensors (torchao), by name."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        parts: dict[str, torch.Tensor] = {}
        for n in names:
            for k, v in tensor_parts(getattr(data, n)).items():
                parts[n if k == "" else f"{n}.{k}"] = v
        return parts
    return {"": data}


def measure_footprint(model: torch.nn.Module, fmt: str) -> Footprint:
    """The bytes of the tensors `model` really holds: quantised data, scales (SCB, absmax, ...), floats, buffers."""
    q = s = other = 0
    for param in model.parameters():
        parts = tensor_parts(param)
        if len(parts) > 1:  # torchao: qdata is the weight, the rest are scales and zero points
            for name, part in parts.items():
                nbytes = part.numel() * part.element_size()
                if name == "qdata":
                    q += nbytes
                else:
                    s += nbytes
            continue
        nbytes = param.numel() * param.element_size()
        if param.dtype in (torch.int8, torch.uint8):  # bitsandbytes Int8Params / Params4bit
            q += nbytes
            scb = getattr(param, "SCB", None)
            s += 0 if scb is None else scb.numel() * scb.element_size()
            s += _quant_state_bytes(getattr(param, "quant_state", None))
        else:
            other += nbytes
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Footprint(fmt, q, s, other, buffers)


def relative_difference(predicted: int, measured: int) -> float:
    """|predicted - measured| / measured."""
    return abs(predicted - measured) / measured


def quantized_fit_report(model: torch.nn.Module, config, fmt: str, gpu: GPU | str, *, batch_size: int = 1,
                         seq_len: int = 0, name: str = "custom", dtype: torch.dtype = torch.float16) -> FitReport:
    """helpers.memory.fit_report, with the weights as the libraries store them (predict_footprint) in `fmt`.

    fit_report prices every parameter at 01's bytes per parameter (int8: 1, int4: 0.5); this keeps its KV cache
    and activation estimate (float16 for quantised weights) and replaces only the weights' bytes.
    """
    n_params = sum(p.numel() for p in model.parameters())
    base = {"int8": "int8", "torchao-int8": "int8", "nf4": "int4", "nf4-dq": "int4"}.get(fmt, fmt)
    report = fit_report(n_params, base, gpu, config=config, batch_size=batch_size, seq_len=seq_len, model=name)
    return dataclasses.replace(report, dtype=fmt, weights_bytes=predict_footprint(model, fmt, dtype).total)


#: The bitsandbytes formats a plan can place (helpers.planner.plan_inference's `quantization`).
BNB_FORMATS = ("int8", "nf4", "nf4-dq")


def stored_skeleton(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A copy of the meta skeleton `model` whose quantised Linear weights are flat uint8 tensors of their stored bytes.

    Each weight that `quantized_linear_names` lists becomes a meta uint8 tensor of `linear_weight_bytes` (the
    quantised data and its scales, summed). accelerate 1.15's `utils/modeling.py::compute_module_sizes` counts an
    integer tensor at its own size whatever `dtype` it is given, so `infer_auto_device_map` and
    `summarize_device_map` place and count the bytes bitsandbytes stores; every other parameter keeps its float
    size. For planning only: the copy cannot run. `model` is left as it is.
    """
    import copy

    fmt = _format(fmt)
    if fmt not in BNB_FORMATS:
        raise ValueError(f"{fmt!r} is not a bitsandbytes format; choose one of {BNB_FORMATS}")
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("stored_skeleton takes a meta skeleton (helpers.models.meta_model): it copies the model")
    if getattr(model, "stored_format", None):
        raise ValueError(f"this skeleton is already sized as {model.stored_format!r}; pass the float skeleton")
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has Conv1D layers, which transformers' bitsandbytes integration "
                         "quantises too; predict_footprint counts nn.Linear layers only, so it cannot plan this model")
    quantized = set(quantized_linear_names(model))
    stored = copy.deepcopy(model)
    for name, module in stored.named_modules():
        if name in quantized:
            out_features, in_features = module.weight.shape
            nbytes = sum(linear_weight_bytes(out_features, in_features, fmt))
            module.weight = torch.nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device="meta"),
                                               requires_grad=False)
    stored.stored_format = fmt
    return stored


# --- quality ---------------------------------------------------------------------------------------


def held_out_text(training_log: str | Path) -> tuple[list[str], dict]:
    """The documentation topics the tiny Llama was NOT trained on, rebuilt from its training log.

    The corpus is Python's own `pydoc_data.topics`; the log records its sha256 and the held-out topic names.
    Returns the held-out topics' texts (in the log's order, as the training script encoded them) and a dict
    saying whether this Python's corpus is byte-for-byte the one the model saw (same sha256).
    """
    import platform
    import pydoc_data.topics

    log = json.loads(Path(training_log).read_text())["data"]
    topics = dict(sorted(pydoc_data.topics.topics.items()))
    joined = "\n".join(f"{k}\n{v}" for k, v in topics.items())  # as training/train_tiny_llama.py::corpus
    same = hashlib.sha256(joined.encode()).hexdigest() == log["sha256"]
    names = log["held_out_topics"]
    return [topics[n] for n in names], {"held_out_topics": names, "same_corpus": same,
                                        "python": platform.python_version(), "trained_on": log["python"]}


def encode_topics(tokenizer, texts: list[str]) -> torch.Tensor:
    """<s> text </s> <s> text </s> ... as one stream of ids, as the training script built its validation stream."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, context: int) -> float:
    """exp(mean next-token loss) over consecutive windows of `context` tokens of `stream` (as training evaluated)."""
    usable = stream[: (len(stream) - 1) // context * context + 1]
    losses = []
    for start in range(0, len(usable) - 1, context):
        chunk = usable[start:start + context + 1][None]
        logits = model(chunk[:, :-1]).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item())
    return math.exp(sum(losses) / len(losses))


@dataclass(frozen=True)
class LogitError:
    """How far one format's logits are from the float32 reference."""

    relative: float  # ||y - ref|| / ||ref||
    max_abs: float
    top1_agreement: float  # share of positions whose arg-max token is the same

    def __repr__(self) -> str:
        return (f"LogitError(relative {self.relative:.2e}, max |diff| {self.max_abs:.3f}, "
                f"same top-1 token at {self.top1_agreement:.1%} of positions)")


def logit_error(logits: torch.Tensor, reference: torch.Tensor) -> LogitError:
    """Compare logits with a reference of the same shape (both cast to float32)."""
    y, ref = logits.float(), reference.float()
    return LogitError(relative=((y - ref).norm() / ref.norm()).item(), max_abs=(y - ref).abs().max().item(),
                      top1_agreement=(y.argmax(-1) == ref.argmax(-1)).float().mean().item())


# --- speed, measured on a GPU by benchmarks/quantization_speed.py ---------------------------------------------


def load_speed_results(folder: str | Path) -> list[dict]:
    """Every data/results/quantization-<card>.json in `folder`, sorted by file name (empty: none measured yet)."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("quantization-*.json"))]


def plot_speed(results: list[dict]):
    """Tokens/s per format at each batch size, one panel per card. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        formats = list(dict.fromkeys(r["format"] for r in result["runs"]))
        batches = sorted({r["batch_size"] for r in result["runs"]})
        width = 0.8 / len(batches)
        for i, batch in enumerate(batches):
            rate = {r["format"]: r["tokens_per_s"] for r in result["runs"] if r["batch_size"] == batch}
            ax.bar([j + i * width for j in range(len(formats))], [rate.get(f, 0) for f in formats], width,
                   label=f"batch {batch}")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(formats))], formats)
        ax.set_ylabel("tokens / s")
        ax.set_yscale("log")
        ax.set_title(f"{result['card']}: {result['model']}")
        ax.legend()
    fig.tight_layout()
    return fig


# --- the decision (notebook 09): load each format, its quality cost, and speed scaled to another model and card ---


def load_kwargs(fmt: str, dtype: torch.dtype = torch.float16) -> dict:
    """`from_pretrained` arguments that load a checkpoint in `fmt`, as notebook 12 loads it.

    Float formats load every weight in that dtype; the quantised ones keep what they leave unquantised (embeddings,
    norms, `lm_head`) and compute in `dtype`: `BitsAndBytesConfig(load_in_8bit=True)` (LLM.int8),
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` with or without double quantisation,
    `TorchAoConfig(Int8WeightOnlyConfig())`.
    """
    from transformers import BitsAndBytesConfig, TorchAoConfig

    fmt = _format(fmt)
    if fmt in ("float32", "float16"):
        return {"dtype": getattr(torch, fmt)}
    if fmt == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return {"dtype": dtype, "quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    if fmt == "int8":
        return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=fmt == "nf4-dq")}


#: Notebook 12's bounds on the change of the tiny Llama's held-out perplexity against float32, stated before any run.
PERPLEXITY_BOUNDS: dict[str, float] = {"float16": 0.005, "int8": 0.02, "torchao-int8": 0.02, "nf4": 0.10,
                                       "nf4-dq": 0.10}


@dataclass(frozen=True)
class QualityCost:
    """What one format costs in quality on the small models, against float32 (notebook 12, section 5)."""

    format: str
    perplexity: float  # the tiny Llama's held-out perplexity in this format
    float32_perplexity: float
    replica: LogitError  # the 70B replica's logits against float32's, on the same tokens

    @property
    def perplexity_change(self) -> float:
        """Relative change of the held-out perplexity against float32 (+0.01: 1% worse)."""
        return self.perplexity / self.float32_perplexity - 1

    def __repr__(self) -> str:
        return (f"QualityCost({self.format}: held-out perplexity {self.perplexity:.3f} ({self.perplexity_change:+.2%} "
                f"against float32's {self.float32_perplexity:.3f}); replica {self.replica!r})")


def quality_costs(formats: list[str], tiny_folder: str | Path, replica_folder: str | Path, device: str = "cpu",
                  tokens: int = 32) -> dict[str, QualityCost]:
    """Each format's quality cost against float32: the tiny Llama's held-out perplexity and the replica's logit error.

    The tiny Llama (a trained model) is scored on the documentation topics its training held out (`held_out_text`,
    `encode_topics`, `perplexity` over its training context); the replica (random weights, the 70B's proportions)
    runs `tokens` fixed random ids (seed 0) in each format. Every model is loaded with `load_kwargs` on `device` and
    released before the next. A few seconds on a CPU.
    """
    tiny_folder, replica_folder = Path(tiny_folder), Path(replica_folder)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log = tiny_folder / "training_log.json"
    context = json.loads(log.read_text())["model"]["context"]
    texts, _ = held_out_text(log)
    stream = encode_topics(AutoTokenizer.from_pretrained(tiny_folder), texts).to(device)
    vocab = AutoConfig.from_pretrained(replica_folder).vocab_size
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    ppl, logits = {}, {}
    for fmt in ["float32", *[f for f in formats if f != "float32"]]:
        model = AutoModelForCausalLM.from_pretrained(tiny_folder, device_map={"": device}, **load_kwargs(fmt)).eval()
        ppl[fmt] = perplexity(model, stream, context)
        del model
        model = AutoModelForCausalLM.from_pretrained(replica_folder, device_map={"": device},
                                                     **load_kwargs(fmt)).eval()
        with torch.no_grad():
            logits[fmt] = model(ids).logits.float().cpu()
        del model
    return {fmt: QualityCost(fmt, ppl[fmt], ppl["float32"], logit_error(logits[fmt], logits["float32"]))
            for fmt in formats}


#: The name helpers.planner.DATASHEET_MEMORY_BANDWIDTH (keyed by COMMON_GPUS names) gives each card a committed speed
#: result may come from, by the name CUDA gives it (`torch.cuda.get_device_name`: a result file's `card`).
CUDA_CARD_NAMES: dict[str, str] = {"NVIDIA H100 80GB HBM3": "H100 80 GB", "NVIDIA A100-SXM4-80GB": "A100 80 GB"}
#: Cards the planner's table does not have, from their datasheets (bytes/s): the H200's HBM3e, 4.8 TB/s, as in
#: benchmarks/capstone_70b.py.
OTHER_CARD_MEMORY_BANDWIDTH: dict[str, float] = {"NVIDIA H200": 4.8e12}


def card_memory_bandwidth(card: str) -> float | None:
    """The datasheet memory bandwidth (bytes/s) of `card` as CUDA names it; None for a card not listed above."""
    from helpers.planner import DATASHEET_MEMORY_BANDWIDTH  # imported here: helpers.planner imports this module

    if card in OTHER_CARD_MEMORY_BANDWIDTH:
        return OTHER_CARD_MEMORY_BANDWIDTH[card]
    return DATASHEET_MEMORY_BANDWIDTH.get(CUDA_CARD_NAMES.get(card, ""))


@dataclass(frozen=True)
class ScaledSpeed:
    """A decode speed measured for one model on one card, scaled to another model's stored bytes and another card.

    A decode step at a small batch reads every stored weight once from the card's memory, so its time is taken to
    grow with the bytes stored and to shrink with the memory bandwidth: seconds per step = measured seconds per step
    x (target stored bytes / measured stored bytes) x (measured card's bandwidth / target card's). An estimate from
    a measurement, not a measurement: kernels that are not bound by memory (dequantisation, launches) scale otherwise.
    """

    format: str
    batch_size: int
    card: str  # where it was measured
    model: str  # what was measured
    measured_tokens_per_s: float
    measured_stored_bytes: int
    target_stored_bytes: int
    bandwidth_ratio: float  # measured card's datasheet bandwidth / target card's

    @property
    def measured_seconds_per_step(self) -> float:
        return self.batch_size / self.measured_tokens_per_s

    @property
    def seconds_per_step(self) -> float:
        """The estimate: one decode step (one new token for each sequence of the batch) on the target."""
        return (self.measured_seconds_per_step * self.target_stored_bytes / self.measured_stored_bytes
                * self.bandwidth_ratio)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size / self.seconds_per_step

    def __repr__(self) -> str:
        bytes_ratio = self.target_stored_bytes / self.measured_stored_bytes
        return (f"ScaledSpeed({self.format}, batch {self.batch_size}: measured {self.measured_tokens_per_s:.1f} "
                f"tokens/s ({self.measured_seconds_per_step * 1e3:.1f} ms/step) on {self.card}, {self.model}; x "
                f"{bytes_ratio:.2f} stored bytes x {self.bandwidth_ratio:.2f} bandwidth = "
                f"{self.seconds_per_step * 1e3:.0f} ms/step, {self.tokens_per_s:.1f} tokens/s)")


def scaled_speed(result: dict, fmt: str, batch_size: int, target_stored_bytes: int,
                 target_bandwidth: float) -> ScaledSpeed | None:
    """`result` (a data/results/quantization-*.json) scaled to `target_stored_bytes` on a card of `target_bandwidth`.

    None when the result has no run of `fmt` at `batch_size`, no stored bytes for `fmt`, or its card's bandwidth is
    not known (`card_memory_bandwidth`): nothing measured to scale.
    """
    run = next((r for r in result.get("runs", []) if r["format"] == fmt and r["batch_size"] == batch_size), None)
    stored = result.get("loads", {}).get(fmt, {}).get("stored_bytes")
    bandwidth = card_memory_bandwidth(result.get("card", ""))
    if run is None or not stored or bandwidth is None:
        return None
    return ScaledSpeed(fmt, batch_size, result["card"], result["model"], run["tokens_per_s"], stored,
                       target_stored_bytes, bandwidth / target_bandwidth)
