"""The layer streamer (helpers.streaming): exact outputs, reused buffers, one host copy, and the bound arithmetic."""

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import streaming
from helpers.models import load_config, meta_model
from helpers.speed_plots import offload_result_paths

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 4


def tiny_config(dtype: str = "float32"):
    config = load_config("llama-2-70b", hidden_size=64, intermediate_size=176, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=128, dtype=dtype)
    config._name_or_path = f"streaming-test-{dtype}"
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Llama checkpoints (float32 and float16) in a temporary cache, shared by this module's tests."""
    from helpers.checkpoints import make_checkpoint

    before = os.environ.get("BIGMODEL_CACHE")
    os.environ["BIGMODEL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield {dtype: make_checkpoint(tiny_config(dtype), dtype=getattr(torch, dtype), max_shard_size="200KB")
               for dtype in ("float32", "float16")}
    finally:
        if before is None:
            del os.environ["BIGMODEL_CACHE"]
        else:
            os.environ["BIGMODEL_CACHE"] = before


def skeleton(dtype: str = "float32"):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(tiny_config(dtype), dtype=getattr(torch, dtype))


def run(model, device="cpu"):
    """Decode logits of a few steps and a prefill's logits: what every variant must reproduce exactly."""
    decode = streaming.time_decode(model, device, prompt_tokens=5, steps=3, warmup=1)
    prefill = streaming.time_prefill(model, device, tokens=12, repeats=1, warmup=0)
    return decode["logits"], prefill["logits"]


@pytest.fixture(scope="module")
def reference(checkpoints):
    folder = checkpoints["float32"].folder
    resident = streaming.stream_model(skeleton(), folder, streaming.layer_device_map(LAYERS, "cpu"))
    return run(resident.model)


def test_layout_is_one_aligned_flat_buffer_with_a_view_per_parameter():
    layer = meta_model(tiny_config()).model.layers[0]
    layout = streaming.layer_layout(layer, align=256)
    params = dict(layer.named_parameters())
    assert [s.name for s in layout.spans] == list(params)
    assert all(s.offset % 256 == 0 for s in layout.spans) and layout.nbytes % 256 == 0
    assert layout.nbytes >= sum(p.numel() * p.element_size() for p in params.values())
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(flat)
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)
    assert [tuple(v.shape) for v in views] == [tuple(p.shape) for p in params.values()]


def test_pread_gives_the_bytes_safetensors_gives(checkpoints):
    folder = checkpoints["float32"].folder
    locations = streaming.tensor_locations(folder)
    expected = {}
    for shard in sorted(folder.glob("*.safetensors")):
        expected.update(load_file(shard))
    assert set(locations) == set(expected)
    reader = streaming.FileReader()
    for name, tensor in expected.items():
        out = torch.empty(locations[name].shape, dtype=locations[name].dtype)
        reader.read_into(locations[name], out)
        assert torch.equal(out, tensor), name
    reader.close()
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in expected.values())


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("disk_layers", [1, 2, LAYERS])
def test_disk_streamer_equals_the_resident_model_exactly(checkpoints, reference, depth, disk_layers):
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=disk_layers))
    streamed = streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map, depth=depth)
    decode, prefill = run(streamed.model)
    assert torch.equal(decode, reference[0]) and torch.equal(prefill, reference[1])
    assert streamed.disk_bytes == disk_layers * streamed.streamer.layout.nbytes
    assert streamed.streamer.stats.fetches > 0
    streamed.close()


def test_disk_streamer_equals_accelerate_disk_offload(checkpoints, tmp_path):
    folder = checkpoints["float32"].folder
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=3))
    accelerated = streaming.accelerate_model(tiny_config(), folder, device_map, dtype=torch.float32,
                                             offload_folder=tmp_path / "offload")
    expected = run(accelerated)
    streamed = streaming.stream_model(skeleton(), folder, device_map, depth=1)
    got = run(streamed.model)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    streamed.close()


def test_slot_buffers_are_reused_and_layers_hold_nothing_between_forwards(checkpoints):
    depth = 1
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=LAYERS))
    streamed = streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map, depth=depth)
    slots = streamed.streamer.slots
    seen = []
    for layer in streamed.model.model.layers:  # record where each layer's weight lives while it computes
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(m.up_proj.weight.data_ptr()))
    run(streamed.model)
    assert slots.data_ptr() == streamed.streamer.slots.data_ptr() and slots.shape[0] == depth + 1
    start, end = slots.data_ptr(), slots.data_ptr() + slots.numel()
    assert len(seen) > 2 * LAYERS and all(start <= p < end for p in seen), "weights must come from the slots"
    assert len(set(seen)) == depth + 1, f"{len(set(seen))} distinct buffers for {depth + 1} slots"
    for layer in streamed.model.model.layers:  # between forwards: meta, no memory
        assert all(p.is_meta for p in layer.parameters())
    streamed.close()


def test_no_second_host_copy(checkpoints):
    """Host memory holds the resident weights and the slots, nothing else: streamed layers live in the file."""
    depth = 2
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=3))
    streamed = streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map, depth=depth)
    run(streamed.model)
    tensors = {id(t): t for t in [*streamed.model.parameters(), *streamed.model.buffers()] if not t.is_meta}
    layout = streamed.streamer.layout
    held = sum(t.numel() * t.element_size() for t in tensors.values()) + streamed.streamer.slots.numel()
    rotary = sum(b.numel() * b.element_size() for b in streamed.model.buffers())
    assert held == streamed.resident_bytes + (depth + 1) * layout.nbytes + rotary
    assert streamed.host_store is None and streamed.host_bytes == 0  # on a CPU, "disk" layers live in the file only
    assert streamed.disk_bytes == 3 * layout.nbytes
    streamed.close()


def test_an_interrupted_forward_does_not_confuse_the_streamer(checkpoints, reference):
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=LAYERS))
    streamed = streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map, depth=2)

    def fail(module, args):
        raise KeyboardInterrupt

    handle = streamed.model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        streamed.model(torch.arange(5)[None])
    handle.remove()
    decode, prefill = run(streamed.model)
    assert torch.equal(decode, reference[0]) and torch.equal(prefill, reference[1])
    streamed.close()


def test_remove_leaves_an_ordinary_module(checkpoints):
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=2))
    streamed = streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map)
    run(streamed.model)
    streamed.close()
    layers = streamed.model.model.layers
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    assert all(p.is_meta for layer in layers[2:] for p in layer.parameters())
    assert not any(p.is_meta for p in layers[0].parameters())


def test_only_whole_decoder_layers_can_be_offloaded(checkpoints):
    device_map = streaming.layer_device_map(LAYERS, "cpu")
    device_map["lm_head"] = "disk"
    with pytest.raises(ValueError, match="only whole decoder layers"):
        streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map)


def test_a_meta_skeleton_is_refused_with_the_fix(checkpoints):
    with pytest.raises(ValueError, match="init_empty_weights"):
        streaming.stream_model(meta_model(tiny_config()), checkpoints["float32"].folder,
                               streaming.layer_device_map(LAYERS, "cpu"))


def test_decode_timing_reports_median_fastest_and_every_step(checkpoints):
    model = streaming.stream_model(skeleton(), checkpoints["float32"].folder, streaming.layer_device_map(LAYERS, "cpu"))
    timed = streaming.time_decode(model.model, "cpu", prompt_tokens=5, steps=6, warmup=2)
    assert len(timed["all_seconds"]) == 6 and len(timed["logits"]) == 8
    assert timed["min_seconds"] == min(timed["all_seconds"]) <= timed["seconds"]


def test_a_ratio_under_the_bound_is_never_printed_bare():
    assert streaming.against_bound(0.03, 0.02) == "1.50x the bound"
    below = streaming.against_bound(0.018, 0.02)
    assert below.startswith("0.90x the bound (") and streaming.BELOW_BOUND in below
    table = streaming.ratio_table([("slow", 0.03, 0.02), ("fast", 0.018, 0.02)])
    assert "0.90x *" in table and table.splitlines()[-1] == f"* {streaming.BELOW_BOUND}"
    assert "*" not in streaming.ratio_table([("slow", 0.03, 0.02)])


def test_bound_is_the_larger_term():
    bound = streaming.Bound(resident_seconds=0.01, offloaded_bytes=10**9, bandwidth=50e9)
    assert bound.seconds == pytest.approx(0.02)
    assert streaming.Bound(0.05, 10**9, 50e9).seconds == 0.05


def test_disk_read_bandwidth_is_measured_on_a_fresh_file(tmp_path):
    path = streaming.write_test_file(tmp_path / "probe.bin", 8 * 2**20)
    assert path.stat().st_size == 8 * 2**20
    assert streaming.read_bandwidth(path, cold=True) > 0 and streaming.read_bandwidth(path, cold=False) > 0


@pytest.mark.parametrize("path", offload_result_paths(ROOT / "data" / "results"), ids=lambda p: p.name)
def test_committed_gpu_results_have_what_the_notebook_plots(path):
    results = json.loads(path.read_text())
    for key in ("card", "date", "versions", "bandwidth", "resident", "placements", "model"):
        assert key in results, key
    for entry in results["placements"].values():
        assert {"accelerate", "streamer", "bound", "bound_tiered", "offloaded_bytes", "disk_layers"} <= set(entry)
        assert entry["bound_tiered"]["decode"] >= entry["bound"]["decode"]  # the disk term only adds
        assert {"decode", "prefill"} <= set(entry["accelerate"]) and {"decode", "prefill"} <= set(entry["streamer"])


# --- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(pinned=False, non_blocking=False, side_stream=False, depth=0),
                                     dict(pinned=True, non_blocking=True, side_stream=False, depth=0),
                                     dict(pinned=True, non_blocking=True, side_stream=True, depth=1),
                                     dict(pinned=True, non_blocking=True, side_stream=True, depth=2)],
                         ids=["pageable-blocking", "pinned-nonblocking", "side-stream-1", "side-stream-2"])
def test_gpu_streamer_from_host_memory_equals_resident(checkpoints, options):
    folder = checkpoints["float16"].folder
    resident = streaming.stream_model(skeleton("float16"), folder, streaming.layer_device_map(LAYERS, 0))
    expected = run(resident.model, "cuda:0")
    device_map = streaming.layer_device_map(LAYERS, 0, streaming.split_placement(LAYERS, cpu=3))
    streamed = streaming.stream_model(skeleton("float16"), folder, device_map, **options)
    got = run(streamed.model, "cuda:0")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    store = streamed.host_store
    assert store.device.type == "cpu" and store.numel() == 3 * streamed.streamer.layout.nbytes  # once, exact size
    assert store.is_pinned() == options["pinned"]
    assert streamed.streamer.slots.is_cuda and streamed.streamer.slots.shape[0] == options["depth"] + 1
    streamed.close()


@pytest.mark.gpu
def test_gpu_streamer_from_disk_and_host_equals_accelerate(checkpoints, tmp_path):
    folder = checkpoints["float16"].folder
    device_map = streaming.layer_device_map(LAYERS, 0, streaming.split_placement(LAYERS, cpu=2, disk=2))
    accelerated = streaming.accelerate_model(tiny_config("float16"), folder, device_map, dtype=torch.float16,
                                             offload_folder=tmp_path / "offload")
    expected = run(accelerated, "cuda:0")
    streamed = streaming.stream_model(skeleton("float16"), folder, device_map, depth=2)
    got = run(streamed.model, "cuda:0")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert len(streamed.streamer.staging) == 3 and all(b.is_pinned() for b in streamed.streamer.staging)
    streamed.close()


@pytest.mark.gpu
def test_pinned_in_place_is_exact_and_fast():
    nbytes = 64 * 2**20 + 12345
    host = streaming.page_aligned_empty(nbytes)
    streaming.pin_in_place(host)
    assert host.is_pinned() and host.numel() == nbytes
    streaming.unpin(host)
    assert streaming.h2d_bandwidth(nbytes, pinned=True) > streaming.h2d_bandwidth(nbytes, pinned=False) * 0.8
