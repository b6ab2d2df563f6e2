"""``check_device`` says, before any work, why a device cannot be used and what to do instead."""
import pytest
import torch

from gapaware.common.devices import DeviceUnavailable, check_device


def test_the_cpu_is_always_there():
    assert check_device("cpu") == torch.device("cpu")


def test_a_name_that_is_no_device_is_refused_naming_the_flag():
    with pytest.raises(DeviceUnavailable, match=r"^--device 'gpu' is not a device: use cpu, or cuda:N"):
        check_device("gpu")


@pytest.mark.parametrize(("build", "count", "name", "says"), [
    (None, 0, "cuda:0", r"^--device cuda:0, but this torch \(.*\) is a CPU-only build: install a CUDA build"),
    ("12.8", 0, "cuda", r"^--device cuda, but torch .* sees no GPU here: is the NVIDIA driver installed"),
    ("12.8", 2, "cuda:2", r"^--device cuda:2, but this process sees 2 GPUs \(cuda:0 to cuda:1\)$"),
    ("12.8", 1, "cuda:1", r"^--device cuda:1, but this process sees 1 GPU \(cuda:0\)$"),
])
def test_a_gpu_this_process_cannot_use_is_refused_saying_why(monkeypatch, build, count, name, says):
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(DeviceUnavailable, match=says):
        check_device(name)
