"""Bad input gives a clear error and leaves every file intact."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import checkpoints, paths
from helpers.models import load_config


def tiny(**overrides):
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300)
    values.update(overrides)
    return load_config("llama-2-70b", **values)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def checkpoint(isolated_cache):
    return checkpoints.make_checkpoint(tiny(), max_shard_size=60_000)


def test_truncated_shard_is_reported_and_files_untouched(checkpoint):
    data = checkpoint.shards[1].read_bytes()
    checkpoint.shards[1].write_bytes(data[:-1000])
    before = digest(checkpoint.folder)
    with pytest.raises(checkpoints.CheckpointError, match="truncated"):
        checkpoints.verify_checkpoint(checkpoint.folder)
    assert digest(checkpoint.folder) == before


def test_index_naming_a_missing_file(checkpoint):
    index = json.loads(checkpoint.index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    checkpoint.index_path.write_text(json.dumps(index))
    before = digest(checkpoint.folder)
    with pytest.raises(checkpoints.CheckpointError, match="model-99999-of-99999.safetensors.*does not exist"):
        checkpoints.verify_checkpoint(checkpoint.folder)
    assert digest(checkpoint.folder) == before


def test_index_missing_a_tensor_the_config_needs(checkpoint):
    index = json.loads(checkpoint.index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index["metadata"].pop("total_size")
    checkpoint.index_path.write_text(json.dumps(index))
    before = digest(checkpoint.folder)
    with pytest.raises(checkpoints.CheckpointError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        checkpoints.check_matches_config(checkpoint.folder, tiny())
    assert digest(checkpoint.folder) == before


def test_config_checkpoint_shape_mismatch(checkpoint):
    with pytest.raises(checkpoints.CheckpointError, match=r"shape \(128, 64\) in the checkpoint but \(256, 64\)"):
        checkpoints.check_matches_config(checkpoint.folder, tiny(intermediate_size=256))
    assert checkpoints.check_matches_config(checkpoint.folder, tiny()) == checkpoint.num_tensors


def test_corrupt_header(checkpoint):
    shard = checkpoint.shards[0]
    shard.write_bytes(b"\xff" * 8 + b"not json")
    with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
        checkpoints.read_safetensors_header(shard)


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "extra": Payload()}, path)
    before = path.read_bytes()
    with pytest.raises(checkpoints.CheckpointError, match="contains more than tensors"):
        checkpoints.load_pickle_weights(path)
    assert not marker.exists() and path.read_bytes() == before
    torch.save({"weight": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(checkpoints.load_pickle_weights(tmp_path / "ok.pt")["weight"], torch.ones(2))


def test_unwritable_offload_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "a-file"
            target.write_text("x")
            with pytest.raises(paths.FolderError, match="cannot write"):
                paths.checked_folder(target / "offload")
            assert target.read_text() == "x"
        else:
            with pytest.raises(paths.FolderError, match="cannot write"):
                paths.checked_folder(locked / "offload")
    finally:
        locked.chmod(0o700)


def test_full_offload_folder(tmp_path):
    with pytest.raises(paths.FolderError, match="free but the offloaded weights need"):
        paths.checked_folder(tmp_path, needed_bytes=10**18)


def test_offload_dir_stays_inside_the_cache(isolated_cache):
    folder = paths.offload_dir("demo", needed_bytes=1)
    (folder / "w.dat").write_bytes(b"1")
    again = paths.offload_dir("demo")
    assert again == folder and not any(again.iterdir())
    assert str(folder).startswith(str(isolated_cache))
    for bad in ("../escape", "/tmp/x", ""):
        with pytest.raises(ValueError):
            paths.offload_dir(bad)
