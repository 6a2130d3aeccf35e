"""Which device and dtype a model part runs on: `--device` / `device=` resolved once, at the edge."""

from __future__ import annotations

import torch

from swarm.errors import SwarmError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device `name` means on this machine: "auto" is the first CUDA device when there is one, else the CPU.

    Raises `SwarmError` for a name that is no device, or a device this machine (or this torch build) lacks."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SwarmError(f"device {name!r} is not a device (try {DEVICE_CHOICES})") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SwarmError(f"device {name}: only {DEVICE_CHOICES} are supported")
    if not torch.cuda.is_available():
        raise SwarmError(f"device {name}: this machine (or this torch build) has no CUDA device")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise SwarmError(f"device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)  # an explicit index: tensors compare equal by device


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU (half the bytes a step reads, the card's fast path); float32 on the CPU (exact, and CPUs lack fast bf16 matmuls)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
