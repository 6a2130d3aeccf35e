"""What every benchmark shares: the result line format and the machine's identity.

stdout gets one JSON object per result (name, params, value, unit, git sha,
device); a short human line goes to stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def git_sha() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name()}"
    import os
    import platform

    return f"cpu:{platform.machine()}x{os.cpu_count()}"


def emit(name: str, value: float, unit: str, params: dict[str, Any] | None = None, device: str = "cpu", human: str | None = None) -> None:
    record = {"name": name, "params": params or {}, "value": value, "unit": unit, "git_sha": git_sha(), "device": device_name(device)}
    print(json.dumps(record), flush=True)
    print(human or f"{name}: {value:.4g} {unit}", file=sys.stderr, flush=True)
