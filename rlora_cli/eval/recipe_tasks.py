"""`rlora eval --task recipe`: score each task of a recipe on its held-out split.

    rlora eval --task recipe --recipe recipes/mixed.yaml --adapter runs/mixed/adapter

The held-out rows are those `data.load_splits` sets aside (`val_size`, the recipe's seed), so an
adapter is scored on exactly what it never trained on. Per example, by what it is:
- nlu, and knowledge with choices: the candidate response (`templates.choices`) with the highest
  summed log-likelihood after the prompt; accuracy.
- knowledge without choices: greedy generation until a newline (64 tokens at most), stripped;
  exact match against the answer (or any BIG-bench target), and SQuAD-style token F1.
- instruction and chat: loss (mean negative log-likelihood per trained token, tokenized exactly
  as training does with `data.tokenize_example`) and perplexity = exp(loss).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

from rlora_cli.data.pipeline import load_splits, tokenize_example
from rlora_cli.data.templates import choices, gold_index, prompt_and_response, prompt_text
from rlora_cli.eval.scoring import decode, label_losses, loglikelihoods, task_record
from rlora_cli.recipe.load import load_recipe
from rlora_cli.report.eval import progress


def prepare_recipe(recipe_path: str, limit: int | None) -> dict[str, Any]:
    """The recipe and its held-out examples per task (at most `limit` each), before any model loads."""
    recipe = load_recipe(recipe_path)
    held_out = {task: val[:limit] for task, (_, val) in load_splits(recipe, with_train=False).items()}
    return {"recipe": recipe, "val": held_out, "model": recipe.model.name_or_path}


def run_recipe(model: Any, tokenizer: Any, prepared: dict[str, Any], *, batch_size: int = 8,
               console: Any = None) -> dict[str, dict[str, Any]]:
    """{task: {accuracy, n, kind, ...}} with f1 for free-form knowledge and loss/perplexity for
    instruction and chat; a task without held-out rows reports n = 0."""
    recipe = prepared["recipe"]
    template = {d.name: d.template for d in recipe.data.datasets}
    mc, gen, loss = [], [], []  # (task, example[, prompt, candidates])
    for task, examples in prepared["val"].items():
        for ex in examples:
            if ex.kind in ("instruction", "chat"):
                loss.append((task, ex))
            elif (cands := choices(ex, tokenizer, template[task])) is not None:
                mc.append((task, ex, prompt_and_response(ex, tokenizer, template[task])[0], cands))
            else:
                gen.append((task, ex))
    with progress(console, len(mc) + len(gen) + len(loss), "held-out tasks") as advance:
        mc_scores = loglikelihoods(model, tokenizer, [(prompt, cands) for _, _, prompt, cands in mc],
                                   batch_size=batch_size, progress=advance)
        texts = decode(model, tokenizer, [prompt_text(ex, tokenizer, template[t]) for t, ex in gen],
                       until_newline=True, batch_size=batch_size, progress=advance)
        encoded = [tokenize_example(ex, tokenizer, template=template[t], max_length=recipe.data.max_length,
                                    train_on_prompt=recipe.data.train_on_prompt) for t, ex in loss]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        losses = label_losses(model, [(e.input_ids, e.labels) for e in encoded], pad_id=pad,
                              batch_size=batch_size, progress=advance)

    correct: dict[str, list[bool]] = {t: [] for t in prepared["val"]}
    f1: dict[str, list[float]] = {}
    for (task, ex, _, _), cand in zip(mc, mc_scores):
        best = max(range(len(cand)), key=lambda i: (cand[i].logprob, -i))
        correct[task].append(best == gold_index(ex))
    for (task, ex), text in zip(gen, texts):
        targets = ex.fields.get("targets") or [ex.fields["answer"]]
        correct[task].append(exact_match(text, targets))
        f1.setdefault(task, []).append(max(token_f1(text, t) for t in targets))
    nll: dict[str, list[float]] = {}
    for (task, _), score in zip(loss, losses):
        sums = nll.setdefault(task, [0.0, 0])
        sums[0] -= score.logprob
        sums[1] += score.n_tokens
    return {task: _record(prepared["val"][task], correct[task], f1.get(task), nll.get(task))
            for task in prepared["val"]}


def _record(examples: list, correct: list[bool], f1: list[float] | None,
            nll: list[float] | None) -> dict[str, Any]:
    kind = examples[0].kind if examples else None
    rec = task_record(correct, kind=kind)
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
