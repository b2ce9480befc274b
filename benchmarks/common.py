"""Measuring pieces the GPU benchmarks share: timing, kernel counting, versions, result files."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def time_ms(step: Callable[[], Any], device: str) -> float:
    """Wall time of `step` in ms: CUDA events on the GPU (queued work included), perf_counter elsewhere."""
    if device != "cuda":
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def cuda_kernels(prof: Any) -> list[Any]:
    """The CUDA kernels a torch.profiler run recorded (memcpy and memset are not kernels here)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset"))]


def version(pkg: str) -> str | None:
    """An installed distribution's version (names are normalised: liger-kernel finds liger_kernel)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(pkg)
    except PackageNotFoundError:
        return None


def write_json(path: str | Path, data: Any) -> None:
    """Written whole or not at all (temp file, then rename)."""
    from rlora_cli.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")
