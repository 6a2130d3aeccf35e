"""What every benchmark shares: the result line format and the machine's identity.

stdout gets one JSON object per result (name, params, value, unit, git sha,
device); a short human line goes to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]


@functools.cache
def git_sha() -> str | None:
    """The project's commit, of this checkout whatever the cwd ('-dirty' when tracked files changed).

    A copy without .git (a device box that got only the working tree) names it by
    `LAYERSWARM_GIT_SHA`, e.g. `LAYERSWARM_GIT_SHA=$(git rev-parse --short HEAD)` where it was sent from;
    else None."""
    try:
        head = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        status = subprocess.run(["git", "-C", str(PROJECT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LAYERSWARM_GIT_SHA") or None
    sha = head.stdout.strip()
    return (sha + "-dirty" if status.stdout.strip() else sha) or None


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
