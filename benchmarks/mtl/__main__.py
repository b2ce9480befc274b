"""python -m benchmarks.mtl --tasks-dir DIR --methods lora,rlora,... --seeds 0,1,2 [--model PATH]
[--out DIR] [--smoke] [--fold] [--budgets 150,300,... [--warmup-steps 18]] [--shard i/k] [--collect]:
see benchmarks/mtl/__init__.py (and budgets.py for the learning curves)."""

from __future__ import annotations

import argparse
import os
import sys

from .plan import VARIANTS, Settings


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mtl", description=__doc__.split(":")[0])
    ap.add_argument("--tasks-dir", help="folder of BIG-bench task folders (task.json); optional with --smoke")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: every JSON task found)")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated, from: {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split, init, data order)")
    ap.add_argument("--model", default=d.model, help="base model folder or hub id")
    ap.add_argument("--out", default=None,
                    help="output folder (default runs/mtl, runs/mtl-smoke with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, two tiny tasks, a few steps")
    ap.add_argument("--overwrite", action="store_true", help="delete OUT first (default: keep finished runs)")
    ap.add_argument("--fold", action="store_true",
                    help="router variants: also score each task with the router fixed to its fold")
    ap.add_argument("--budgets", default="",
                    help="learning curves: comma-separated step budgets, each trained to (resuming from the "
                         "one before, constant learning rate) and scored at once (router variants also "
                         "folded); every run reaches one budget before any goes on; may grow between calls")
    ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                    help="learning curves: warm-up steps before the constant learning rate, the same "
                         "whatever the budgets")
    ap.add_argument("--shard", default="",
                    help="i/k: only every k-th (variant, seed) from the i-th, for k processes on one GPU; "
                         "no report (--collect writes it)")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: write OUT's report from the result files already there")
    ap.add_argument("--r", type=int, default=d.r, help="rank per head")
    ap.add_argument("--heads", type=int, default=d.num_heads, help="heads (multilora: parallel LoRAs)")
    ap.add_argument("--alpha", type=float, default=d.lora_alpha, help="lora_alpha (scaling = alpha / r)")
    ap.add_argument("--dropout", type=float, default=d.lora_dropout)
    ap.add_argument("--targets", default=",".join(d.target_modules), help="module names, or all-linear")
    ap.add_argument("--val-size", type=int, default=d.val_size,
                    help="held-out examples per task (≤ a quarter)")
    ap.add_argument("--max-train", type=int, default=d.max_train, help="training examples per task per epoch")
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument("--epochs", type=int, default=d.num_epochs)
    ap.add_argument("--max-steps", type=int, default=d.max_steps, help="-1 = --epochs over the mixture")
    ap.add_argument("--batch-size", type=int, default=d.micro_batch_size)
    ap.add_argument("--grad-accum", type=int, default=d.gradient_accumulation_steps)
    ap.add_argument("--lr", type=float, default=d.learning_rate)
    ap.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    from rlora_cli.errors import UserError

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    targets = split(args.targets)
    if not split(args.seeds) or not all(s.lstrip("-").isdigit() for s in split(args.seeds)):
        raise UserError(f"--seeds: {args.seeds!r} is not a list of integers", "write e.g. --seeds 0,1,2")
    budgets = split(args.budgets)
    if not all(b.isdigit() and int(b) > 0 for b in budgets):
        raise UserError(f"--budgets: {args.budgets!r} is not a list of positive step counts",
                        "write e.g. --budgets 150,300,600,1200")
    if args.warmup_steps < 0:
        raise UserError(f"--warmup-steps: must be >= 0, got {args.warmup_steps}",
                        "write e.g. --warmup-steps 18")
    if budgets and args.max_steps != -1:
        raise UserError("--max-steps and --budgets both set the number of steps",
                        "give --budgets alone: the run trains to the largest budget")
    return Settings(
        model=args.model, methods=split(args.methods) if args.methods else tuple(VARIANTS),
        seeds=tuple(int(s) for s in split(args.seeds)), tasks=split(args.tasks), r=args.r,
        num_heads=args.heads, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules="all-linear" if targets == ("all-linear",) else targets, val_size=args.val_size,
        max_train=args.max_train, max_length=args.max_length, num_epochs=args.epochs,
        max_steps=args.max_steps, micro_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        eval_batch_size=args.eval_batch_size, budgets=tuple(sorted({int(b) for b in budgets})),
        warmup_steps=args.warmup_steps)


def shard_from(text: str) -> tuple[int, int] | None:
    """--shard i/k as (i, k), 1 <= i <= k; None without --shard."""
    from rlora_cli.errors import UserError

    if not text:
        return None
    i, _, k = text.partition("/")
    if not (i.isdigit() and k.isdigit() and 1 <= int(i) <= int(k)):
        raise UserError(f"--shard: {text!r} is not i/k with 1 <= i <= k", "write e.g. --shard 3/12")
    return int(i), int(k)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU mode, set before torch initialises CUDA
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    from rlora_cli.errors import UserError

    from .run import collect, run_benchmark

    if args.smoke:
        import torch

        torch.set_num_threads(1)  # the tiny model gains nothing from threads, and loses a lot on busy cores
    out = args.out or ("runs/mtl-smoke" if args.smoke else "runs/mtl")
    try:
        if args.collect:
            collect(out, console=Console())
            return
        settings = settings_from(args)
        run_benchmark(args.tasks_dir, settings, out, smoke=args.smoke, methods_given=args.methods is not None,
                      overwrite=args.overwrite, fold=args.fold, shard=shard_from(args.shard))
    except UserError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
