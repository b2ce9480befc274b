"""The `rlora` command line. Thin: each command parses, calls one importable function, and is
the only place that turns a UserError into a red line and an exit code.

Exit codes: 0 ok, 1 runtime failure, 2 usage/config/input error, 130 interrupted.
Heavy libraries (torch, transformers) are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from rlora_cli import __version__
from rlora_cli.errors import UserError

app = typer.Typer(
    name="rlora",
    help="Multi-task fine-tuning of causal LMs with multi-head low-rank adapters "
         "(R-LoRA, MultiLoRA, HydraLoRA, LoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"rlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """rlora: train, evaluate, merge and export multi-head low-rank adapters."""


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the app and maps errors to exit codes."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("[yellow]aborted[/]")
        sys.exit(130)
    except Exception as e:
        # Click's usage errors (bad option, missing argument) arrive here in non-standalone mode;
        # typer may vendor click, so recognise them by what they offer rather than by import.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(2)
        raise
