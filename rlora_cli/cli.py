"""The `rlora` command line. Thin: each command parses, calls one importable function, and is
the only place that turns a UserError into a red line and an exit code.

Exit codes: 0 ok, 1 runtime failure, 2 usage/config/input error, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM; training saves a checkpoint first). Every bad input, ours or the
command line parser's, is one line on stderr: the problem and the fix.
Each command imports its module inside the command: those modules load torch and transformers,
and `rlora --help` should not wait for them. Everything else is imported at the top.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from rlora_cli import __version__
from rlora_cli.config import DTYPE_HELP
from rlora_cli.errors import UserError, first_line


class _FlagsAsFlags:
    """typer's rich help gives a flag a type column as if it took a value (`--overwrite <bool>`);
    an empty metavar leaves that column blank, for our flags and for --help."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsAsFlags, TyperCommand):
    pass


class _Group(_FlagsAsFlags, TyperGroup):
    pass


app = typer.Typer(
    name="rlora",
    help="Multi-task fine-tuning of causal LMs with multi-head low-rank adapters "
         "(R-LoRA, MultiLoRA, HydraLoRA, LoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
err = Console(stderr=True)
# The commands that load a base model share this flag; off unless the user says so.
TRUST_HELP = ("Run the base model's own code from its repository (needed when it was trained with "
              "model.trust_remote_code: true; only for repositories you trust).")
# merge and export fold a routed (hydralora/rlora) adapter per task with these.
FOLD_TASK = typer.Option(None, "--task", help="Routed adapters: fold the router for this task of the "
                         "run's recipe (its mean head mixture over the task's rows).")
FOLD_DATA = typer.Option(None, "--data", help="--task: measure the routing on this file's rows (the task's "
                         "source format) instead of the recipe's held-out or training rows.")
FOLD_RECIPE = typer.Option(None, "--recipe", help="--task: the recipe the adapter was trained from "
                           "(default: the run's recipe.yaml).")


def _version(value: bool) -> None:
    if value:
        print(f"rlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """rlora: train, evaluate, merge and export multi-head low-rank adapters."""


@app.command(cls=_Command)
def train(
    recipe: Path = typer.Argument(..., help="The recipe YAML (see recipes/)."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Dotted KEY=VALUE overrides, e.g. train.learning_rate=1e-4 adapter.r=16."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
        help="Run directory (default: the recipe's output.dir)."),
    resume: str = typer.Option("never", "--resume",
        help="never | auto (newest complete checkpoint in OUT) | a checkpoint folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a non-empty OUT and start over."),
    dry_run: bool = typer.Option(False, "--dry-run",
        help="Validate, load the data, show the mixture and one example per source; "
             "load no model weights."),
    print_config: bool = typer.Option(False, "--print-config",
        help="Print the fully resolved recipe (every key, defaults filled in) as YAML and exit; "
             "writes nothing."),
) -> None:
    """Train an adapter on a recipe's multi-task mixture (Ctrl-C or SIGTERM saves a checkpoint)."""
    flags = {"--overwrite": overwrite, "--dry-run": dry_run, "--print-config": print_config}
    _bad_override(overrides or [], flags)
    if print_config:
        _print_config(recipe, overrides or [], output)
        return
    if dry_run:
        from rlora_cli.training.preview import dry_run as preview

        preview(recipe, tuple(overrides or ()), Console())
        return
    from rlora_cli.training.loop import TrainingDiverged
    from rlora_cli.training.loop import train as run_training

    try:
        run_training(recipe, tuple(overrides or ()), output=output, resume=resume, overwrite=overwrite)
    except TrainingDiverged as e:
        err.print(f"[bold red]training stopped:[/] {escape(str(e))}; the last good checkpoint is kept "
                  "(lower train.learning_rate or check the data, then --resume auto)")
        raise typer.Exit(1)


eval_app = typer.Typer(help="Evaluate a model or an adapter; `rlora eval compare A.json B.json` "
                            "compares two results files.", pretty_exceptions_enable=False, cls=_Group)
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def eval_cmd(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, "--task",
        help="mmlu | bbh | recipe; with --backend lm-eval, lm-eval task names (comma-separated)."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Base model: hub id or local folder (a merged model too). "
                              "Default: the adapter's recorded base (or the recipe's model)."),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="Adapter folder (RUN/adapter, RUN/checkpoint-<step>) or a run folder."),
    data: Optional[str] = typer.Option(
        None, "--data", help="mmlu: folder with dev and test files (default: hub cais/mmlu); "
                             "bbh: a task.json, a BBH .json, or a folder of them."),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", help="--task recipe: the recipe whose held-out splits to score "
                               "(default: the run's recipe.yaml beside --adapter)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Few-shot examples (mmlu: 5, bbh: 0)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score at most N examples per subject / task."),
    subjects: Optional[str] = typer.Option(None, "--subjects",
        help="mmlu: only these subjects (comma-separated)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    backend: str = typer.Option(
        "rlora", "--backend", help="rlora | lm-eval (lm-evaluation-harness: install the eval extra)."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP + "."),
    output: Optional[str] = typer.Option(None, "--output", help="Write the results JSON here."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    compare_routed: bool = typer.Option(False, "--compare-routed", help="--task recipe, routed adapters: "
                                        "also score each task with the router fixed to its fold (= merged)."),
) -> None:
    """Score a model (+ adapter) on MMLU, BIG-bench tasks, the recipe's held-out tasks, or lm-eval."""
    if ctx.invoked_subcommand is not None:
        return
    if task is None:
        raise UserError("rlora eval needs --task",
                        "use --task mmlu|bbh|recipe, or: rlora eval compare A.json B.json")
    from rlora_cli.eval.run import evaluate

    evaluate(task, model=model, adapter=adapter, data=data, shots=shots, limit=limit,
             subjects=[s.strip() for s in subjects.split(",") if s.strip()] if subjects else None,
             recipe=recipe, batch_size=batch_size, backend=backend, dtype=dtype, output=output,
             trust_remote_code=trust_remote_code, compare_routed=compare_routed, console=Console())


@eval_app.command("compare", cls=_Command)
def eval_compare_cmd(
    a: str = typer.Argument(..., help="Results file A (the baseline)."),
    b: str = typer.Argument(..., help="Results file B (deltas are B - A)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Also write a PNG bar chart here."),
) -> None:
    """Per-task deltas between two `rlora eval --output` files."""
    from rlora_cli.eval.results import compare

    compare(a, b, plot=plot, console=Console())


@app.command("merge", cls=_Command)
def merge_cmd(
    adapter: Path = typer.Option(..., "--adapter",
        help="Adapter folder (RUN/adapter, RUN/checkpoint-<step>) or a run folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged Hugging Face model."),
    base: Optional[str] = typer.Option(None, "--base",
        help="Base model hub id or folder (default: the one recorded with the adapter)."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
        help="bf16 | fp16 | fp32 (default: the dtype the adapter was trained over)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    task: Optional[str] = FOLD_TASK, data: Optional[Path] = FOLD_DATA, recipe: Optional[Path] = FOLD_RECIPE,
) -> None:
    """Fold the adapter into its base model: a plain Hugging Face folder (no rlora needed to load it)."""
    kw = dict(base=base, dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size,
              trust_remote_code=trust_remote_code, console=err)
    if task is not None or data is not None or recipe is not None:
        from rlora_cli.fold import merge_task

        merge_task(adapter, output, task=task, data=data, recipe=recipe, **kw)
        return
    from rlora_cli.export import merge_to_folder

    merge_to_folder(adapter, output, **kw)


@app.command("export", cls=_Command)
def export_cmd(
    adapter: Path = typer.Option(..., "--adapter",
        help="Adapter folder (RUN/adapter, RUN/checkpoint-<step>) or a run folder."),
    format: str = typer.Option(..., "--format", "-f",
        help="peft (a PEFT LoRA adapter: vLLM, TGI, PEFT) | merged (same as rlora merge)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write."),
    base: Optional[str] = typer.Option(None, "--base",
        help="Base model hub id or folder (default: the one recorded with the adapter)."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
        help="--format merged only: bf16 | fp16 | fp32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size",
        help="--format merged only: largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    task: Optional[str] = FOLD_TASK,
    per_task: bool = typer.Option(False, "--per-task", help="Routed adapters, --format peft: one folded PEFT "
                                  "LoRA per task in OUTPUT/<task>/, OUTPUT/tasks.json, a vllm serve line."),
    data: Optional[Path] = FOLD_DATA, recipe: Optional[Path] = FOLD_RECIPE,
) -> None:
    """Export the adapter as a PEFT LoRA (prints its rank) or as a merged model."""
    kw = dict(format=format, base=base, dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size,
              trust_remote_code=trust_remote_code, console=err)
    if task is not None or per_task or data is not None or recipe is not None:
        from rlora_cli.fold import export_folded

        export_folded(adapter, output, task=task, per_task=per_task, data=data, recipe=recipe, **kw)
        return
    from rlora_cli.export import export_adapter

    export_adapter(adapter, output, **kw)


@app.command("inspect", cls=_Command)
def inspect_cmd(
    path: Path = typer.Argument(..., help="An adapter folder or a run folder (OUT of rlora train)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of a panel."),
) -> None:
    """What an adapter or a run folder holds: method, targets, sizes, base model, mergeability."""
    import json

    from rlora_cli.report.inspect import render_inspect
    from rlora_cli.runs import inspect_dir

    info = inspect_dir(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        render_inspect(info, Console())


@app.command("analyze", cls=_Command)
def analyze_cmd(
    adapter: Path = typer.Argument(...,
        help="Adapter folder (RUN/adapter, RUN/checkpoint-<step>) or a run folder."),
    other: Optional[Path] = typer.Argument(None,
        help="A second adapter to compare with; its analysis goes to OUT/analysis_2.json."),
    recipe: Optional[Path] = typer.Option(None, "--recipe",
        help="Measure router use per task on this recipe's held-out split (softmax routers only)."),
    output: Path = typer.Option(Path("analysis"), "--output", "-o",
        help="Folder for analysis.json and the PNG plots."),
    limit: Optional[int] = typer.Option(None, "--limit",
        help="--recipe: at most N held-out examples per task."),
    batch_size: int = typer.Option(8, "--batch-size", help="--recipe: examples per forward pass."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="--recipe: " + TRUST_HELP),
) -> None:
    """What an adapter learned: head similarity, ΔW spectra, router use per task (two adapters: compared)."""
    from rlora_cli.analyze import analyze

    analyze(adapter, other, recipe=recipe, output=output, limit=limit, batch_size=batch_size,
            trust_remote_code=trust_remote_code, console=Console())


@app.command("init", cls=_Command)
def init_cmd(
    output: Path = typer.Argument(..., help="The recipe to write (OUT.yaml); example data: OUT_data/."),
    method: str = typer.Option("rlora", "--method", help="lora | multilora | hydralora | rlora."),
    model: Optional[str] = typer.Option(None, "--model",
        help="Base model hub id or folder (default: HuggingFaceTB/SmolLM2-135M-Instruct)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT.yaml and OUT_data/."),
) -> None:
    """Write a commented starter recipe and a small example source of each data kind."""
    from rlora_cli.starter import write_starter

    written = write_starter(output, method=method, model=model, overwrite=overwrite)
    err.print(Text.assemble("wrote ", str(written), " and ", f"{written.stem}_data/",
                            "; train it: rlora train ", str(written)), highlight=False, soft_wrap=True)


@app.command("generate", cls=_Command)
def generate_cmd(
    prompt: Optional[str] = typer.Argument(None, help="The prompt (or --file for many)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
        help="Base model hub id or folder, or a merged model (default: the adapter's recorded base)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter",
        help="Adapter folder (RUN/adapter, RUN/checkpoint-<step>) or a run folder."),
    file: Optional[Path] = typer.Option(None, "--file", "-f",
        help='JSONL of {"prompt": str, "kind"?: str} lines.'),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
        help='JSONL to write: each input line plus "completion".'),
    kind: str = typer.Option("instruction", "--kind",
        help="instruction | knowledge | nlu | chat | completion | text | raw (no template); "
             "a line's own \"kind\" wins."),
    template: Optional[str] = typer.Option(None, "--template",
        help="default | chat | llama3 | qwen | mistral | gemma | alpaca (default: the one the adapter "
             "was trained with)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    batch_size: int = typer.Option(8, "--batch-size", help="--file: prompts per batch (left-padded)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP + "."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Try a model: base, base + adapter, or a merged folder, in the adapter's own prompt template."""
    from rlora_cli.generate import generate

    generate(prompt, model=model, adapter=str(adapter) if adapter else None, file=file, output=output,
             kind=kind, template=template, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, batch_size=batch_size, seed=seed, dtype=dtype,
             trust_remote_code=trust_remote_code, console=err)


def _bad_override(overrides: list[str], flags: dict[str, bool]) -> None:
    """Every extra argument must be KEY=VALUE. A true/false there most likely followed a flag the
    user gave a value (`--overwrite true`): the parser took the flag and left the value over."""
    bad = [o for o in overrides if "=" not in o]
    if not bad:
        return
    given = [name for name, on in flags.items() if on]
    if bad[0].lower() in _BOOL_WORDS and given:
        flag = given[0] if len(given) == 1 else " / ".join(given)
        raise UserError(f"{flag} takes no value (got {bad[0]!r} after it)",
                        f"write {given[0]} alone to turn it on, or leave it out")
    raise UserError(f"override {bad[0]!r} is not KEY=VALUE", "write e.g. train.learning_rate=1e-4")


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _print_config(recipe: Path, overrides: list[str], output: Optional[Path]) -> None:
    """The recipe as training would run it: every key, defaults and presets filled in, as YAML."""
    import yaml

    from rlora_cli.recipe.load import load_recipe, recipe_to_dict

    resolved = recipe_to_dict(load_recipe(recipe, tuple(overrides)))
    if output is not None:
        resolved["output"]["dir"] = str(output)  # --output wins over output.dir, as in training
    typer.echo(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), nl=False)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the app and maps errors to exit codes."""
    try:
        code = app(args=argv, prog_name="rlora", standalone_mode=False)  # the same name however launched
        if isinstance(code, int) and code:  # typer returns 130 for a Ctrl-C it caught itself
            sys.exit(code)
    except UserError as e:
        _error_line(e.message)  # a Text, never markup: paths and names print as they are
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
            if type(e).__name__ == "NoArgsIsHelpError" or not callable(getattr(e, "format_message", None)):
                e.show()  # `rlora` alone: the help
            else:
                _error_line(_usage_message(e))
            sys.exit(2)
        raise


def _error_line(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def _usage_message(e: Exception) -> str:
    """Click's usage error as our one line: its message, then where the usage is."""
    ctx = getattr(e, "ctx", None)
    where = getattr(ctx, "command_path", None) or "rlora"
    return f"{first_line(e.format_message())} — see {where} --help"  # type: ignore[attr-defined]
