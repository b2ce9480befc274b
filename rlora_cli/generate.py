"""`rlora generate`: try a model — base, base + adapter, or a merged folder — on your own prompts.

    rlora generate --adapter runs/mixed "Name three primary colors."          # streams the answer
    rlora generate --adapter runs/mixed --kind knowledge "What is the capital of France?"
    rlora generate --model merged/ --file prompts.jsonl --output answers.jsonl
    rlora generate --model HuggingFaceTB/SmolLM2-135M-Instruct --kind chat "Hi!" --temperature 0.7

The prompt is wrapped in the template the adapter was trained with for that data kind (saved
with the adapter under `templates`: the kind's default template, the tokenizer's chat template
when the recipe said `template: chat`, or a named chat format such as `template: llama3`, whose
saved text is used as it was at training); without an adapter, the kind's default template
(`--template chat` picks the tokenizer's chat template, `--template llama3` etc. a named format).
`--kind completion` and `--kind text` continue the prompt as written (a completion prompt goes
into a chat template when one applies); `--kind raw` sends the text as it is.
Decoding is greedy unless `--temperature` > 0, and stops at EOS (the tokenizer's and the
model's generation config's) or after `--max-new-tokens`. One prompt streams to the terminal;
a JSONL file of `{"prompt": str, "kind"?: str, ...}` lines is answered in left-padded batches
and written as the same objects plus `"completion"` (atomically).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlora_cli.checkpoint import read_adapter_config
from rlora_cli.config import canonical_dtype
from rlora_cli.data.templates import KINDS, TEMPLATE_NAMES, Example, Template, prompt_text, saved_template
from rlora_cli.data.textfiles import iter_jsonl
from rlora_cli.errors import UserError
from rlora_cli.eval.scoring import decode
from rlora_cli.files import atomic_write_text, check_output_file
from rlora_cli.model import load_with_adapter
from rlora_cli.report.eval import print_note, print_warnings, print_written, progress
from rlora_cli.runs import adapter_dir

GENERATE_KINDS = (*KINDS, "raw")


def generate(prompt: str | None = None, *, model: str | None = None, adapter: str | None = None,
             file: str | Path | None = None, output: str | Path | None = None, kind: str = "instruction",
             template: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 8, seed: int = 0, dtype: str = "auto",
             trust_remote_code: bool = False, stream: bool = True,
             console: Any = None) -> list[dict[str, Any]]:
    """Answer one prompt or every line of a JSONL file; returns the output rows (input + completion).

    Input and options are checked before any model loads; bad input is a UserError. With `stream`,
    one prompt's answer is printed to stdout as it comes; notes, warnings and progress go to
    `console` (none without one).
    """
    rows = _rows(prompt, file, kind)
    _check_options(max_new_tokens, temperature, top_p, batch_size, template)
    dtype = canonical_dtype(dtype, "--dtype")
    if output:
        check_output_file(output, "--output")
    adapter = adapter_dir(adapter) if adapter else None
    if not model and not adapter:
        raise UserError("nothing to generate with", "give --model ID_OR_PATH, --adapter DIR, or both")
    saved = _saved_templates(adapter)
    lm, tokenizer, info = load_with_adapter(model, adapter, dtype=dtype, trust_remote_code=trust_remote_code)
    print_warnings(info.warnings, console)
    prompts = [build_prompt(row, tokenizer, saved, template, default_kind=kind) for row in rows]
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if prompt is not None and stream:
        loaded = info.base + (f" + {adapter}" if adapter else "")
        print_note(f"{loaded}; kind {rows[0].get('kind', kind)}", console)
        completions = decode(lm, tokenizer, prompts, stream=True, **settings)
    else:
        with progress(console, len(prompts), "generating") as advance:
            completions = decode(lm, tokenizer, prompts, batch_size=batch_size, progress=advance, **settings)
    out = [{**row, "completion": text} for row, text in zip(rows, completions)]
    if output:
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        print_written(f"{len(out)} completion(s)", output, console)
    return out


# ------------------------------------------------------------------------------- the input


def _rows(prompt: str | None, file: str | Path | None, kind: str) -> list[dict[str, Any]]:
    """The input rows, each checked for a known kind (the row's own, else --kind)."""
    if (prompt is None) == (file is None):
        raise UserError("give a PROMPT or --file prompts.jsonl (one of them)",
                        'e.g. rlora generate --adapter RUN "Name three colors." or --file prompts.jsonl')
    if kind not in GENERATE_KINDS:
        raise UserError(f"--kind: unknown kind {kind!r}", f"use one of {', '.join(GENERATE_KINDS)}")
    rows = [{"prompt": prompt}] if prompt is not None else read_prompts(file)  # type: ignore[arg-type]
    where = (lambda i: f"{file}:{i + 1}") if file is not None else (lambda i: "PROMPT")
    for i, row in enumerate(rows):
        k = row.get("kind", kind)
        if k not in GENERATE_KINDS:
            raise UserError(f"{where(i)}: unknown kind {k!r}", f"use one of {', '.join(GENERATE_KINDS)}")
        if k == "nlu" and not row.get("label_words"):
            raise UserError(f"{where(i)}: kind nlu needs the label words",
                            'give them in a JSONL line: {"prompt": ..., "kind": "nlu", "label_words": [...]}')
    return rows


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a prompts file, each with a string `prompt`; UserError names the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompts file", 'give a JSONL file of {"prompt": "..."} lines')
    rows = []
    for lineno, row in iter_jsonl(path, fix='each line must be one JSON object: {"prompt": "..."}'):
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{lineno}: a line needs a string \"prompt\"",
                            'write {"prompt": "...", "kind": "instruction"} (kind is optional)')
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts in the file", 'write one {"prompt": "..."} object per line')
    return rows


def _check_options(max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
                   template: str | None) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})", "give 1 or more")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (got {temperature})",
                        "0 is greedy; 0.7 is a common choice")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {top_p})", "1 keeps every token")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})", "give 1 or more")
    if template is not None and template not in TEMPLATE_NAMES:
        raise UserError(f"--template: unknown template {template!r}",
                        f"use one of {', '.join(TEMPLATE_NAMES)}")


def _saved_templates(adapter: str | None) -> dict[str, dict[str, Any]]:
    """kind -> template_info saved with the adapter (empty without an adapter)."""
    if not adapter:
        return {}
    templates = read_adapter_config(adapter).get("templates") or {}
    return templates if isinstance(templates, dict) else {}


# ------------------------------------------------------------------------------ the prompt


def build_prompt(row: dict[str, Any], tokenizer: Any, saved: dict[str, dict[str, Any]] | None = None,
                 template: str | None = None, *, default_kind: str = "instruction") -> str:
    """The text the model continues: the row's prompt in the template of its kind.

    The template is `template` when given, else the one saved with the adapter for the kind,
    else the kind's default. Fields a kind can use besides the prompt: `input` (instruction),
    `choices` (knowledge), `label_words` (nlu, required), `text_pair` (nlu).
    """
    kind, text = row.get("kind", default_kind), row["prompt"]
    if kind == "raw":
        return text
    chosen = _template(kind, saved or {}, template)
    if kind == "instruction":
        fields = {"instruction": text, **({"input": row["input"]} if row.get("input") else {})}
    elif kind == "knowledge":
        fields = {"question": text, **({"choices": list(row["choices"])} if row.get("choices") else {})}
    elif kind == "nlu":
        fields = {"text": text, "label_words": list(row["label_words"]),
                  **({"text_pair": row["text_pair"]} if row.get("text_pair") else {})}
    elif kind in ("completion", "text"):
        fields = {"prompt" if kind == "completion" else "text": text}
    else:  # chat: the prompt is one user turn
        fields = {"messages": [{"role": "user", "content": text}]}
    return prompt_text(Example("generate", kind, fields), tokenizer, chosen)


def _template(kind: str, saved: dict[str, Any], override: str | None) -> Template:
    """`--template` when given, else the kind's saved template, else default; a named format the
    adapter saved renders with the saved text."""
    info = saved.get(kind)
    if isinstance(info, dict) and override in (None, info.get("template")):
        return saved_template(info)
    return override or "default"
