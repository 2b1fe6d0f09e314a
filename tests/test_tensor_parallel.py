"""helpers.tensor_parallel: the torchrun launch (two gloo ranks on the CPU) against one process, and its guards."""

import socket
from types import SimpleNamespace

import psutil
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import tensor_parallel
from helpers.paths import DATA_DIR

TINY = DATA_DIR / "tiny-llama"
PROMPT = [1, 35, 534, 297]  # "A list is"


def test_heads_must_divide_by_the_world_size():
    config = AutoConfig.from_pretrained(TINY)  # 4 query heads, 2 KV heads
    tensor_parallel.check_divisible(config, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=2 does not divide by 4"):
        tensor_parallel.check_divisible(config, 4)
    with pytest.raises(ValueError, match="num_attention_heads=4 does not divide by 3"):
        tensor_parallel.check_divisible(config, 3)


def test_the_command_stays_on_the_loopback_interface():
    port = tensor_parallel.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: nothing listens there
    command = tensor_parallel.torchrun_command(TINY, "/out", PROMPT, 4, 2, port)
    assert command[1:4] == ["-m", "torch.distributed.run", "--nnodes"]
    assert "--nproc-per-node=2" in command and f"--master-port={port}" in command
    assert command[command.index("--master-addr") + 1] == "127.0.0.1"
    assert command[command.index("-m", 2) + 1] == "helpers.tensor_parallel"
    assert command[-4:] == ["--prompt", "1,35,534,297", "--new-tokens", "4"]


def test_collectives_are_counted_in_the_innermost_modules():
    comm = SimpleNamespace(comm_module_counts={  # as CommDebugMode keeps them (operators print as these names)
        "Global": {"forward": {"c10d.allreduce_": 2}},
        "LlamaForCausalLM": {"forward": {"c10d.allreduce_": 2, "c10d_functional.all_gather_into_tensor": 1}},
        "LlamaForCausalLM.model": {"forward": {"c10d.allreduce_": 2}},
        "LlamaForCausalLM.model.layers.0": {"forward": {"c10d.allreduce_": 2}},
        "LlamaForCausalLM.model.layers.0.self_attn.o_proj": {"forward": {"c10d.allreduce_": 1}},
        "LlamaForCausalLM.model.layers.0.mlp.down_proj": {"forward": {"c10d.allreduce_": 1}, "backward": {}},
        "LlamaForCausalLM.model.embed_tokens": {"forward": {"c10d_functional.all_reduce": 1}},
        "LlamaForCausalLM.lm_head": {"forward": {"c10d_functional.all_gather_into_tensor": 1}},
        "LlamaForCausalLM.model.norm": {"forward": {}},
    })
    assert tensor_parallel.collectives_by_module(comm) == {
        "model.layers.0.self_attn.o_proj": {"all_reduce": 1}, "model.layers.0.mlp.down_proj": {"all_reduce": 1},
        "model.embed_tokens": {"all_reduce": 1}, "lm_head": {"all_gather": 1}}


@pytest.mark.slow
def test_two_ranks_match_one_process(isolated_cache):
    """The real launch (about 15-25 s on 2 cores): same logits within 1e-4, same greedy tokens, half of each weight."""
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    input_ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(input_ids).logits
        tokens = model.generate(input_ids, max_new_tokens=4, do_sample=False)[0].tolist()

    run = tensor_parallel.run_tensor_parallel(TINY, PROMPT, new_tokens=4, world_size=2, use_gpus=False, timeout=120)

    assert run.world_size == 2 and run.backend == "gloo" and [r.rank for r in run.ranks] == [0, 1]
    assert torch.equal(run.ranks[0].logits, run.ranks[1].logits)
    assert (run.logits - logits).abs().max() < 1e-4 and list(run.tokens) == tokens
    for rank in run.ranks:
        q = rank.shard("model.layers.0.self_attn.q_proj.weight")
        o = rank.shard("model.layers.0.self_attn.o_proj.weight")
        assert (q.style, q.full_shape, q.local_shape) == ("colwise", (256, 256), (128, 256))
        assert (o.style, o.placement, o.local_shape) == ("rowwise", "Shard(dim=1)", (256, 128))
        norm = rank.shard("model.norm.weight")
        assert norm.style == "replicated" and norm.local_bytes == norm.full_bytes
        assert rank.full_bytes == sum(p.numel() * 4 for p in model.parameters())
        assert abs(rank.local_bytes / rank.full_bytes - 0.5) < 0.01
        layers = model.config.num_hidden_layers
        assert rank.collective_calls == 2 * layers + 2
        assert rank.collectives["model.layers.3.mlp.down_proj"] == {"all_reduce": 1}
    assert "OUT_DIR" in run.command and "127.0.0.1" in run.command
    assert not any((isolated_cache / "tensor_parallel").iterdir()), "the ranks' files were not removed"
    assert "TensorParallelRun(2 ranks, backend gloo" in repr(run)


def launched_under(folder) -> list[psutil.Process]:
    """Running processes whose command line names `folder` (torchrun and its ranks get the output folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(folder) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_a_launch_that_times_out_is_stopped_with_its_ranks(isolated_cache):
    """torchrun starts each rank in a session of its own: the launcher must find and stop them all."""
    # Work that cannot finish in 8 s on any machine, so the timeout fires while the ranks are generating: the tiny
    # model greedily writes over 3,000 tokens after this prompt without an end-of-text token, each one two gloo
    # all-reduces per layer away. (A 4-token run finishes in about 8 s on a 2-core machine: no margin at all.)
    with pytest.raises(TimeoutError, match="did not finish in 8 s"):
        tensor_parallel.run_tensor_parallel(TINY, PROMPT, new_tokens=20_000, world_size=2, use_gpus=False, timeout=8)
    assert not launched_under(isolated_cache), "torchrun or a rank is still running"
    assert not any((isolated_cache / "tensor_parallel").iterdir())
