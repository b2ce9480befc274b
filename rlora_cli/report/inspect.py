"""`rlora inspect` rendered: a panel per run and per adapter from `runs.inspect_dir`'s dict, then
the adapter's model card (its README.md: the front matter as a grid, the Markdown rendered).

Every value prints literally (paths, module names go through `escape`; Markdown is not rich
markup); `--json` skips this and prints the dict itself.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.markdown import Markdown
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table


def render_inspect(info: dict[str, Any], console: Any) -> None:
    """A rich panel for a run folder (then its adapter's), or for an adapter folder alone."""
    if info["kind"] == "run":
        console.print(Panel(_grid(_run_rows(info)), title=escape(f"run {info['path']}"), expand=False))
        if info["adapter"] is None:
            return
        info = info["adapter"]
    console.print(Panel(_grid(_adapter_rows(info)), title=escape(f"adapter {info['path']}"), expand=False))
    if info.get("card"):
        render_card(info["card"], console)


def render_card(card: dict[str, Any], console: Any) -> None:
    """A model card ({path, front_matter, body} from runs.read_card) in a panel of its own."""
    front = card["front_matter"] or {}
    rows = [(key, ", ".join(map(str, value)) if isinstance(value, list) else value)
            for key, value in front.items()]
    parts = [_grid(rows), ""] if rows else []
    console.print(Panel(Group(*parts, Markdown(card["body"])), title=escape(f"model card {card['path']}")))


def _grid(rows: list[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    return table


def _run_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    m = info["metrics"]
    steps = [str(c["step"]) for c in info["checkpoints"]]
    return [("recipe", info["recipe"] or "-"),
            ("metrics", f"{m['rows']} rows, last step {m['last_step']}, last loss {m['last_loss']}"
             if m else "-"),
            ("checkpoints", ", ".join(steps) or "-"),
            ("final adapter", "yes" if info["final_adapter"] else "no (training unfinished?)")]


def _adapter_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    o = info["options"]
    why = info["not_mergeable_because"]
    router = (f" router={o['router']} init={o['init']} random_init={o['random_init']} "
              f"head_dropout={o['head_dropout']}" if o.get("router") else "")
    frozen = f" + {info['frozen_params']:,} frozen init factors" if info["frozen_params"] else ""
    merge = f"yes: PEFT LoRA of rank {info['peft_rank']}" if info["mergeable"] else f"no: {why}"
    hub_id = (f", hub id {info['base_model_hub_id']}"
              if info["base_model_hub_id"] not in (None, info["base_model"]) else "")
    return [
        ("method", info["method"]),
        ("options", f"r={o['r']} heads={o['num_heads']} alpha={o['lora_alpha']} scaling={info['scaling']:g} "
                    f"dropout={o['lora_dropout']} rslora={o['use_rslora']}" + router),
        ("targets", f"{info['targets']} → {info['num_modules']} modules ({', '.join(info['module_names'])})"),
        ("parameters", f"{info['trainable_params']:,} trainable{frozen} "
                       f"({', '.join(info['tensor_dtypes'])})"),
        ("base model", f"{info['base_model']} ({info['base_dtype']}){hub_id}"
                       + (", needs --trust-remote-code" if info["trust_remote_code"] else "")),
        ("merge/export", merge),
        ("tokenizer", "saved with the adapter" if info["tokenizer"] else "from the base model"),
        ("format", f"{info['format_version']} (rlora {info['rlora_version']})"),
    ]
