import json
import shutil

import pytest
import torch
from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import checkpoints
from helpers.models import load_config


def tiny_config(**overrides):
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=500)
    values.update(overrides)
    return load_config("llama-2-70b", **values)


def test_index_agrees_with_the_shards(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), max_shard_size=100_000)
    index = json.loads(ck.index_path.read_text())
    assert len(ck.shards) > 1
    assert {ck.folder / s for s in index["weight_map"].values()} == set(ck.shards)
    tensors = {}
    for shard in ck.shards:
        tensors.update(load_file(shard))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert checkpoints.verify_checkpoint(ck.folder) == {s.name: len(load_file(s)) for s in ck.shards}
    assert ck.config_path.is_file()
    assert str(ck.folder).startswith(str(isolated_cache))


def test_shards_respect_the_size_limit(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), max_shard_size=100_000)
    for shard in ck.shards:
        tensors = load_file(shard)
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= 100_000 or len(tensors) == 1  # only a lone oversized tensor may exceed it


def test_checkpoint_is_reused_and_deterministic(isolated_cache):
    first = checkpoints.make_checkpoint(tiny_config(), seed=3)
    mtimes = [p.stat().st_mtime_ns for p in first.shards]
    again = checkpoints.make_checkpoint(tiny_config(), seed=3)
    assert not first.reused and again.reused and again.folder == first.folder
    assert [p.stat().st_mtime_ns for p in again.shards] == mtimes  # nothing rewritten
    shutil.rmtree(first.folder)
    rebuilt = checkpoints.make_checkpoint(tiny_config(), seed=3)
    other_seed = checkpoints.make_checkpoint(tiny_config(), seed=4)
    name = "model.layers.0.mlp.up_proj.weight"
    rebuilt_tensors = {}
    for shard in rebuilt.shards:
        rebuilt_tensors.update(load_file(shard))
    other_tensors = {}
    for shard in other_seed.shards:
        other_tensors.update(load_file(shard))
    regenerated = checkpoints.generate_tensor(name, rebuilt_tensors[name].shape, 3, 0.02, torch.float32)
    assert torch.equal(rebuilt_tensors[name], regenerated)
    assert not torch.equal(rebuilt_tensors[name], other_tensors[name])
    assert torch.all(rebuilt_tensors["model.norm.weight"] == 1)


def test_key_depends_on_config_seed_dtype_and_shard_size():
    config = tiny_config()
    base = checkpoints.checkpoint_key(config, 0, torch.float32, 10**9)
    assert base == checkpoints.checkpoint_key(tiny_config(), 0, torch.float32, 10**9)
    assert base != checkpoints.checkpoint_key(tiny_config(hidden_size=128), 0, torch.float32, 10**9)
    assert base != checkpoints.checkpoint_key(config, 1, torch.float32, 10**9)
    assert base != checkpoints.checkpoint_key(config, 0, torch.float16, 10**9)
    assert base != checkpoints.checkpoint_key(config, 0, torch.float32, 10**8)


def test_dtype_is_respected(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), dtype=torch.float16)
    assert {t.dtype for t in load_file(ck.shards[0]).values()} == {torch.float16}


def test_tied_weights_are_written_once(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(tie_word_embeddings=True))
    names = checkpoints.read_index(ck.folder)["weight_map"]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_pickle_checkpoint_holds_the_same_weights(isolated_cache):
    config = tiny_config()
    path = checkpoints.make_pickle_checkpoint(config, seed=1)
    ck = checkpoints.make_checkpoint(config, seed=1)
    pickled = torch.load(path, weights_only=True)
    stored = load_file(ck.shards[0])
    assert all(torch.equal(pickled[k], v) for k, v in stored.items())
    assert checkpoints.make_pickle_checkpoint(config, seed=1) == path


def test_verify_reports_a_missing_shard(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), max_shard_size=100_000)
    ck.shards[-1].unlink()
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        checkpoints.verify_checkpoint(ck.folder)


def test_verify_reports_a_truncated_shard(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), max_shard_size=100_000)
    data = ck.shards[0].read_bytes()
    ck.shards[0].write_bytes(data[: len(data) - 100])
    with pytest.raises(checkpoints.CheckpointError, match="truncated"):
        checkpoints.verify_checkpoint(ck.folder)


def test_verify_reports_a_tensor_in_the_wrong_shard(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), max_shard_size=100_000)
    index = json.loads(ck.index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = ck.shards[-1].name
    ck.index_path.write_text(json.dumps(index))
    with pytest.raises(checkpoints.CheckpointError, match="does not hold it"):
        checkpoints.verify_checkpoint(ck.folder)


def test_read_index_of_a_folder_without_one(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        checkpoints.read_index(tmp_path)


# --- the sharding is huggingface_hub's ----------------------------------------------------------

def test_plan_shards_is_huggingface_hubs_split_on_real_tensors():
    config = tiny_config()
    specs = checkpoints.tensor_specs(config, torch.float32)
    state_dict = dict(checkpoints.iter_tensors(config))
    for limit in (40_000, 100_000, 10**9):
        expected = split_torch_state_dict_into_shards(state_dict, max_shard_size=limit)
        assert checkpoints.plan_shards(specs, torch.float32, limit) == list(expected.filename_to_tensors.values())


def test_a_tensor_over_the_limit_gets_its_own_shard_listed_first():
    specs = [("a", torch.Size([10])), ("big", torch.Size([100])), ("c", torch.Size([10]))]
    assert checkpoints.plan_shards(specs, torch.float32, 100) == [["big"], ["a", "c"]]


def test_make_checkpoint_writes_what_save_torch_state_dict_writes(isolated_cache, tmp_path):
    config = tiny_config()
    ck = checkpoints.make_checkpoint(config, seed=2, max_shard_size=100_000)
    save_torch_state_dict(dict(checkpoints.iter_tensors(config, seed=2)), tmp_path, max_shard_size=100_000)
    theirs = json.loads((tmp_path / checkpoints.INDEX_NAME).read_text())
    ours = json.loads(ck.index_path.read_text())
    assert ours["weight_map"] == theirs["weight_map"] and list(ours["weight_map"]) == list(theirs["weight_map"])
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    for shard in ck.shards:
        mine, saved = load_file(shard), load_file(tmp_path / shard.name)
        assert list(mine) == list(saved) and all(torch.equal(mine[k], saved[k]) for k in mine)


def test_size_strings_are_read_by_huggingface_hub():
    for text in ("2GB", "300MB", "5KB"):
        assert checkpoints._parse_size(text) == parse_size_to_int(text)
    assert checkpoints._parse_size(123) == 123


def test_the_hand_read_header_agrees_with_safe_open(isolated_cache):
    ck = checkpoints.make_checkpoint(tiny_config(), dtype=torch.float16, max_shard_size=100_000)
    for shard in ck.shards:
        header = checkpoints.read_safetensors_header(shard)
        metadata = header.pop("__metadata__", None)
        with safe_open(shard, "pt") as f:
            assert sorted(header) == sorted(f.keys()) and metadata == f.metadata()
            for name, info in header.items():
                tensor_slice = f.get_slice(name)
                assert info["shape"] == tensor_slice.get_shape() and info["dtype"] == tensor_slice.get_dtype()


def test_unsharded_folder_weight_map_and_sharded_copy(isolated_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers.models import scaled_config

    model = AutoModelForCausalLM.from_config(scaled_config("gpt2"))
    model.save_pretrained(tmp_path / "one")  # one model.safetensors, no index
    with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
        checkpoints.read_index(tmp_path / "one")
    assert set(checkpoints.weight_map(tmp_path / "one").values()) == {"model.safetensors"}
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "one").iterdir())
    copy = checkpoints.sharded_copy(tmp_path / "one", shards=3)
    assert str(copy).startswith(str(isolated_cache)) and checkpoints.sharded_copy(tmp_path / "one", shards=3) == copy
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "one").iterdir()) == before  # untouched
    index = checkpoints.read_index(copy)
    assert len(set(index["weight_map"].values())) >= 2 and (copy / "config.json").is_file()
    original = load_file(tmp_path / "one" / "model.safetensors")
    assert set(index["weight_map"]) == set(original)
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(copy / shard)[name], original[name])
    with pytest.raises(checkpoints.CheckpointError, match="not an unsharded"):
        checkpoints.sharded_copy(copy)
