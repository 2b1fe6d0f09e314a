import sys

import pytest
import torch
import workloads

from helpers.child import MemoryCap, run_in_child
from helpers.measure import MemoryTimeline, read_host_memory
from helpers.memory import MiB

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
def test_timeline_measures_a_known_allocation_in_process():
    with MemoryTimeline() as timeline:
        block = torch.ones(64 * MiB // 4)
        timeline.mark("allocated")
        del block
    trace = timeline.trace
    assert abs(trace.peak_anon_delta - 64 * MiB) < 8 * MiB
    assert trace.time_of("allocated") <= trace.duration
    assert [m for _, m in trace.marks] == ["allocated"]


@linux_only
def test_child_measures_a_known_allocation():
    result = run_in_child(workloads.allocate, 300 * MiB)
    assert result.ok, result
    assert result.value == 300 * MiB
    assert abs(result.trace.peak_anon_delta - 300 * MiB) < 0.05 * 300 * MiB
    assert result.trace.kernel_peak_rss >= 300 * MiB
    assert "allocated" in [m for _, m in result.trace.marks]


@linux_only
def test_mapped_file_is_file_backed_not_anonymous(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(torch.ones(64 * MiB // 4).numpy().tobytes())
    result = run_in_child(workloads.map_file, str(path))
    assert result.ok, result
    assert result.value == 64 * MiB // 4
    assert result.trace.peak_file - result.trace.file[0] > 48 * MiB
    assert result.trace.peak_anon_delta < 16 * MiB


def test_child_returns_the_real_exception():
    result = run_in_child(workloads.fail_with, "bad input")
    assert not result.ok and result.error_type == "ValueError" and result.error_message == "bad input"
    with pytest.raises(ValueError, match="bad input"):
        result.reraise()
    assert "FAILED with ValueError" in repr(result)


def test_notebook_defined_functions_are_refused_with_a_clear_message():
    def local():
        return 1

    with pytest.raises(ValueError, match="cannot import it"):
        run_in_child(local)


@linux_only
def test_data_cap_fails_over_budget_and_passes_under_it():
    over = run_in_child(workloads.allocate, 400 * MiB, cap=MemoryCap(200 * MiB))
    assert not over.ok
    assert over.error_type == "RuntimeError" and "allocate" in over.error_message.lower()
    under = run_in_child(workloads.allocate, 100 * MiB, cap=MemoryCap(200 * MiB))
    assert under.ok, under


@linux_only
@pytest.mark.parametrize("loader", ["torch", "safetensors"])
def test_data_cap_counts_the_loaders_private_file_mappings(tmp_path, loader):
    """Since Linux 4.7 RLIMIT_DATA counts private writable mappings, files included, and the loaders map rw-p.

    A 64 MiB checkpoint mapped by the loader itself fails under current usage + 16 MiB; the same
    file mapped MAP_SHARED (which no loader does by default) passes under the same cap.
    """
    from safetensors.torch import save_file

    tensors = {"w": torch.ones(64 * MiB // 4)}
    path = tmp_path / ("ckpt.pt" if loader == "torch" else "ckpt.safetensors")
    torch.save(tensors, path) if loader == "torch" else save_file(tensors, path)
    uncapped = run_in_child(workloads.load_mapped, str(path), loader)
    assert uncapped.ok, uncapped
    assert uncapped.value and all(line.split()[1] == "rw-p" for line in uncapped.value), uncapped.value
    capped = run_in_child(workloads.load_mapped, str(path), loader, cap=MemoryCap(16 * MiB, kind="data"))
    assert not capped.ok
    assert "Cannot allocate memory" in capped.error_message, capped.error_message
    shared = run_in_child(workloads.map_file, str(path), cap=MemoryCap(16 * MiB, kind="data"))
    assert shared.ok, shared


@linux_only
def test_address_space_cap_counts_even_shared_mappings(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\0" * (256 * MiB))
    as_cap = run_in_child(workloads.map_file, str(path), cap=MemoryCap(64 * MiB, kind="address-space"))
    assert not as_cap.ok


def test_watchdog_kills_a_child_over_budget():
    result = run_in_child(workloads.allocate, 1024 * MiB, cap=MemoryCap(200 * MiB, kind="watchdog"))
    assert not result.ok and result.killed_by_watchdog
    assert "watchdog" in result.error_message


def test_read_host_memory_is_positive():
    host = read_host_memory()
    assert host.anon > 0
