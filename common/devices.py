"""Whether this process can compute on the device a user asked for, said before any work starts.

torch answers a GPU asked of a CPU-only build with ``AssertionError: Torch not compiled with CUDA
enabled`` from deep inside ``Module.to``, and a GPU index beyond the machine's with a CUDA error at
the first kernel; :func:`check_device` says which it is and what to change, up front.
"""
from __future__ import annotations

import torch


class DeviceUnavailable(ValueError):
    """The device cannot be used by this process; the message says why and what to use instead."""


def check_device(name: str, flag: str = "--device") -> torch.device:
    """The device ``name`` names, once a tensor can be made there; else :class:`DeviceUnavailable`."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"{flag} {name!r} is not a device: use cpu, or cuda:N for GPU N") from None
    if device.type == "cuda":
        _check_cuda(device, flag)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise DeviceUnavailable(f"{flag} {name}: this process cannot compute there: {error}") from None
    return device


def _check_cuda(device: torch.device, flag: str) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise DeviceUnavailable(
            f"{flag} {device}, but this torch ({torch.__version__}) is a CPU-only build: install a CUDA build "
            "of torch (pip install torch --index-url https://download.pytorch.org/whl/cu128, or the command "
            "https://pytorch.org/get-started/locally/ gives for your CUDA), or use --device cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceUnavailable(
            f"{flag} {device}, but torch {torch.__version__} sees no GPU here: is the NVIDIA driver installed "
            "(nvidia-smi), and is CUDA_VISIBLE_DEVICES unset or naming a GPU? Or use --device cpu")
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(
            f"{flag} {device}, but this process sees {count} GPU{'s' if count > 1 else ''} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
