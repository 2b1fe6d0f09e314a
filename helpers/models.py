"""Real architecture configs, models on the meta device, and exact parameter counts."""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .paths import CONFIGS_DIR

#: The committed configs: Llama-2 7B/13B/70B with the values Meta published in their config.json,
#: and a small demo Llama used to watch loading happen on a laptop.
KNOWN_CONFIGS = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "demo-llama-220m")

#: The checkpoints people bring (notebooks 05, 07 and 09 with BIGMODEL_CHECKPOINT): their published config.json
#: values, committed in data/configs (data/configs/README.md gives the hub repository of each). Other families than
#: Llama-2 on purpose: tied and untied heads, embeddings from 2% to 29% of the weights, fused projections (Phi-3),
#: an explicit head_dim (Gemma-2), GPT-2's names (transformer.h.N).
OTHER_ARCHITECTURES = ("llama-3.2-1b", "llama-3-8b", "qwen2.5-0.5b", "qwen2.5-1.5b", "mistral-7b", "phi-3-mini",
                       "gemma-2-2b", "gpt2")


def config_path(name: str) -> Path:
    """Path of a committed config by name (see KNOWN_CONFIGS)."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join((*KNOWN_CONFIGS, *OTHER_ARCHITECTURES))
        raise FileNotFoundError(f"no config named {name!r} in {CONFIGS_DIR}; known: {known}")
    return path


def load_config(name_or_path: str | Path, **overrides) -> PretrainedConfig:
    """Load a committed config by name, or any config.json by path, as a transformers config."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = config_path(str(name_or_path))
    values = json.loads(path.read_text())
    values.update(overrides)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config._name_or_path = path.stem  # names the cache folders of checkpoints built from it
    return config


def meta_model(config: PretrainedConfig, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the model on the meta device: every shape and dtype, zero bytes of weights."""
    config = copy.deepcopy(config)  # from_config(dtype=...) writes the dtype into the config it is given
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype or torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    """Exact number of parameters, counting tied (shared) tensors once."""
    return sum(p.numel() for p in model.parameters())  # .parameters() already de-duplicates


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its name (Llama naming)."""
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "LM head"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "MLP"
    if "norm" in name:
        return "norms"
    return "other"


@dataclass(frozen=True)
class ParameterBreakdown:
    """Parameter counts per component, with the size of one decoder layer."""

    by_component: dict[str, int]
    per_layer: int
    num_layers: int

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    def __repr__(self) -> str:
        rows = [f"  {k:<11} {v:>16,}  {v / self.total:6.2%}" for k, v in self.by_component.items()]
        return "\n".join(["ParameterBreakdown(", *rows,
                          f"  {'total':<11} {self.total:>16,}",
                          f"  one decoder layer: {self.per_layer:,} x {self.num_layers} layers", ")"])


def parameter_breakdown(model: torch.nn.Module) -> ParameterBreakdown:
    """Count parameters per component (embeddings, attention, MLP, norms, LM head) and per layer."""
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.numel()
    layers = model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    order = ["embeddings", "attention", "MLP", "norms", "LM head", "other"]
    return ParameterBreakdown({k: counts[k] for k in order if counts[k]}, per_layer, len(layers))


def llama_parameter_formula(config: PretrainedConfig) -> int:
    """Llama's parameter count written out by hand, to check the meta-device count against."""
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o projections (no biases)
    mlp = 3 * h * i  # gate, up, down
    norms = 2 * h  # input and post-attention RMSNorm
    lm_head = 0 if config.tie_word_embeddings else v * h
    return v * h + n * (attention + mlp + norms) + h + lm_head  # + the final norm


# --- the scaled replica of the 70B problem -------------------------------------------------------

A100_80GB_BYTES = 80 * 10**9  # the box number, in decimal bytes, as the question is asked


@dataclass(frozen=True)
class VirtualA100:
    """A memory budget that relates to the replica as an 80 GB A100 relates to Llama-2-70B.

    scale = (Llama-2-70B in float32) / (80 GB) = 275.9 GB / 80 GB = 3.449, so the replica in
    float32 is 3.449 budgets, in float16 1.72 budgets: neither fits, exactly as for the real model.
    """

    budget_bytes: int
    scale: float
    replica_fp32_bytes: int
    real_fp32_bytes: int

    def __repr__(self) -> str:
        return (f"VirtualA100(budget {self.budget_bytes / 2**20:,.1f} MiB; the model in float32 is "
                f"{self.scale:.3f} budgets, as Llama-2-70B's {self.real_fp32_bytes / 1e9:.1f} GB is "
                f"{self.scale:.3f} x 80 GB)")


def replica_config(num_hidden_layers: int = 16) -> PretrainedConfig:
    """Llama-2-70B's architecture at laptop scale: same proportions, fewer and narrower layers.

    Kept from 70B: MLP width 3.5 x hidden (28672 / 8192), 8 query heads per KV head (64 / 8),
    RMSNorm, SiLU, rotary embeddings. Scaled: hidden 8192 -> 768, 80 -> 16 layers, and the
    vocabulary 32000 -> 4096 so the embeddings stay a small share of the model as they are in 70B.
    """
    config = load_config("llama-2-70b", hidden_size=768, intermediate_size=2688, num_attention_heads=8,
                         num_key_value_heads=1, num_hidden_layers=num_hidden_layers, vocab_size=4096,
                         dtype="float32")
    config._name_or_path = "llama-2-70b-replica"
    return config


def virtual_a100(config: PretrainedConfig | None = None) -> VirtualA100:
    """The budget for `config` (default: the replica) scaled as 80 GB is to Llama-2-70B in float32."""
    config = config or replica_config()
    real = count_parameters(meta_model(load_config("llama-2-70b"))) * 4
    replica = count_parameters(meta_model(config)) * 4
    scale = real / A100_80GB_BYTES
    return VirtualA100(budget_bytes=int(replica / scale), scale=scale, replica_fp32_bytes=replica,
                       real_fp32_bytes=real)


# --- any architecture at laptop scale ------------------------------------------------------------


def _vocabulary_line(config: PretrainedConfig, overrides: dict, vocab_sizes=(1024, 2048)) -> tuple[float, float]:
    """Parameters as a + b * vocab_size for `config` with `overrides`: exact, from two meta models."""
    counts = [count_parameters(meta_model(_with(config, {**overrides, "vocab_size": v}))) for v in vocab_sizes]
    b = (counts[1] - counts[0]) / (vocab_sizes[1] - vocab_sizes[0])
    return counts[0] - b * vocab_sizes[0], b


def _with(config: PretrainedConfig, overrides: dict) -> PretrainedConfig:
    """A fresh config of the same type with `overrides` (through __init__, so derived fields such as Gemma-2's
    layer_types follow the new values; GPT-2's own names are used where it has them)."""
    values = config.to_dict()
    aliases = getattr(type(config), "attribute_map", {})
    for key, value in overrides.items():
        values[aliases.get(key, key)] = value
    for key in ("transformers_version", "_name_or_path", "layer_types"):
        values.pop(key, None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # keep special tokens inside the vocabulary
        if isinstance(values.get(key), int) and values[key] >= values["vocab_size"]:
            values[key] %= values["vocab_size"]
    model_type = values.pop("model_type")
    scaled = AutoConfig.for_model(model_type, **values)
    scaled._name_or_path = getattr(config, "_name_or_path", "") or model_type
    return scaled


def vocabulary_share(config: PretrainedConfig) -> float:
    """The share of the parameters that grows with the vocabulary: the embedding, and the head when it is untied."""
    a, b = _vocabulary_line(config, {}, (config.vocab_size, config.vocab_size + 1024))
    return b * config.vocab_size / (a + b * config.vocab_size)


def scaled_config(config: PretrainedConfig | str, num_hidden_layers: int = 8, head_dim: int = 16,
                  query_heads: int = 8) -> PretrainedConfig:
    """`config`'s architecture at laptop scale, its proportions kept (what `replica_config` does for Llama-2-70B).

    Kept: the model class and block structure (fused or separate projections, biases, norms), the number of
    query heads per KV head, the attention width relative to the hidden size (Gemma-2's is 0.89), the MLP width
    relative to the hidden size, tied or untied head, and the vocabulary's share of the parameters (solved
    exactly: parameters are a + b x vocab_size). Scaled: `num_hidden_layers` blocks (fewer if the model has fewer),
    heads of `head_dim`, about `query_heads` query heads, and GPT-2's position table with the hidden size.
    """
    config = config if isinstance(config, PretrainedConfig) else load_config(config)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    group = heads // kv_heads
    original_head_dim = getattr(config, "head_dim", None) or hidden // heads
    width_ratio = heads * original_head_dim / hidden  # attention width / hidden size: 1 except Gemma-2
    new_kv = max(1, round(query_heads / group))
    new_heads = new_kv * group
    new_hidden = round(new_heads * head_dim / width_ratio / 8) * 8
    overrides: dict = {"hidden_size": new_hidden, "num_attention_heads": new_heads,
                       "num_hidden_layers": min(num_hidden_layers, config.num_hidden_layers)}
    if hasattr(config, "num_key_value_heads"):
        overrides["num_key_value_heads"] = new_kv
    if getattr(config, "head_dim", None) and width_ratio != 1:
        overrides["head_dim"] = head_dim
    if getattr(config, "query_pre_attn_scalar", None) == original_head_dim:  # Gemma-2 scales scores by head_dim
        overrides["query_pre_attn_scalar"] = head_dim
    if getattr(config, "intermediate_size", None):
        overrides["intermediate_size"] = round(config.intermediate_size * new_hidden / hidden / 8) * 8
    if getattr(config, "max_window_layers", None):
        overrides["max_window_layers"] = overrides["num_hidden_layers"]
    if config.model_type == "gpt2":  # its learned position table scales with the hidden size, like a layer
        overrides["n_positions"] = overrides["n_ctx"] = max(128, round(config.n_positions * new_hidden / hidden))
    share = vocabulary_share(config)
    a, b = _vocabulary_line(config, overrides)
    vocab = max(256, round(share * a / (b * (1 - share)) / 8) * 8)
    overrides["vocab_size"] = vocab
    scaled = _with(config, overrides)
    scaled._name_or_path = f"{getattr(config, '_name_or_path', '') or config.model_type}-scaled"
    return scaled
