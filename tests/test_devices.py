import torch

from helpers.devices import default_device, detect_hardware


def test_detect_hardware_reports_real_values():
    hw = detect_hardware()
    assert hw.cpu_count >= 1
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert hw.disk_free_bytes > 0
    assert hw.has_gpu == torch.cuda.is_available() == bool(hw.gpus)
    assert "RAM" in repr(hw)


def test_default_device_matches_cuda_availability():
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
