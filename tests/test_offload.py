"""helpers.offload: the minimal offloader built on PyTorch forward hooks, on a tiny_weights Llama."""

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.offload import MinimalOffloader, minimal_offload, set_tensor

BLOCKS = ["model.layers.1", "model.layers.2", "lm_head"]
INPUT = torch.arange(12)[None]


@pytest.fixture(scope="module")
def tiny_weights(tiny):
    """The tiny_weights config, its checkpoint (conftest's `tiny`), and the checkpoint's tensors (the host copies)."""
    config, checkpoint = tiny
    weights = {}
    for shard in checkpoint.shards:
        weights.update(load_file(shard))
    return config, checkpoint, weights


def skeleton(config):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_weights):
    """Logits of the same model with every weight in memory and no hooks at all."""
    config, _, weights = tiny_weights
    model = skeleton(config)
    model.load_state_dict(weights, strict=False, assign=True)
    with torch.no_grad():
        return model(INPUT).logits


def test_outputs_equal_the_model_without_offloading(tiny_weights, reference):
    config, _, weights = tiny_weights
    model = skeleton(config)
    offloader = minimal_offload(model, weights, BLOCKS, "cpu")
    assert isinstance(offloader, MinimalOffloader) and len(offloader.handles) == 2 * len(BLOCKS)
    with torch.no_grad():
        first, second = model(INPUT).logits, model(INPUT).logits
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_blocks_are_meta_between_forwards_and_real_during_their_own(tiny_weights):
    config, _, weights = tiny_weights
    model = skeleton(config)
    minimal_offload(model, weights, BLOCKS, "cpu")
    for block in BLOCKS:
        assert all(p.is_meta for p in model.get_submodule(block).parameters())
    assert all(not p.is_meta for p in model.get_submodule("model.layers.0").parameters())
    seen = {}
    inner = model.get_submodule("model.layers.1.mlp.up_proj")
    other = model.get_submodule("model.layers.2.mlp.up_proj")
    handle = inner.register_forward_hook(lambda m, args, out: seen.update(
        inner=m.weight.device.type, other=other.weight.device.type))
    with torch.no_grad():
        model(INPUT)
    handle.remove()
    assert seen == {"inner": "cpu", "other": "meta"}  # layer 1 is loaded while it runs; layer 2 is not yet
    for block in BLOCKS:
        assert all(p.is_meta for p in model.get_submodule(block).parameters())


def test_host_copies_are_never_written(tiny_weights):
    config, _, weights = tiny_weights
    offloaded = {k: v for k, v in weights.items() if k.startswith(tuple(b + "." for b in BLOCKS))}
    before = {k: (v.data_ptr(), v.clone()) for k, v in offloaded.items()}
    model = skeleton(config)
    minimal_offload(model, weights, BLOCKS, "cpu")
    loaded = {}
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    handle = module.register_forward_hook(lambda m, args, out: loaded.update(ptr=m.weight.data_ptr()))
    with torch.no_grad():
        model(INPUT)
    handle.remove()
    assert loaded["ptr"] != weights["model.layers.1.mlp.down_proj.weight"].data_ptr()  # a copy was computed with
    for key, (ptr, value) in before.items():
        assert weights[key].data_ptr() == ptr and torch.equal(weights[key], value)


def test_same_outputs_as_accelerate_with_disk_offload(tiny_weights, tmp_path, reference):
    config, checkpoint, weights = tiny_weights
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}
    dispatched = load_checkpoint_and_dispatch(skeleton(config), str(checkpoint.folder), device_map=device_map,
                                              offload_folder=str(tmp_path), dtype=torch.float32)
    ours = skeleton(config)
    minimal_offload(ours, weights, [b for b, d in device_map.items() if d == "disk"], "cpu")
    with torch.no_grad():
        assert torch.equal(ours(INPUT).logits, dispatched(INPUT).logits)
    assert torch.equal(reference, ours(INPUT).logits.detach())


def test_remove_unregisters_every_hook(tiny_weights):
    config, _, weights = tiny_weights
    model = skeleton(config)
    offloader = minimal_offload(model, weights, BLOCKS, "cpu")
    offloader.remove()
    assert offloader.handles == []
    for block in BLOCKS:
        module = model.get_submodule(block)
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert "3 blocks" in repr(offloader)


def test_nothing_offloaded_is_a_plain_resident_model(tiny_weights, reference):
    config, _, weights = tiny_weights
    model = skeleton(config)
    minimal_offload(model, weights, [], "cpu")
    assert all(not p.is_meta for p in model.parameters())
    assert all(p.data_ptr() != weights[n].data_ptr() for n, p in model.named_parameters())  # copies, not views
    with torch.no_grad():
        assert torch.equal(model(INPUT).logits, reference)


def test_set_tensor_replaces_parameters_and_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    set_tensor(module, "0.weight", torch.ones(2, 3))
    set_tensor(module, "1.running_mean", torch.full((2,), 5.0))
    assert isinstance(module[0].weight, torch.nn.Parameter) and torch.equal(module[0].weight, torch.ones(2, 3))
    assert not module[0].weight.requires_grad
    assert "running_mean" in module[1]._buffers and torch.equal(module[1].running_mean, torch.full((2,), 5.0))


@pytest.mark.gpu
def test_gpu_outputs_match_and_only_one_layer_is_on_the_gpu_at_a_time(tiny_weights, reference):
    config, _, weights = tiny_weights
    model = skeleton(config)
    minimal_offload(model, weights, BLOCKS, "cuda:0")
    layer_bytes = sum(p.numel() * 4 for p in skeleton(config).model.layers[1].parameters())
    peaks = []
    for block in BLOCKS[:2]:  # a module inside the block runs while the block's weights are loaded
        model.get_submodule(f"{block}.mlp.down_proj").register_forward_hook(
            lambda m, args, out: peaks.append(sum(p.numel() * 4 for p in model.parameters() if p.is_cuda)))
    with torch.no_grad():
        logits = model(INPUT.cuda()).logits.cpu()
    assert torch.allclose(logits, reference, rtol=1e-4, atol=1e-4)
    resident = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith(tuple(BLOCKS)))
    assert peaks == [resident + layer_bytes] * 2
