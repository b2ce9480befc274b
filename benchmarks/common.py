"""Measuring pieces the GPU benchmarks share: timing, kernel counting, versions, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_ANNOTATION = re.compile(r"^[\w.]+#[\w.]+$")


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
    """The CUDA kernels a torch.profiler run recorded (memcpy and memset are not kernels here).

    A record_function range (the optimizer's "Optimizer.step#AdamW.step") also shows on the GPU
    timeline, as an annotation spanning the kernels it launched, idle gaps included; it is not a
    kernel, and counting it would add its whole span to the busy time a second time."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset")) and not _annotation(e)]


def _annotation(event: Any) -> bool:
    # torch marks them (is_user_annotation); "Name#Class.method" is the optimizer's own naming.
    return bool(getattr(event, "is_user_annotation", False)) or _ANNOTATION.match(event.name) is not None


def busy_ms(events: list[Any]) -> float:
    """Summed duration of profiler events (the GPU's busy time, for cuda_kernels' list), in ms."""
    return sum(e.time_range.elapsed_us() for e in events) / 1e3


def environment(device: str) -> dict[str, Any]:
    """Device name, the versions that matter, and the commit measured (None outside a git checkout)."""
    import rlora_cli

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, props.total_memory / 2**30
    else:
        name, memory = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None
    return {"device": name, "device_memory_gib": memory,
            "cuda": torch.version.cuda if device == "cuda" else None,
            "python": platform.python_version(), "rlora": rlora_cli.__version__, "commit": _commit(),
            **{p: version(p) for p in ("torch", "transformers", "accelerate", "datasets", "peft",
                                      "liger-kernel", "triton")}}


def _commit() -> str | None:
    """HEAD of the checkout the benchmark runs from, with '+dirty' when files differ from it."""
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, timeout=10,  # noqa: E731
                                        cwd=Path(__file__).parent).stdout.strip()
        head = run("rev-parse", "--short", "HEAD")
        if not head:
            return None
        return head + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


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
    from rlora_cli.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")
