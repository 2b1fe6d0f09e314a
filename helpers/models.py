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


def config_path(name: str) -> Path:
    """Path of a committed config by name (see KNOWN_CONFIGS)."""
    path = CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config named {name!r} in {CONFIGS_DIR}; known: {', '.join(KNOWN_CONFIGS)}")
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
        return (f"VirtualA100(budget {self.budget_bytes / 2**20:,.1f} MiB; the replica in float32 is "
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
