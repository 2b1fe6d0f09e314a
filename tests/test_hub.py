"""helpers.hub: the local hub cache has the real layout, works offline with the unchanged hub calls, is idempotent
and writes nothing outside its folder; and the committed tiny model is what its training log says."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    constants,
    get_cached_repo_tree,
    hf_hub_download,
    scan_cache_dir,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import LocalEntryNotFoundError

from helpers import hub
from helpers.checkpoints import verify_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny-llama"
REPO = "suite/tiny-llama"


@pytest.fixture
def published(isolated_cache):
    return hub.publish_to_local_cache(TINY, REPO)


def snapshot_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under folder with its size and modification time (symlinks not followed)."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# --- the committed model ------------------------------------------------------------------------

def test_committed_tiny_model_is_small_sharded_and_consistent():
    files = {p.name: p.stat().st_size for p in TINY.iterdir()}
    shards = [n for n in files if n.endswith(".safetensors")]
    assert 2 <= len(shards) <= 3 and "model.safetensors.index.json" in files
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "training_log.json", "TRAINING.md"):
        assert name in files, name
    assert sum(files.values()) < 25e6
    assert set(verify_checkpoint(TINY)) == set(shards)  # raises CheckpointError if index and shards disagree
    log = json.loads((TINY / "training_log.json").read_text())
    for key in ("seed", "data", "model", "training", "machine", "greedy_completions"):
        assert key in log, key
    assert log["model"]["weights_dtype"] == "float32"
    assert log["training"]["final_train_loss"] < log["training"]["history"][0]["loss"]


def test_committed_tiny_model_completes_as_its_training_log_recorded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = json.loads((TINY / "training_log.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(TINY)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    prompt, recorded = next(iter(log["greedy_completions"].items()))
    with torch.no_grad():
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True) == recorded["text"]


# --- the cache layout ---------------------------------------------------------------------------

def test_layout_matches_the_hub_cache(published):
    storage = published.storage_folder
    assert storage.name == "models--suite--tiny-llama" and storage.parent == hub.hub_cache_dir().resolve()
    assert (storage / "refs" / "main").read_text() == published.commit and len(published.commit) == 40
    assert sorted(p.name for p in storage.iterdir()) == ["blobs", "refs", "snapshots", "trees"]
    for f in published.files:
        pointer = published.snapshot_folder / f.path
        assert pointer.is_symlink() and os.readlink(pointer) == f"../../blobs/{f.blob}"
        data = (TINY / f.path).read_bytes()
        if f.lfs:
            assert f.blob == hashlib.sha256(data).hexdigest()
        else:
            assert f.blob == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert {f.path for f in published.files if f.lfs} == {p.name for p in TINY.glob("*.safetensors")}
    info = scan_cache_dir(hub.hub_cache_dir())
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"main"} and repo.nb_files == len(published.files)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_blob_tree_and_commit_ids_are_the_ones_git_computes(published, tmp_path):
    small = [f for f in published.files if not f.lfs]
    out = subprocess.run(["git", "hash-object", *[str(TINY / f.path) for f in small]], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [f.blob for f in small]
    subprocess.run(["git", "init", "-q", str(tmp_path / "g")], check=True)
    listing = "".join(f"100644 blob {f.git_id}\t{f.path}\n" for f in published.files)
    tree = subprocess.run(["git", "mktree", "--missing"], input=listing, capture_output=True, text=True,
                          cwd=tmp_path / "g", check=True).stdout.strip()
    assert tree == hub.git_tree_id(list(published.files))
    dates = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
             for what, value in (("DATE", "@0 +0000"), ("NAME", "suite"), ("EMAIL", "suite@localhost"))}
    message = f"Publish {REPO} into a local cache (helpers.hub)"
    commit = subprocess.run(["git", "commit-tree", tree, "-m", message], capture_output=True, text=True,
                            cwd=tmp_path / "g", env={**os.environ, **dates}, check=True).stdout.strip()
    assert commit == published.commit


def test_blob_ids_and_folder_name_are_huggingface_hubs_own(published):
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.sha import git_hash

    for f in published.files:
        data = (TINY / f.path).read_bytes()
        expected = git_hash(hub.lfs_pointer(f.blob, f.size)) if f.lfs else git_hash(data)
        assert f.git_id == expected, f.path
    assert published.storage_folder.name == repo_folder_name(repo_id=REPO, repo_type="model")


def test_tree_listing_bytes_are_what_huggingface_hubs_private_writer_writes(published, tmp_path):
    from huggingface_hub import _tree_cache

    entries = {f.path: _tree_cache.TreeCacheEntry(**f.tree_entry()) for f in published.files}
    _tree_cache.write_tree_cache(str(tmp_path), published.commit, entries)
    try:
        written = (tmp_path / "trees" / f"{published.commit}.json").read_bytes()
        assert written == hub.tree_listing(published.files)
        assert written == (published.storage_folder / "trees" / f"{published.commit}.json").read_bytes()
    finally:  # write_tree_cache also seeds the library's in-memory cache: forget our temporary entry
        _tree_cache._IN_MEMORY_TREE_CACHE.pop(_tree_cache._tree_cache_path(str(tmp_path), published.commit), None)


def test_scan_cache_dir_does_not_follow_offline_hub_but_downloads_do(published):
    # offline_hub's docstring: scan_cache_dir binds HF_HUB_CACHE at import (utils/_cache_manager.py), the
    # download functions read constants.HF_HUB_CACHE at call time
    from huggingface_hub.utils import _cache_manager

    with hub.offline_hub():
        assert constants.HF_HUB_CACHE == str(hub.hub_cache_dir())
        assert _cache_manager.HF_HUB_CACHE != constants.HF_HUB_CACHE
        assert try_to_load_from_cache(REPO, "config.json") == str(published.snapshot_folder / "config.json")


def test_tree_listing_is_the_one_huggingface_hub_reads(published):
    from huggingface_hub._tree_cache import read_tree_cache

    entries = {f.path: f for f in get_cached_repo_tree(REPO, cache_dir=hub.hub_cache_dir())}
    assert set(entries) == {f.path for f in published.files}
    raw = read_tree_cache(str(published.storage_folder), published.commit)  # with the LFS fields
    for f in published.files:
        assert entries[f.path].size == f.size and entries[f.path].blob_id == f.git_id
        assert raw[f.path].lfs_sha256 == (f.blob if f.lfs else None)


# --- offline, unchanged calls -------------------------------------------------------------------

def test_hub_calls_work_offline(published):
    with hub.offline_hub() as cache:
        assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
        index = hf_hub_download(REPO, "model.safetensors.index.json")
        assert Path(index) == published.snapshot_folder / "model.safetensors.index.json"
        assert snapshot_download(REPO) == str(published.snapshot_folder)
        assert try_to_load_from_cache(REPO, "config.json") == str(published.snapshot_folder / "config.json")
        with pytest.raises(LocalEntryNotFoundError):  # offline: not in the cache means an error, not a download
            hf_hub_download(REPO, "no-such-file.json")
        assert Path(cache) == hub.hub_cache_dir()


def test_explicit_cache_dir_works_without_the_context_manager(published, monkeypatch):
    # local_files_only=True still builds request headers, and with telemetry on huggingface_hub 2.4 then
    # looks up an "agent harnesses" registry on the hub (once per process): keep this test offline
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    path = hf_hub_download(REPO, "config.json", cache_dir=hub.hub_cache_dir(), local_files_only=True)
    assert Path(path) == published.snapshot_folder / "config.json"


def test_from_pretrained_offline_matches_the_folder(published):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hub.offline_hub():
        model = AutoModelForCausalLM.from_pretrained(REPO)
        tokenizer = AutoTokenizer.from_pretrained(REPO)
    direct = AutoModelForCausalLM.from_pretrained(TINY)
    for (name, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tokenizer("A list is")["input_ids"][0] == tokenizer.bos_token_id


def test_offline_hub_restores_environment_and_constants(published):
    before_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    before = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)
    with pytest.raises(RuntimeError), hub.offline_hub():
        raise RuntimeError("inside")
    assert {k: os.environ.get(k) for k in before_env} == before_env
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE) == before


# --- idempotent, and nowhere else ---------------------------------------------------------------

def test_publishing_again_writes_nothing(published):
    before = snapshot_of(published.cache_dir)
    again = hub.publish_to_local_cache(TINY, REPO)
    assert again.reused and again.commit == published.commit
    assert snapshot_of(published.cache_dir) == before


def test_a_changed_file_is_a_new_commit_sharing_the_other_blobs(published, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(TINY, changed)
    (changed / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    new = hub.publish_to_local_cache(changed, REPO)
    assert new.commit != published.commit and not new.reused
    assert (new.storage_folder / "refs" / "main").read_text() == new.commit
    assert published.snapshot_folder.is_dir()  # the old commit stays, as in a real cache
    blobs = list((new.storage_folder / "blobs").iterdir())
    assert len(blobs) == len(published.files) + 1  # only the changed file added a blob


def test_nothing_is_written_outside_the_cache(tmp_path):
    home, work, cache = tmp_path / "home", tmp_path / "work", tmp_path / "cache"
    home.mkdir()
    work.mkdir()
    code = textwrap.dedent(f"""
        from helpers import hub
        from huggingface_hub import hf_hub_download, snapshot_download
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        hub.publish_to_local_cache({str(TINY)!r}, "suite/tiny-llama")
        with hub.offline_hub():
            hf_hub_download("suite/tiny-llama", "model.safetensors.index.json")
            snapshot_download("suite/tiny-llama")
            model = AutoModelForCausalLM.from_pretrained("suite/tiny-llama", device_map="auto",
                                                         max_memory={{"cpu": "10MB"}})
            AutoTokenizer.from_pretrained("suite/tiny-llama")
            pipeline("text-generation", model="suite/tiny-llama")("A list is", max_new_tokens=2, do_sample=False)
        print("done")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "TRANSFORMERS_"))}
    # CUDA_CACHE_PATH: on a GPU the NVIDIA driver keeps its kernel JIT cache in ~/.nv/ComputeCache; that is
    # the driver's, not the suite's, so it goes elsewhere and the check below stays strict.
    env.update(HOME=str(home), BIGMODEL_CACHE=str(cache), PYTHONPATH=str(ROOT),
               CUDA_CACHE_PATH=str(tmp_path / "cache" / "nv-compute-cache"))
    result = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip().endswith("done"), result.stderr[-3000:]
    assert list(home.rglob("*")) == [], list(home.rglob("*"))  # no ~/.cache/huggingface, nothing at all
    assert list(work.rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "home", "work"]
    assert sorted(p.name for p in cache.iterdir() if p.name != "nv-compute-cache") == ["hub"]


def test_link_shares_the_files_instead_of_copying(isolated_cache, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)  # a folder of our own, on the cache's file system
    repo = hub.publish_to_local_cache(folder, "local/model", link=True)
    for f in repo.files:
        assert (repo.storage_folder / "blobs" / f.blob).stat().st_ino == (folder / f.path).stat().st_ino
