"""Where a training step's time goes: `rlora train` under torch.profiler.

    python -m benchmarks.profile_train RECIPE [KEY=VALUE ...] --steps 12 --out runs/profile

Runs the recipe for --steps steps (output under --out) with the profiler on for the last
--active steps, then prints the wall time per step, the GPU's busy time per step (sum of kernel
durations), kernels per step, and the top host and device operations; writes a Chrome trace.
A step whose wall time is far above its GPU busy time is bound by the host.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_train", description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--active", type=int, default=4, help="profiled steps at the end")
    ap.add_argument("--out", default="runs/profile")
    ap.add_argument("--syncs", action="store_true",
                    help="also count host<->GPU synchronisations in the profiled steps, by where they happen")
    args = ap.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    import rlora_cli.train as train_mod

    out = Path(args.out)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    marks: list[float] = []
    step = torch.optim.AdamW.step

    def counted_step(self, *a, **k):  # the optimizer step closes a training step
        result = step(self, *a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if len(marks) == args.steps - args.active:
            prof.start()
            if args.syncs:
                torch.cuda.set_sync_debug_mode("warn")
        return result

    torch.optim.AdamW.step = counted_step
    syncs: Counter[str] = Counter()
    if args.syncs:
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: syncs.update([_caller()])
    try:
        train_mod.train(args.recipe, (*args.overrides, f"train.max_steps={args.steps}"), output=out / "run",
                        overwrite=True)
    finally:
        torch.optim.AdamW.step = step
        if args.syncs:
            torch.cuda.set_sync_debug_mode("default")
        prof.stop()
    walls = [b - a for a, b in zip(marks, marks[1:])][-args.active:]
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.name.startswith(("Memcpy", "Memset"))]
    busy_ms = sum(e.device_time for e in events) / 1e3 / args.active
    summary = {"wall_ms_per_step": [round(w * 1e3, 1) for w in walls], "gpu_busy_ms_per_step": round(busy_ms, 1),
               "kernels_per_step": len(events) / args.active,
               "syncs_per_step": {k: v / args.active for k, v in syncs.most_common(25)}}
    print(json.dumps(summary, indent=1))
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    prof.export_chrome_trace(str(out / "trace.json"))


def _caller() -> str:
    """The innermost frames of the code that asked for the sync (outside torch's own files)."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "warnings" not in f.filename]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])


if __name__ == "__main__":
    main()
