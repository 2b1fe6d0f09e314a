"""A local Hugging Face cache, so `hf_hub_download` and `from_pretrained("org/name")` work offline, unchanged.

`publish_to_local_cache` puts a model folder into a hub cache exactly as a download would have left
it: `models--org--name/blobs/<id>` holds each file once, named by its sha256 (large "LFS" files such
as safetensors shards) or by its git blob sha1 (small files such as config.json), as the hub names
them; `snapshots/<commit>/<file>` are relative symlinks to those blobs; `refs/main` names the commit;
`trees/<commit>.json` is the file listing huggingface_hub 2.x keeps per commit. The commit is a real
git commit hash of those files (fixed author and date), so publishing the same files again gives the
same commit and writes nothing.

What comes from huggingface_hub itself (pinned 2.4) and what is written here:
- the git blob id is `huggingface_hub.utils.sha.git_hash` and a file's sha256 `utils.sha.sha_fileobj`
  (`utils/sha.py`), called, not rewritten;
- the repo's folder name is `huggingface_hub.file_download.repo_folder_name`, called;
- the `trees/<commit>.json` listing is written here in the format of huggingface_hub's *private*
  `_tree_cache.write_tree_cache` (`_tree_cache.py`, `format_version` 1), which is not public API and,
  when called, also seeds the library's in-memory cache; tests/test_hub.py checks that the bytes are
  the ones `write_tree_cache` writes and that `read_tree_cache` reads them back;
- the git tree and commit ids have no huggingface_hub function (the hub computes them server-side):
  they follow git's object format, checked against `git mktree` / `git commit-tree` in the tests.

`offline_hub` switches huggingface_hub to offline mode and to that cache for the duration of a
`with` block. huggingface_hub reads `HF_HUB_OFFLINE` and `HF_HUB_CACHE` from the environment once,
when it is imported, so setting the variables later changes nothing by itself: the context manager
sets both the variables (for child processes) and the module's constants (for this process).

Everything is written under the suite's cache (`helpers.paths.cache_dir("hub")` by default), never
in `~/.cache/huggingface`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from .memory import format_bytes
from .paths import cache_dir as suite_cache_dir

DEFAULT_REPO_ID = "suite/tiny-llama"
#: File types the hub's default .gitattributes stores with Git LFS (a subset: the ones models use).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".npy",
                ".npz", ".pkl", ".gguf", ".zip", ".gz", ".tar")
LFS_MIN_BYTES = 10 * 2**20  # the hub refuses plain git files over 10 MiB: bigger ones are LFS whatever their type
_AUTHOR = "suite <suite@localhost> 0 +0000"  # fixed author and date: same files, same commit hash


def hub_cache_dir() -> Path:
    """The suite's own hub cache root (inside `$BIGMODEL_CACHE` or `<repo>/.cache`), never ~/.cache/huggingface."""
    return suite_cache_dir("hub")


# --- how the hub names things -------------------------------------------------------------------

def lfs_pointer(sha256: str, size: int) -> bytes:
    """The small text file git stores in place of an LFS file; the hub's `blob_id` for it is its git id."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(name: str, size: int) -> bool:
    """Would the hub store this file with Git LFS? (by type, as its default .gitattributes, or by size)."""
    return name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES


def _sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks by huggingface_hub's own `utils.sha.sha_fileobj`."""
    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


@dataclass(frozen=True)
class CachedFile:
    """One file of a repo as the hub describes it: its blob name in the cache, its size, and whether it is LFS."""

    path: str  # inside the repo, with "/" separators
    size: int
    lfs: bool
    blob: str  # the cache's blob file name: sha256 for LFS files, the git blob sha1 otherwise
    git_id: str  # git's object id: of the content, or of the LFS pointer for LFS files (the tree API's `oid`)

    def tree_entry(self) -> dict:
        """The entry huggingface_hub writes in trees/<commit>.json for this file."""
        entry = {"size": self.size, "blob_id": self.git_id}
        if self.lfs:
            entry.update(lfs_sha256=self.blob, lfs_size=self.size)
        return entry


def describe_file(root: Path, path: Path) -> CachedFile:
    """Hash one file the way the hub does: sha256 of an LFS file's bytes, else git's blob id (`git_hash`)."""
    size = path.stat().st_size
    name = path.relative_to(root).as_posix()
    if is_lfs(name, size):
        sha256 = _sha256_file(path)
        return CachedFile(name, size, True, sha256, git_hash(lfs_pointer(sha256, size)))
    git_id = git_hash(path.read_bytes())
    return CachedFile(name, size, False, git_id, git_id)


def git_tree_id(files: list[CachedFile]) -> str:
    """The git tree object id of these files (nested folders become nested trees), as `git write-tree` computes."""
    def tree(entries: dict) -> str:
        items = []
        for name, value in entries.items():
            if isinstance(value, dict):
                items.append((name + "/", b"40000 " + name.encode() + b"\0" + bytes.fromhex(tree(value))))
            else:
                items.append((name, b"100644 " + name.encode() + b"\0" + bytes.fromhex(value)))
        body = b"".join(item for _, item in sorted(items, key=lambda kv: kv[0].encode()))  # git's order
        return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()

    nested: dict = {}
    for f in files:
        *folders, name = f.path.split("/")
        node = nested
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = f.git_id
    return tree(nested)


def git_commit_id(tree_id: str, message: str) -> str:
    """The git commit id of a root commit with a fixed author and date (so it depends on the files only)."""
    body = f"tree {tree_id}\nauthor {_AUTHOR}\ncommitter {_AUTHOR}\n\n{message}\n".encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


# --- publishing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalRepo:
    """A repo published into a local hub cache: where it is, which commit, which files."""

    repo_id: str
    cache_dir: Path
    commit: str
    files: tuple[CachedFile, ...]
    revision: str = "main"
    reused: bool = False  # True when the cache already held this exact commit and nothing was written

    @property
    def storage_folder(self) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    @property
    def snapshot_folder(self) -> Path:
        return self.storage_folder / "snapshots" / self.commit

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def __repr__(self) -> str:
        lfs = sum(f.lfs for f in self.files)
        return (f"LocalRepo({self.repo_id!r} @ {self.revision} = commit {self.commit[:12]}, {len(self.files)} files "
                f"({lfs} LFS), {format_bytes(self.total_bytes)}, "
                f"{'reused from the cache' if self.reused else 'published'}\n  cache_dir: {self.cache_dir})")


def _is_published(repo: LocalRepo) -> bool:
    storage = repo.storage_folder
    ref = storage / "refs" / repo.revision
    if not ref.is_file() or ref.read_text() != repo.commit:
        return False
    for f in repo.files:
        pointer = repo.snapshot_folder / f.path
        blob = storage / "blobs" / f.blob
        if not blob.is_file() or blob.stat().st_size != f.size or not pointer.is_file():
            return False
    return (storage / "trees" / f"{repo.commit}.json").is_file()


def _write_atomically(path: Path, data: bytes | None = None, source: Path | None = None, link: bool = False) -> None:
    """Write (or copy, or hard-link) to a temporary name next to `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.incomplete")
    tmp.unlink(missing_ok=True)
    if source is not None and link:
        try:
            os.link(source, tmp)  # no second copy of a big checkpoint (same file system only)
        except OSError:
            shutil.copyfile(source, tmp)
    elif source is not None:
        shutil.copyfile(source, tmp)
    else:
        tmp.write_bytes(data or b"")
    os.replace(tmp, path)


def _link(pointer: Path, blob: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<id>, relative as huggingface_hub makes it (a copy without symlinks)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # no symlinks here (Windows without developer mode): huggingface_hub copies too
        shutil.copyfile(blob, pointer)


def publish_to_local_cache(folder: str | Path, repo_id: str = DEFAULT_REPO_ID, cache_dir: str | Path | None = None,
                           revision: str = "main", link: bool = False) -> LocalRepo:
    """Put every file of `folder` into a local hub cache as if `snapshot_download(repo_id)` had fetched it.

    Idempotent: the commit hash depends only on the files, and a commit already in the cache is
    reused without writing anything. Writes only under `cache_dir` (default: `hub_cache_dir()`).
    `link=True` hard-links the blobs to the folder's files instead of copying them (for big local
    checkpoints; the folder's files must then never be edited in place, as the blobs are named by content).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder to publish")
    root = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    paths = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    files = tuple(describe_file(folder, p) for p in paths)
    commit = git_commit_id(git_tree_id(list(files)), f"Publish {repo_id} into a local cache (helpers.hub)")
    repo = LocalRepo(repo_id, root.resolve(), commit, files, revision)
    if _is_published(repo):
        return LocalRepo(repo_id, repo.cache_dir, commit, files, revision, reused=True)

    storage = repo.storage_folder
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for f, source in zip(files, paths, strict=True):
        blob = storage / "blobs" / f.blob
        if not (blob.is_file() and blob.stat().st_size == f.size):
            _write_atomically(blob, source=source, link=link)
        _link(repo.snapshot_folder / f.path, blob)
    (storage / "trees").mkdir(exist_ok=True)
    _write_atomically(storage / "trees" / f"{commit}.json", tree_listing(files))
    (storage / "refs").mkdir(exist_ok=True)
    _write_atomically(storage / "refs" / revision, commit.encode())  # no newline, as huggingface_hub writes it
    return repo


def tree_listing(files: tuple[CachedFile, ...] | list[CachedFile]) -> bytes:
    """The bytes of `trees/<commit>.json`, as huggingface_hub 2.4's private `_tree_cache.write_tree_cache` writes them.

    Format version 1, one entry per file sorted by path, `json.dump(..., indent=1)`. Written here, not by
    calling that private function (not public API; it also fills the library's in-memory tree cache).
    """
    data = {"format_version": 1, "files": {f.path: f.tree_entry() for f in sorted(files, key=lambda f: f.path)}}
    return json.dumps(data, indent=1).encode()


def cache_tree(repo: LocalRepo, width: int = 16) -> str:
    """The repo's cache folder as a `tree`-style listing: refs, snapshots (symlinks) and blobs, ids shortened."""
    storage = repo.storage_folder

    def short(name: str) -> str:
        return name if len(name) <= width else name[:width] + "..."

    lines = [f"{storage.name}/", "├── blobs/"]
    blobs = sorted(repo.files, key=lambda f: f.blob)
    for i, f in enumerate(blobs):
        branch = "└" if i == len(blobs) - 1 else "├"
        lines.append(f"│   {branch}── {short(f.blob):<{width + 3}} {format_bytes(f.size):>10}  "
                     f"{'sha256 (LFS)' if f.lfs else 'git sha1    '}  {f.path}")
    lines += ["├── refs/", f"│   └── {repo.revision}  (contains {repo.commit})", "├── snapshots/",
              f"│   └── {short(repo.commit)}/"]
    for i, f in enumerate(repo.files):
        pointer = repo.snapshot_folder / f.path
        target = os.readlink(pointer).replace(os.sep, "/") if pointer.is_symlink() else "(a copy)"
        folder, _, blob = target.rpartition("/")
        lines.append(f"│       {'└' if i == len(repo.files) - 1 else '├'}── {f.path:<34} -> "
                     f"{folder + '/' if folder else ''}{short(blob)}")
    lines += ["└── trees/", f"    └── {short(repo.commit)}.json  (the file listing)"]
    return "\n".join(lines)


# --- offline mode -------------------------------------------------------------------------------

_ENV = ("HF_HUB_OFFLINE", "HF_HUB_CACHE")


@contextmanager
def offline_hub(cache_dir: str | Path | None = None) -> Iterator[Path]:
    """Offline mode and the given hub cache, for the `with` block; everything is restored afterwards.

    Sets the environment variables HF_HUB_OFFLINE=1 and HF_HUB_CACHE (seen by child processes and by
    any huggingface_hub imported later) and the values huggingface_hub already read from them at
    import (`huggingface_hub.constants.HF_HUB_OFFLINE` and `.HF_HUB_CACHE`). In huggingface_hub 2.4,
    `hf_hub_download`, `snapshot_download` and `try_to_load_from_cache` read `constants.HF_HUB_CACHE`
    when called without `cache_dir`, and every request checks `constants.is_offline_mode()`; but
    `scan_cache_dir` does not: `utils/_cache_manager.py` binds `HF_HUB_CACHE` with `from ..constants
    import HF_HUB_CACHE` at import, so pass it the folder explicitly.
    """
    from huggingface_hub import constants

    root = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    saved_env = {k: os.environ.get(k) for k in _ENV}
    saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(root)
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(root)
    try:
        yield root
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
