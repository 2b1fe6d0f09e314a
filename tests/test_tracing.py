"""helpers.tracing on a tiny Llama dispatched with two of its layers offloaded to disk."""

import sys

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from conftest import TINY_LLAMA
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.checkpoints import make_checkpoint
from helpers.child import run_in_child
from helpers.models import load_config
from helpers.tracing import HookEvent, align_hooks, stored_weights, trace_hooks, weights_loader

OFFLOADED = ("model.layers.1", "model.layers.2", "model.norm")
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              **dict.fromkeys(OFFLOADED, "disk"), "lm_head": "cpu"}
INPUT = torch.arange(12)[None]


def dispatch(config, checkpoint, offload_folder, device_map=None, **kwargs):
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return load_checkpoint_and_dispatch(model, str(checkpoint.folder), device_map=device_map or DEVICE_MAP,
                                        offload_folder=str(offload_folder), dtype=torch.float32, **kwargs)


def in_memory(config, checkpoint):
    """The same model with every weight in memory and no hooks: the reference output."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for shard in checkpoint.shards:
        model.load_state_dict(load_file(shard), strict=False, assign=True)
    return model


@pytest.fixture(scope="module")
def model(tiny, tmp_path_factory):
    """One dispatched model for the tests that only run forwards (tracing puts every hook back as it was)."""
    return dispatch(*tiny, tmp_path_factory.mktemp("offload"))


def traced_forward(model):
    with trace_hooks(model) as trace, torch.no_grad():
        logits = model(INPUT).logits
    return trace, logits


def test_each_offloaded_module_is_loaded_then_freed_before_the_next(model):
    trace, _ = traced_forward(model)
    moves = [(e.kind, e.module) for e in trace.events if e.kind != "align"]
    assert moves, "no loads recorded"
    assert [kind for kind, _ in moves] == ["load", "free"] * (len(moves) // 2)
    assert all(load[1] == free[1] for load, free in zip(moves[::2], moves[1::2], strict=True))
    loaded = {module for kind, module in moves}
    # every weight-holding module of the offloaded blocks, and nothing else
    expected = {name for name, m in model.named_modules()
                if name.startswith(OFFLOADED) and any(True for _ in m.parameters(recurse=False))}
    assert loaded == expected
    assert len(trace.of_kind("load")) == len(expected) == 2 * 9 + 1  # 9 per decoder layer, plus the final norm


def test_weights_go_meta_to_cpu_and_back_to_meta(model):
    trace, _ = traced_forward(model)
    assert all(e.weights_before == "meta" and e.weights_after == "cpu" for e in trace.of_kind("load"))
    assert all(e.weights_before == "cpu" and e.weights_after == "meta" for e in trace.of_kind("free"))
    for block in OFFLOADED:
        assert all(p.is_meta for p in model.get_submodule(block).parameters())
    resident = model.get_submodule("model.layers.0")
    assert all(p.device.type == "cpu" for p in resident.parameters())


def test_load_sizes_match_the_parameters(model, tiny):
    config, _ = tiny
    trace, _ = traced_forward(model)
    h, i = config.hidden_size, config.intermediate_size
    sizes = {e.module.removeprefix("model.layers.1."): e.weight_bytes for e in trace.of_kind("load")
             if e.module.startswith("model.layers.1.")}
    assert sizes["mlp.up_proj"] == h * i * 4
    assert sizes["self_attn.k_proj"] == h * (h // config.num_attention_heads) * config.num_key_value_heads * 4
    assert sizes["input_layernorm"] == h * 4


def test_one_module_at_a_time_at_most_the_largest_module_never_a_layer(model, tiny):
    """The default hooks hold one module's weights at a time: the peak is the largest module, not a decoder layer."""
    config, _ = tiny
    trace, _ = traced_forward(model)
    loads = trace.of_kind("load")
    layer = sum(p.numel() * p.element_size() for p in model.get_submodule("model.layers.1").parameters())
    assert trace.peak_loaded_bytes() == max(e.weight_bytes for e in loads) < layer
    assert trace.peak_loaded_bytes() == config.hidden_size * config.intermediate_size * 4  # an MLP projection


def test_tracing_changes_nothing_and_restores_the_hooks(model, tiny):
    with torch.no_grad():
        plain = model(INPUT).logits
    trace, traced = traced_forward(model)
    assert torch.equal(plain, traced)
    assert torch.equal(plain, in_memory(*tiny)(INPUT).logits.detach())
    for module in model.modules():
        for hook in align_hooks(module):
            assert "pre_forward" not in vars(hook) and "post_forward" not in vars(hook)
    recorded = len(trace.events)
    with torch.no_grad():  # a forward after the trace records nothing more
        model(INPUT)
    assert len(trace.events) == recorded


def test_hooks_are_restored_when_the_forward_raises(model):
    with pytest.raises(IndexError), trace_hooks(model):
        model(torch.tensor([[10_000]]))  # an index outside the vocabulary
    assert all("pre_forward" not in vars(h) for m in model.modules() for h in align_hooks(m))


def test_summary_has_one_row_per_block_in_order(model):
    trace, _ = traced_forward(model)
    rows = trace.summary()
    assert [r.block for r in rows] == ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1",
                                       "model.layers.2", "model.norm", "lm_head"]
    by_block = {r.block: r for r in rows}
    layer_bytes = sum(p.numel() * 4 for p in model.get_submodule("model.layers.1").parameters())
    assert by_block["model.layers.1"].loaded_bytes == layer_bytes and by_block["model.layers.1"].loads == 9
    assert by_block["model.layers.0"].loads == 0 and by_block["model.layers.0"].load_s == 0
    assert by_block["model.layers.0"].placed == "cpu" and by_block["model.layers.1"].placed == "disk"
    for row in rows:
        assert row.start <= row.end
        assert row.compute_s >= 0 and row.load_s >= 0 and row.free_s >= 0
        assert row.load_s + row.compute_s + row.free_s >= row.end - row.start - 1e-9
    starts = [r.start for r in rows]
    assert starts == sorted(starts)
    assert "model.layers.1" in repr(rows[3]) and "9 loads" in repr(rows[3])


def test_event_repr_and_block_lookup(model):
    trace, _ = traced_forward(model)
    event = next(e for e in trace.of_kind("load") if e.module.endswith("mlp.up_proj"))
    assert isinstance(event, HookEvent)
    text = repr(event)
    assert "model.layers.1.mlp.up_proj" in text and "meta -> cpu" in text and "load" in text
    assert trace.block_of("model.layers.1.mlp.up_proj") == "model.layers.1"
    assert trace.block_of("model.layers.10") == ""  # not a prefix match on "model.layers.1"
    assert trace.block_of("") == ""
    assert "loads" in repr(trace)


def test_events_are_timed_in_order(model):
    trace, _ = traced_forward(model)
    for e in trace.events:
        assert 0 <= e.start <= e.end
    assert all(a.end <= b.start for a, b in zip(trace.events, trace.events[1:], strict=False))
    if not trace.uses_cuda:
        assert all(e.cuda_before == e.cuda_after == 0 for e in trace.events)
    assert all(e.host_before > 0 and e.host_after > 0 for e in trace.events)


def test_stored_weights_are_on_disk_and_unchanged_by_a_forward(model):
    before = stored_weights(model)
    assert len(before) == 2 * 9 + 1 and {w.where for w in before.values()} == {"disk"}
    loader = weights_loader(model)
    values = {k: loader[k].clone() for k in loader}
    with torch.no_grad():
        model(INPUT)
    assert stored_weights(model) == before
    assert all(torch.equal(loader[k], v) for k, v in values.items())


def test_weights_loader_needs_an_offloaded_model(tiny):
    with pytest.raises(ValueError, match="nothing is offloaded"):
        weights_loader(in_memory(*tiny))


def _host_changes(config, checkpoint_folder, offload_folder):
    """In a child (glibc returns freed blocks at once there): (kind, weight bytes, host change) per move."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = load_checkpoint_and_dispatch(model, checkpoint_folder, device_map=DEVICE_MAP,
                                         offload_folder=offload_folder, dtype=torch.float32)
    with trace_hooks(model) as trace, torch.no_grad():
        model(INPUT)
    return [(e.kind, e.weight_bytes, e.host_change) for e in trace.events if e.kind != "align"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_host_memory_rises_at_each_load_and_falls_at_each_free(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_CACHE", str(tmp_path / "cache"))
    config = load_config("llama-2-70b", **{**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512})
    checkpoint = make_checkpoint(config)
    result = run_in_child(_host_changes, config, str(checkpoint.folder), str(tmp_path / "offload"))
    assert result.ok, result
    big = [(kind, nbytes, change) for kind, nbytes, change in result.value if nbytes >= 256 * 1024]
    assert len(big) == 2 * 5 * 2  # q, o, gate, up, down in each of 2 offloaded layers, loaded and freed
    for kind, nbytes, change in big:
        assert abs(abs(change) - nbytes) <= 16 * 1024, (kind, nbytes, change)
        assert (change > 0) == (kind == "load")


@pytest.mark.gpu
def test_cuda_memory_rises_and_falls_by_each_weight(tiny, tmp_path):
    device_map = {k: (0 if v == "cpu" else "cpu") for k, v in DEVICE_MAP.items()}  # GPU fast tier, CPU slow tier
    model = dispatch(*tiny, tmp_path / "offload", device_map=device_map)
    trace, logits = traced_forward(model)
    assert trace.uses_cuda and trace.of_kind("load")
    for e in trace.of_kind("load"):  # the CUDA allocator counts in blocks of 512 bytes
        assert e.weights_before == "meta" and e.weights_after == "cuda:0"
        assert e.cuda_change == -(-e.weight_bytes // 512) * 512
    for e in trace.of_kind("free"):
        assert e.weights_after == "meta" and e.cuda_change == -(-(-e.weight_bytes // 512) * 512)
    assert {w.where for w in stored_weights(model).values()} == {"RAM"}
    assert torch.allclose(logits, in_memory(*tiny)(INPUT).logits.detach(), rtol=1e-4, atol=1e-4)
