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
from typing import Any

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_train",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--active", type=int, default=4, help="profiled steps at the end")
    ap.add_argument("--out", default="runs/profile")
    ap.add_argument("--syncs", action="store_true",
                    help="also count host<->GPU synchronisations in the profiled steps, by where they happen")
    args = ap.parse_args(argv)
    if not 0 < args.active < args.steps:
        ap.error("--active must be at least 1 and less than --steps (the first steps warm up)")
    cuda = torch.cuda.is_available()
    if args.syncs and not cuda:
        ap.error("--syncs needs a CUDA device")

    from torch.profiler import ProfilerActivity, profile

    import rlora_cli.training.loop as train_mod
    from benchmarks.common import busy_ms, cuda_kernels, write_json

    out = Path(args.out)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    marks: list[Any] = []  # when each step's optimizer update ended: CUDA events, or host clock times
    syncs: Counter[str] = Counter()
    step = torch.optim.AdamW.step

    def counted_step(self, *a, **k):  # the optimizer step closes a training step
        result = step(self, *a, **k)
        # An event, not a sync: the loop keeps the GPU fed across steps, which waiting here would hide.
        mark = torch.cuda.Event(enable_timing=True) if cuda else None
        n = len(marks) + 1
        # profile exactly the last --active steps
        starting, stopping = n == args.steps - args.active, n == args.steps
        if starting:  # the profiler's own start-up falls before the first profiled step's mark
            prof.start()
        marks.append(mark if cuda else time.perf_counter())
        if cuda:
            mark.record()
        if stopping:
            prof.stop()
        if args.syncs and (starting or stopping):
            torch.cuda.set_sync_debug_mode("warn" if starting else "default")
        return result

    show = warnings.showwarning

    def count_sync(message, *rest, **kw):
        if "synchroniz" in str(message):  # torch's sync debug mode
            syncs.update([_caller()])
        else:
            show(message, *rest, **kw)

    torch.optim.AdamW.step = counted_step
    try:
        with warnings.catch_warnings():
            if args.syncs:
                warnings.simplefilter("always")
                warnings.showwarning = count_sync
            train_mod.train(args.recipe, (*args.overrides, f"train.max_steps={args.steps}"),
                            output=out / "run", overwrite=True)
    finally:
        torch.optim.AdamW.step = step
        if args.syncs:
            torch.cuda.set_sync_debug_mode("default")
    if cuda:
        torch.cuda.synchronize()
        walls_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])][-args.active:]
    else:
        walls_ms = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])][-args.active:]
    kernels = cuda_kernels(prof)
    summary = {"wall_ms_per_step": [round(w, 1) for w in walls_ms],
               "gpu_busy_ms_per_step": round(busy_ms(kernels) / args.active, 1),
               "kernels_per_step": len(kernels) / args.active,
               "syncs_per_step": {k: v / args.active for k, v in syncs.most_common(25)}}
    print(json.dumps(summary, indent=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if cuda:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15,
                                        max_name_column_width=60))
    write_json(out / "summary.json", summary)
    prof.export_chrome_trace(str(out / "trace.json"))


def _caller() -> str:
    """The innermost frames of the code that asked for the sync (outside torch's own files)."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if "/torch/" not in f.filename and "warnings" not in f.filename]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])


if __name__ == "__main__":
    main()
