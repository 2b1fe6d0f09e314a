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


def test_steady_decode_times_consecutive_steps_with_the_logits_of_time_decode(checkpoints):
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=2))
    streamed = streaming.stream_model(skeleton(), checkpoints["float32"].folder, device_map, depth=2)
    decode = streaming.time_decode(streamed.model, "cpu", prompt_tokens=5, steps=4, warmup=1)
    steady = streaming.time_steady_decode(streamed.model, "cpu", prompt_tokens=5, steps=3)
    assert steady["steps"] == 3 and steady["seconds"] > 0
    assert torch.equal(steady["logits"], decode["logits"][:4])  # the same tokens, step by step
    streamed.close()


def test_a_ratio_under_the_bound_is_never_printed_bare():
    assert streaming.against_bound(0.03, 0.02) == "1.50x the bound"
    below = streaming.against_bound(0.018, 0.02)
    assert below.startswith("0.90x the bound (") and streaming.BELOW_BOUND in below
    table = streaming.ratio_table([("slow", 0.03, 0.02), ("fast", 0.018, 0.02)])
    assert "0.90x *" in table and table.splitlines()[-1] == f"* {streaming.BELOW_BOUND}"
    assert "*" not in streaming.ratio_table([("slow", 0.03, 0.02)])


def test_a_ratio_under_the_bound_gets_the_one_cause_that_fits_its_row():
    compute_set = streaming.Bound(0.02, 10**6, 10**9)  # transfer 1 ms < resident 20 ms
    link_set = streaming.Bound(0.001, 10**8, 10**9)  # transfer 100 ms > resident 1 ms
    assert streaming.below_bound_cause(compute_set) == "compute"
    assert streaming.below_bound_cause(link_set) == "link, time_decode"
    assert streaming.below_bound_cause(link_set, timed_with_time_decode=False) == "link"
    for cause, text in streaming.BELOW_BOUND_CAUSES.items():
        below = streaming.against_bound(0.018, 0.02, cause)
        assert below == f"0.90x the bound ({text})" and streaming.BELOW_BOUND not in below
        assert streaming.against_bound(0.03, 0.02, cause) == "1.50x the bound"  # over 1: no cause at all
        table = streaming.ratio_table([("slow", 0.03, 0.02), ("fast", 0.018, 0.02)], cause)
        assert table.splitlines()[-1] == f"* {text}"


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


# --- int8 on the wire ---------------------------------------------------------------------------


def by_hand(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 weight-only quantisation and dequantisation, written out with torch (the reference)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).half()  # one float16 scale per output row
    q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.to(dtype) * scale.to(dtype)[:, None]


@pytest.fixture(scope="module")
def int8_folders(checkpoints):
    return {dtype: streaming.write_int8_layers(checkpoints[dtype].folder) for dtype in ("float32", "float16")}


@pytest.fixture(scope="module")
def int8_references(checkpoints):
    """The resident model with every decoder layer's Linear weights replaced by their int8 dequantisation."""
    out = {}
    for dtype in ("float32", "float16"):
        model = streaming.stream_model(skeleton(dtype), checkpoints[dtype].folder,
                                       streaming.layer_device_map(LAYERS, "cpu")).model
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.copy_(by_hand(module.weight, module.weight.dtype))
        out[dtype] = run(model)
    return out


def test_int8_quantisation_is_per_row_absmax_within_half_a_step():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).half()
    w[3] = 0  # an all-zero row stays zero
    q, scale = streaming.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (64,)
    assert torch.equal(scale, (w.float().abs().amax(1) / 127).half())
    assert q.abs().max() == 127 and torch.equal(q[3], torch.zeros(96, dtype=torch.int8))
    w_hat = streaming.dequantize_int8(q, scale, torch.empty_like(w))
    assert torch.equal(w_hat, by_hand(w, torch.float16))
    # each weight moves by at most half a step (scale / 2), plus float16's rounding of q * scale
    assert ((w.float() - w_hat.float()).abs() <= scale.float()[:, None] / 2 + w_hat.float().abs() * 2**-11).all()


def test_int8_layout_sends_each_linear_weight_as_int8_and_a_scale_per_row():
    layer = meta_model(tiny_config("float16"), torch.float16).model.layers[0]
    int8 = streaming.int8_layout(streaming.layer_layout(layer))
    linears = {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    wire = {s.name: s for s in int8.wire.spans}
    assert {n for n, s in wire.items() if s.dtype == torch.int8} == linears and len(linears) == 7
    for name, p in layer.named_parameters():
        if name in linears:
            assert wire[name].shape == tuple(p.shape)
            assert (wire[name + streaming.SCALE_SUFFIX].shape, wire[name + streaming.SCALE_SUFFIX].dtype) == (
                (p.shape[0],), torch.float16)
        else:  # the norms travel as they are
            assert (wire[name].shape, wire[name].dtype) == (tuple(p.shape), torch.float16)
    assert all(s.offset % 256 == 0 for s in int8.wire.spans)

    def up(n):
        return -(-n // 256) * 256

    expected = sum(up(p.numel()) + up(2 * p.shape[0]) if name in linears else up(p.numel() * 2)
                   for name, p in layer.named_parameters())
    assert int8.wire.nbytes == expected  # int8 bytes + float16 scales (+ the norms), each aligned
    assert 0.5 < int8.wire.nbytes / int8.layout.nbytes < 0.55  # about half of float16


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("depth", [0, 2])
def test_int8_streamer_equals_a_hand_dequantised_model_exactly(checkpoints, int8_folders, int8_references,
                                                               reference, dtype, depth):
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=LAYERS))
    streamed = streaming.stream_model(skeleton(dtype), checkpoints[dtype].folder, device_map, depth=depth,
                                      int8_folder=int8_folders[dtype])
    first, second = run(streamed.model), run(streamed.model)  # and again: the same
    for got in (first, second):
        assert torch.equal(got[0], int8_references[dtype][0]) and torch.equal(got[1], int8_references[dtype][1])
    streamed.close()


def test_int8_logit_error_is_within_the_first_order_bound(checkpoints, int8_folders, reference):
    """Each int8 weight is off by ||w - w_hat|| / ||w|| (at most half a step per weight); to first order an
    output is off by at most the sum of the relative errors of the matrices it went through: 7 per layer."""
    from helpers.quantization import logit_error

    folder = checkpoints["float32"].folder
    errors = streaming.int8_weight_errors(folder, int8_folders["float32"])
    assert len(errors) == 7 * LAYERS and 0 < max(errors.values()) < 1 / 127
    bound = sum(errors.values())
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=LAYERS))
    streamed = streaming.stream_model(skeleton(), folder, device_map, depth=1, int8_folder=int8_folders["float32"])
    decode, prefill = run(streamed.model)
    for got, expected in ((decode, reference[0]), (prefill, reference[1])):
        error = logit_error(got, expected)
        assert 0 < error.relative <= bound, (error, bound)
    streamed.close()


def test_int8_streamer_moves_int8_bytes_and_scales_per_step(checkpoints, int8_folders):
    folder = checkpoints["float16"].folder
    device_map = streaming.layer_device_map(LAYERS, "cpu", streaming.split_placement(LAYERS, disk=LAYERS))
    fp16 = streaming.stream_model(skeleton("float16"), folder, device_map, depth=1)
    int8 = streaming.stream_model(skeleton("float16"), folder, device_map, depth=1, int8_folder=int8_folders["float16"])
    per_step = {}
    for name, streamed in (("float16", fp16), ("int8", int8)):
        run(streamed.model)
        stats = streamed.streamer.stats
        before = (stats.fetches, stats.bytes_fetched)
        with torch.no_grad():
            streamed.model(torch.tensor([[3]]))  # one more forward: one fetch per streamed layer
        per_step[name] = stats.bytes_fetched - before[1]
        assert stats.fetches - before[0] == LAYERS
        assert stats.bytes_fetched == stats.fetches * streamed.streamer.wire.nbytes
        assert per_step[name] == streamed.disk_bytes == LAYERS * streamed.streamer.wire.nbytes
        assert streamed.streamer.slots.shape == (2, streamed.streamer.wire.nbytes)
        streamed.close()
    wire = int8.streamer.int8.wire
    int8_bytes = sum(s.nbytes for s in wire.spans if s.dtype == torch.int8)
    scale_bytes = sum(s.nbytes for s in wire.spans if s.name.endswith(streaming.SCALE_SUFFIX))
    norm_bytes = sum(s.nbytes for s in wire.spans) - int8_bytes - scale_bytes
    padding = wire.nbytes - int8_bytes - scale_bytes - norm_bytes
    assert scale_bytes == 2 * sum(s.shape[0] for s in wire.spans if s.dtype == torch.int8)
    assert 0 <= padding < 256 * len(wire.spans)  # alignment only
    assert per_step["int8"] == LAYERS * (int8_bytes + scale_bytes + norm_bytes + padding)
    assert 0.5 < per_step["int8"] / per_step["float16"] < 0.55
    # the int8 folder holds what is sent: int8 weights, float16 scales and norms
    stored = streaming.tensor_locations(int8_folders["float16"])
    assert {loc.dtype for loc in stored.values()} == {torch.int8, torch.float16}
    assert sum(loc.nbytes for loc in stored.values()) == LAYERS * sum(s.nbytes for s in wire.spans)


def test_int8_folder_is_written_once_and_matches_the_streamers_layout(checkpoints, int8_folders):
    again = streaming.write_int8_layers(checkpoints["float16"].folder)
    assert again == int8_folders["float16"]  # cached
    with pytest.raises(ValueError, match="the streamer expects"):  # a float checkpoint is not an int8 folder
        streaming.stream_model(skeleton("float16"), checkpoints["float16"].folder,
                               streaming.layer_device_map(LAYERS, "cpu", {0: "disk"}),
                               int8_folder=checkpoints["float16"].folder)


def test_int8_benchmark_smoke_run_writes_both_ratios(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "int8-tiny.json"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8_streaming.py"), "--tiny", "--out",
                                str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("card", "date", "versions", "model", "bandwidth", "resident", "float16", "int8", "bytes",
                "logit_error", "ratios"):
        assert key in results, key
    ratios = results["ratios"]
    assert ratios["int8_over_float16"] == results["int8"]["decode"] / results["float16"]["decode"]
    assert ratios["int8_over_its_bound"] == results["int8"]["decode"] / results["int8"]["bound"]
    assert ratios["float16_over_its_bound"] == results["float16"]["decode"] / results["float16"]["bound"]
    assert results["int8"]["equals_hand_reference"] is True
    assert 0.5 < results["bytes"]["int8_per_step"] / results["bytes"]["float16_per_step"] < 0.55
    assert "int8 / float16 streamer" in completed.stdout and "int8 / float16 streamer, steady" in completed.stdout
    assert ratios["int8_over_float16_steady"] == results["int8"]["steady_decode"] / results["float16"]["steady_decode"]
    assert all(results[k]["steady_logits_equal_decode"] for k in ("resident", "float16", "int8"))


@pytest.mark.parametrize("results", streaming.int8_results(), ids=lambda r: r["card"])
def test_committed_int8_results_have_what_the_notebook_reads(results):
    for key in ("card", "date", "versions", "model", "bandwidth", "bytes", "resident", "float16", "int8",
                "logit_error", "ratios"):
        assert key in results, key
    assert not results["tiny"] and results["placement"]["layers_on"] == "cpu"
    assert results["placement"]["depth"] < results["model"]["num_hidden_layers"]
    for name in ("float16", "int8"):
        assert {"decode", "bound", "bytes_per_step"} <= set(results[name])
    assert {"int8_over_float16", "int8_over_its_bound", "float16_over_its_bound"} <= set(results["ratios"])
    assert {"max_abs", "relative", "greedy_next_token_agrees"} <= set(results["logit_error"])


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


@pytest.mark.gpu
def test_gpu_int8_streamer_from_host_memory_equals_a_hand_dequantised_model(checkpoints, int8_folders):
    folder = checkpoints["float16"].folder
    placement = streaming.split_placement(LAYERS, cpu=3)  # the last 3 layers streamed from host memory, in int8
    resident = streaming.stream_model(skeleton("float16"), folder, streaming.layer_device_map(LAYERS, 0))
    for index in placement:  # only the streamed layers are int8; the resident ones keep their float16 weights
        for module in resident.model.model.layers[index].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data.copy_(by_hand(module.weight.cpu(), torch.float16))  # quantised as stored
    expected = run(resident.model, "cuda:0")
    device_map = streaming.layer_device_map(LAYERS, 0, placement)
    streamed = streaming.stream_model(skeleton("float16"), folder, device_map, depth=2,
                                      int8_folder=int8_folders["float16"])
    got = run(streamed.model, "cuda:0")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert streamed.host_store.is_pinned() and streamed.host_store.numel() == 3 * streamed.streamer.wire.nbytes
    assert streamed.streamer.slots.is_cuda and streamed.streamer.weights.is_cuda
    streamed.close()
