"""`rlora eval --task recipe`: score each task of a recipe on its held-out split.

    rlora eval --task recipe --recipe recipes/mixed.yaml --adapter runs/mixed/adapter

The held-out rows are those `data.load_splits` sets aside (`val_size`, the recipe's seed), so an
adapter is scored on exactly what it never trained on. Per example, by what it is:
- nlu, and knowledge with choices: the candidate response (`templates.choices`) with the highest
  summed log-likelihood after the prompt; accuracy.
- knowledge without choices: greedy generation until a newline (64 tokens at most), stripped;
  exact match against the answer (or any BIG-bench target), and SQuAD-style token F1.
- instruction, chat and text: loss (mean negative log-likelihood per trained token, tokenized
  exactly as training does with `data.encode_pieces`: a long text's every piece) and
  perplexity = exp(loss).
- completion: both. Greedy generation of the completion until EOS (or the template's end of
  turn), stripped: exact match and token F1 against the reference; and its loss and perplexity.

With an adapter that saved a named chat format (`template_info`), its prompts use the saved text.
Each task's record also lists, in the held-out split's order, `correct` (1/0 per example; None
for a task without an accuracy) and `example_keys` (the first 12 hex digits of the sha1 of each
prompt), so two adapters' results on the same split can be compared example by example.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections import Counter
from typing import Any

from rlora_cli.checkpoint import read_adapter_config
from rlora_cli.data.packing import pad_id
from rlora_cli.data.pipeline import encode_pieces, load_splits
from rlora_cli.data.templates import (
    Example,
    Template,
    choices,
    gold_index,
    prompt_and_response,
    prompt_text,
    render,
    saved_template,
)
from rlora_cli.eval.scoring import decode, label_losses, loglikelihoods, task_record
from rlora_cli.recipe.load import load_recipe
from rlora_cli.report.eval import progress

# Completions are generated up to the longest reference's token count plus this slack: past the
# longest reference no generation can still match exactly, and the slack lets F1 see a near miss
# (a few extra words) while a model that never ends costs a bounded number of steps.
COMPLETION_SLACK = 16
LOSS_KINDS = ("instruction", "chat", "text", "completion")


def prepare_recipe(recipe_path: str, limit: int | None, adapter: str | None = None) -> dict[str, Any]:
    """The recipe, its held-out examples per task (at most `limit` each) and the template of each
    task, before any model loads. With `adapter`, a task whose named chat format the adapter saved
    renders with the saved text."""
    recipe = load_recipe(recipe_path)
    held_out = {task: val[:limit] for task, (_, val) in load_splits(recipe, with_train=False).items()}
    saved = (read_adapter_config(adapter).get("templates") or {}) if adapter else {}
    templates = {d.name: _template(d.kind, d.template, saved) for d in recipe.data.datasets}
    return {"recipe": recipe, "val": held_out, "model": recipe.model.name_or_path, "templates": templates}


def _template(kind: str, name: str, saved: Any) -> Template:
    info = saved.get(kind) if isinstance(saved, dict) else None
    return saved_template(info) if isinstance(info, dict) and info.get("template") == name else name


def run_recipe(model: Any, tokenizer: Any, prepared: dict[str, Any], *, batch_size: int = 8,
               console: Any = None) -> dict[str, dict[str, Any]]:
    """{task: {accuracy, n, kind, ...}} with f1 for free-form knowledge and completion, and
    loss/perplexity for instruction, chat, text and completion; a task without held-out rows
    reports n = 0."""
    recipe = prepared["recipe"]
    template = prepared.get("templates") or {d.name: d.template for d in recipe.data.datasets}
    # (task, index in the held-out split, example[, prompt, candidates]); loss kinds are scored below
    mc, gen, comp = [], [], []
    for task, examples in prepared["val"].items():
        for i, ex in enumerate(examples):
            if ex.kind == "completion":
                comp.append((task, i, ex))
            elif ex.kind in LOSS_KINDS:
                continue
            elif (cands := choices(ex, tokenizer, template[task])) is not None:
                mc.append((task, i, ex, prompt_and_response(ex, tokenizer, template[task])[0], cands))
            else:
                gen.append((task, i, ex))
    rows = _loss_rows(prepared["val"], tokenizer, template, recipe.data)
    with progress(console, len(mc) + len(gen) + len(comp) + len(rows), "held-out tasks") as advance:
        mc_scores = loglikelihoods(model, tokenizer, [(prompt, cands) for *_, prompt, cands in mc],
                                   batch_size=batch_size, progress=advance)
        texts = decode(model, tokenizer, [prompt_text(ex, tokenizer, template[t]) for t, _, ex in gen],
                       until_newline=True, batch_size=batch_size, progress=advance)
        completions = _complete(model, tokenizer, comp, template, batch_size, advance)
        pad = pad_id(tokenizer)
        losses = label_losses(model, [(e.input_ids, e.labels) for _, e in rows], pad_id=pad,
                              batch_size=batch_size, progress=advance)

    # Filled by position, so each list follows the held-out split's order whichever scorer ran.
    correct: dict[str, list[bool | None]] = {t: [None] * len(v) for t, v in prepared["val"].items()}
    f1: dict[str, list[float]] = {}
    for (task, i, ex, _, _), cand in zip(mc, mc_scores):
        best = max(range(len(cand)), key=lambda k: (cand[k].logprob, -k))
        correct[task][i] = best == gold_index(ex)
    answers = [(task, i, ex.fields.get("targets") or [ex.fields["answer"]]) for task, i, ex in gen]
    answers += [(task, i, [ex.fields["completion"]]) for task, i, ex in comp]
    for (task, i, targets), text in zip(answers, texts + completions):
        correct[task][i] = exact_match(text, targets)
        f1.setdefault(task, []).append(max(token_f1(text, t) for t in targets))
    nll: dict[str, list[float]] = {}
    for (task, _), score in zip(rows, losses):
        sums = nll.setdefault(task, [0.0, 0])
        sums[0] -= score.logprob
        sums[1] += score.n_tokens
    return {task: _record(examples, correct[task], f1.get(task), nll.get(task),
                          [example_key(prompt_text(ex, tokenizer, template[task])) for ex in examples])
            for task, examples in prepared["val"].items()}


def example_key(prompt: str) -> str:
    """A short stable name of a held-out example: the first 12 hex digits of its prompt's sha1."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def _loss_rows(val: dict[str, list], tokenizer: Any, template: dict[str, Template],
               data: Any) -> list[tuple[str, Any]]:
    """(task, token row) of every loss-scored example, tokenized exactly as training does: a long
    text is all of its pieces, so its whole text is scored."""
    return [(task, e) for task, examples in val.items() for ex in examples if ex.kind in LOSS_KINDS
            for e in encode_pieces(ex, tokenizer, template=template[task], max_length=data.max_length,
                                   train_on_prompt=data.train_on_prompt)]


def _complete(model: Any, tokenizer: Any, comp: list[tuple[str, int, Any]], template: dict[str, Template],
              batch_size: int, advance: Any) -> list[str]:
    """The greedy completion of each (task, index, completion example), in order: one decode per task,
    bounded by that task's longest reference (in tokens, as trained) plus COMPLETION_SLACK, and cut
    at the template's end of turn (a chat format's marker is text when the vocabulary lacks it)."""
    out: dict[int, str] = {}
    for task in dict.fromkeys(t for t, _, _ in comp):
        items = [(i, ex) for i, (t, _, ex) in enumerate(comp) if t == task]
        refs = [prompt_and_response(ex, tokenizer, template[task])[1] for _, ex in items]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
        texts = decode(model, tokenizer, [prompt_text(ex, tokenizer, template[task]) for _, ex in items],
                       max_new_tokens=longest + COMPLETION_SLACK, batch_size=batch_size, progress=advance)
        end = turn_end(tokenizer, template[task])
        out |= {i: text.split(end, 1)[0] if end else text for (i, _), text in zip(items, texts)}
    return [out[i] for i in range(len(comp))]


def turn_end(tokenizer: Any, template: Template) -> str:
    """The text a template writes after an assistant's reply (`<|im_end|>` for ChatML), stripped;
    '' for the default template, whose reply ends with EOS alone."""
    mark = "\u00a7"  # any character a template keeps as it is
    example = Example("end", "completion", {"prompt": "?", "completion": mark})
    reply = render(example, tokenizer, template)[-1][0]
    after = reply.split(mark, 1)[1] if mark in reply else ""
    eos = tokenizer.eos_token or ""
    return after.replace(eos, "").strip() if eos else after.strip()


def _record(examples: list, correct: list[bool | None], f1: list[float] | None,
            nll: list[float] | None, keys: list[str]) -> dict[str, Any]:
    kind = examples[0].kind if examples else None
    scored = [c for c in correct if c is not None]  # all of them, or none for the loss kinds
    rec = task_record(scored, kind=kind)
    rec["correct"] = [int(c) for c in scored] if scored else None
    rec["example_keys"] = keys
    if nll is not None:
        rec["n"] = len(examples)
        rec["loss"] = nll[0] / nll[1] if nll[1] else None
        rec["perplexity"] = math.exp(rec["loss"]) if rec["loss"] is not None and rec["loss"] < 700 else None
        rec["tokens"] = nll[1]
    if f1:
        rec["f1"] = sum(f1) / len(f1)
    return rec


def exact_match(text: str, targets: list[str]) -> bool:
    """The generation, stripped, equals one of the targets, stripped."""
    return text.strip() in {t.strip() for t in targets}


def _normalize(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, target: str) -> float:
    """SQuAD token F1 between a prediction and one target."""
    pred, gold = _normalize(prediction), _normalize(target)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
