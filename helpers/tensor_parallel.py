"""Tensor parallelism with transformers' own plan, run by torchrun: what each rank runs, and a launcher.

Every process (rank) loads the same checkpoint with `from_pretrained(distributed_config=DistributedConfig(
tp_plan="auto"))` and keeps only its slice of each sharded weight; a forward pass then needs the other
ranks' partial results, exchanged by collectives (all-reduce). A notebook cannot be a rank, so it
starts the ranks as a subprocess, exactly as one would in a terminal:

    python -m torch.distributed.run --nproc-per-node 2 -m helpers.tensor_parallel MODEL_DIR OUT_DIR --prompt 1,2,3

Each rank writes what it holds, the collectives one forward pass made, its logits and its greedy tokens
into OUT_DIR; `run_tensor_parallel` launches the ranks (loopback only, a free port, killed on timeout),
reads those files back and removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .memory import format_bytes
from .paths import REPO_ROOT, cache_dir


@dataclass(frozen=True)
class Shard:
    """One parameter as one rank holds it: the full shape, this rank's piece, and the plan's style for it."""

    name: str
    style: str  # the tp_plan rule that applies ("colwise", "rowwise", ...), or "replicated"
    placement: str  # the DTensor placement: "Shard(dim=0)", "Shard(dim=1)", or "-" for a plain tensor
    full_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    local_bytes: int
    full_bytes: int


@dataclass(frozen=True)
class RankReport:
    """What one rank held, exchanged and computed."""

    rank: int
    device: str
    backend: str
    shards: tuple[Shard, ...]
    collectives: dict[str, dict[str, int]]  # module -> {collective: calls} during one forward pass
    tokens: tuple[int, ...]  # the prompt followed by the greedy continuation
    logits: torch.Tensor  # the forward pass's logits, [1, prompt length, vocab]
    seconds: dict[str, float]  # import, load, forward, generate

    @property
    def local_bytes(self) -> int:
        return sum(s.local_bytes for s in self.shards)

    @property
    def full_bytes(self) -> int:
        return sum(s.full_bytes for s in self.shards)

    def shard(self, name: str) -> Shard:
        return next(s for s in self.shards if s.name == name)

    @property
    def collective_calls(self) -> int:
        """Collectives called in one forward pass, all modules together."""
        return sum(calls for by_op in self.collectives.values() for calls in by_op.values())

    def __repr__(self) -> str:
        return (f"RankReport(rank {self.rank} on {self.device} ({self.backend}): holds "
                f"{format_bytes(self.local_bytes)} of {format_bytes(self.full_bytes)} "
                f"({self.local_bytes / self.full_bytes:.1%}), {self.collective_calls} collectives per forward pass)")


@dataclass(frozen=True)
class TensorParallelRun:
    """The ranks' reports from one torchrun launch, with the command that ran them and its wall time."""

    world_size: int
    ranks: tuple[RankReport, ...]
    command: str
    wall_seconds: float
    log: str  # everything torchrun and the ranks printed

    @property
    def backend(self) -> str:
        return self.ranks[0].backend

    @property
    def logits(self) -> torch.Tensor:
        return self.ranks[0].logits

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.ranks[0].tokens

    def __repr__(self) -> str:
        lines = [f"TensorParallelRun({self.world_size} ranks, backend {self.backend}, {self.wall_seconds:.1f} s "
                 "wall (process start, imports and loading included)"]
        lines += [f"  {rank!r}" for rank in self.ranks]
        return "\n".join(lines) + ")"


# --- what each rank runs --------------------------------------------------------------------------

def _style(name: str, plan: dict[str, str]) -> str:
    """The plan's rule for a parameter's module ('model.layers.3.mlp.up_proj.weight' -> plan['model.layers.*...'])."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    module = replace_layer_number_by_wildcard(name.rsplit(".", 1)[0])
    return plan.get(module, "replicated")


def shards_of(model: torch.nn.Module) -> list[Shard]:
    """Every parameter of a tensor-parallel model: full shape (a DTensor knows it) and this rank's local piece."""
    from torch.distributed.tensor import DTensor

    plan = dict(model.tp_plan)
    rows = []
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        placement = ", ".join(map(repr, param.placements)) if isinstance(param, DTensor) else "-"
        rows.append(Shard(name, _style(name, plan), placement, tuple(param.shape), tuple(local.shape),
                          local.numel() * local.element_size(), param.numel() * param.element_size()))
    return rows


#: CommDebugMode's operator names -> the collective's name (c10d's in-place op and the functional one are the same)
_COLLECTIVES = {"allreduce_": "all_reduce", "all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
                "allgather_": "all_gather", "reduce_scatter_tensor": "reduce_scatter", "broadcast_": "broadcast"}


def collectives_by_module(comm) -> dict[str, dict[str, int]]:
    """The innermost modules in which a CommDebugMode saw collectives during the forward pass, with their counts."""
    counts = {}
    for fqn, directions in comm.comm_module_counts.items():
        if "." not in fqn:  # "Global" and the model's own entry ("LlamaForCausalLM") add up their modules
            continue
        forward: Counter[str] = Counter()
        for op, calls in directions.get("forward", {}).items():
            name = str(op).split(".")[-1]
            forward[_COLLECTIVES.get(name, name)] += calls
        if forward:
            counts[fqn.split(".", 1)[1]] = dict(forward)  # "LlamaForCausalLM.lm_head" -> "lm_head"
    # a module's counts include its children's: keep the innermost modules, where the collectives are called
    return {m: c for m, c in counts.items() if not any(other.startswith(m + ".") for other in counts)}


def rank_main(model_dir: str, out_dir: str, prompt: list[int], new_tokens: int) -> None:
    """One rank: load with the model's tp_plan, record the shards, one forward (collectives counted), greedy tokens."""
    start = time.perf_counter()
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 distributed_config=DistributedConfig(tp_plan="auto"))
    loaded = time.perf_counter()
    rank, device = dist.get_rank(), model.device
    input_ids = torch.tensor([prompt], device=device)
    with torch.no_grad(), CommDebugMode() as comm:  # counts every collective, per module
        logits = model(input_ids).logits
    forwarded = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)[0].tolist()
    generated = time.perf_counter()

    out = Path(out_dir)
    torch.save(logits.detach().cpu(), out / f"rank{rank}-logits.pt")
    report = {"rank": rank, "device": str(device), "backend": dist.get_backend(),
              "shards": [vars(s) for s in shards_of(model)], "collectives": collectives_by_module(comm),
              "tokens": tokens, "seconds": {"import": imported - start, "load": loaded - imported,
                                            "forward": forwarded - loaded, "generate": generated - forwarded}}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


# --- the launcher the notebook calls -------------------------------------------------------------

def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_divisible(config, world_size: int) -> None:
    """Attention heads and KV heads are split between ranks, so both must divide by the world size."""
    for key in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(config, key)
        if value % world_size:
            raise ValueError(f"{key}={value} does not divide by {world_size} ranks: tensor parallelism gives each "
                             f"rank whole heads. Choose a world size that divides {value}.")


def torchrun_command(model_dir: str | Path, out_dir: str | Path, prompt: Sequence[int], new_tokens: int,
                     world_size: int, port: int) -> list[str]:
    """The torchrun command line: `world_size` local processes, rendezvous on 127.0.0.1:`port`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={world_size}",
            "--master-addr", "127.0.0.1", f"--master-port={port}", "-m", "helpers.tensor_parallel",
            str(model_dir), str(out_dir), "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens)]


def _read_rank(out: Path, rank: int) -> RankReport:
    report = json.loads((out / f"rank{rank}.json").read_text())
    shards = tuple(Shard(**{**s, "full_shape": tuple(s["full_shape"]), "local_shape": tuple(s["local_shape"])})
                   for s in report["shards"])
    logits = torch.load(out / f"rank{rank}-logits.pt", weights_only=True)
    return RankReport(report["rank"], report["device"], report["backend"], shards, report["collectives"],
                      tuple(report["tokens"]), logits, report["seconds"])


def _stop(process: subprocess.Popen) -> str:
    """End the torchrun we started and every process under it, by process id; return what they had printed.

    torchrun starts each rank in a session of its own, so signalling torchrun's process group would miss
    them: the ranks are found as torchrun's descendants instead, and each gets SIGTERM, then SIGKILL.
    """
    try:
        parent = psutil.Process(process.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in family:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, family = psutil.wait_procs(family, timeout=5)
        if not family:
            break
    log, _ = process.communicate(timeout=10)  # every writer is gone: the pipe ends
    return log or ""


def run_tensor_parallel(model_dir: str | Path, prompt: Sequence[int], *, new_tokens: int = 16, world_size: int = 2,
                        use_gpus: bool | None = None, timeout: float = 120.0) -> TensorParallelRun:
    """Run `world_size` ranks with torchrun on this machine and return their reports.

    GPUs (NCCL) when this machine has at least `world_size` of them (or `use_gpus=True`), else CPU
    processes (gloo) with CUDA hidden from them. Nothing leaves the machine: the rendezvous is
    127.0.0.1 on a free port, and the hub is offline. On timeout torchrun and its ranks are killed.
    The ranks' files go to a fresh folder under the suite's cache, removed once read.
    """
    from transformers import AutoConfig

    check_divisible(AutoConfig.from_pretrained(model_dir), world_size)
    if use_gpus is None:
        use_gpus = torch.cuda.device_count() >= world_size
    out = Path(tempfile.mkdtemp(prefix="run-", dir=cache_dir("tensor_parallel")))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore"}
    if not use_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # transformers picks gloo on a CPU-only process
    command = torchrun_command(model_dir, out, prompt, new_tokens, world_size, free_port())
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log = _stop(process)
        shutil.rmtree(out, ignore_errors=True)
        raise TimeoutError(f"torchrun did not finish in {timeout:.0f} s and was stopped; its output ended with:\n"
                           f"{log[-3000:]}") from None
    except BaseException:  # an interrupted kernel must not leave the ranks running
        _stop(process)
        shutil.rmtree(out, ignore_errors=True)
        raise
    wall = time.perf_counter() - start
    try:
        if process.returncode != 0:
            raise RuntimeError(f"torchrun exited with {process.returncode}; its output ended with:\n{log[-3000:]}")
        ranks = tuple(_read_rank(out, r) for r in range(world_size))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    shown = " ".join(["python", *command[1:]]).replace(str(out), "OUT_DIR").replace(f"{REPO_ROOT}{os.sep}", "")
    return TensorParallelRun(world_size, ranks, shown, wall, log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--prompt", required=True, help="token ids, comma separated")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    rank_main(args.model_dir, args.out_dir, [int(t) for t in args.prompt.split(",")], args.new_tokens)


if __name__ == "__main__":
    main()
