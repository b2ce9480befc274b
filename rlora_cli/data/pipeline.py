"""From a recipe's sources to token rows: split, mix, tokenize with the prompt mask, pack.

    prepared = prepare(recipe, tokenizer, console)   # Prepared.train, .val, .val_examples, ...
    batch = collate(rows, tokenizer.pad_token_id, recipe.data.packing)

Per source (sources.py reads it): hold out val_size rows first (deterministic for the seed), draw
the training examples the mixture asks for (mixture.py), then tokenize only the drawn rows. Each
rendered segment (templates.py) is tokenized on its own and the ids concatenated, so the boundary
between untrained prompt (label -100) and trained response is token-exact; EOS follows the last
response so the model learns to stop. A text example longer than max_length becomes several
pieces (`encode_pieces`), every other kind one row. Every example keeps its source name as its task id.
Tokenization is a `Dataset.map` whose fingerprint covers the rows, the tokenizer and every
setting, so a changed recipe or tokenizer never reuses a stale cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import concatenate_datasets

from rlora_cli.config import KIND_FIELDS, DatasetConfig, Recipe
from rlora_cli.data.chat_templates import CHAT_TEMPLATES
from rlora_cli.data.mixture import (
    MixtureReport,
    draw_indices,
    make_report,
    plan_counts,
    rng_for,
    target_shares,
    write_mixture,
)
from rlora_cli.data.packing import IGNORE, collate, pack
from rlora_cli.data.sources import load_source
from rlora_cli.data.templates import TEMPLATES, Example, Template, render, template_info
from rlora_cli.errors import UserError
from rlora_cli.report.data import print_mixture

__all__ = ["Encoded", "Prepared", "collate", "encode", "encode_pieces", "load_splits", "prepare",
           "special_prefix", "split_indices", "tokenize_example", "write_mixture"]

# Bump when tokenization changes in a way the cache fingerprints cannot see (code they call).
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class Prepared:
    """Everything the trainer and evaluator need from the data."""

    train: Any
    """datasets.Dataset in training order: input_ids, labels, task_id, n_trained_tokens (packed:
    input_ids, labels, position_ids, task_ids per token, n_trained_tokens, n_examples)."""
    val: dict[str, Any]
    """Tokenized held-out rows per task (never packed), for the held-out loss."""
    val_examples: dict[str, list[Example]]
    """Raw held-out examples per task, which the evaluator scores."""
    tasks: list[str]
    """task id -> task name (the recipe's source order)."""
    mixture: MixtureReport
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    """kind -> template_info (the first source of each kind), saved with the adapter."""
    samples: dict[str, Example] = field(default_factory=dict)
    """The first training example of each task, for previews and logs."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


@dataclass(frozen=True)
class _Source:
    cfg: DatasetConfig
    task_id: int
    train: Any
    val: Any
    rows: int
    dropped: int
    words: list[str] | None


def prepare(recipe: Recipe, tokenizer: Any, console: Any = None, cache_dir: str | None = None) -> Prepared:
    """Load, split, mix and tokenize the recipe's data; print the mixture report to `console`
    (report/data.py renders it; none without a console)."""
    data = recipe.data
    sources = _load_sources(recipe, recipe.seed, cache_dir)
    weights = [s.cfg.weight for s in sources]
    counts = plan_counts([len(s.train) for s in sources], weights, data.temperature,
                         [s.cfg.max_samples for s in sources], data.num_samples)
    mixed = [_mix_source(s, count, share, tokenizer, recipe)
             for s, count, share in zip(sources, counts, target_shares(weights, data.temperature))]
    parts, lines = [part for part, _ in mixed if part is not None], [line for _, line in mixed]
    train = concatenate_datasets(parts)
    train = train.select(rng_for(recipe.seed, "order").permutation(len(train)))
    if data.packing:
        train = pack(train, data.max_length)
    report = make_report(lines, seed=recipe.seed, temperature=data.temperature, max_length=data.max_length,
                         packing=data.packing, rows=len(train))
    if console is not None:
        print_mixture(report, console)
    return Prepared(
        train=train,
        val={s.cfg.name: _tokenize(s.val, s, tokenizer, recipe).remove_columns(["truncated", "row"])
             for s in sources if len(s.val)},
        val_examples={s.cfg.name: to_examples(s.val, s) for s in sources if len(s.val)},
        tasks=[s.cfg.name for s in sources], mixture=report,
        templates=_templates(recipe),
        samples={s.cfg.name: to_examples(s.train.select([0]), s)[0] for s in sources})


def _mix_source(s: _Source, count: int, share: float, tokenizer: Any, recipe: Recipe) -> tuple[Any, dict]:
    """The source's `count` drawn training examples, tokenized (None for none), and its report line.
    Only distinct drawn rows are tokenized: a 400k-row source sampled down to 10k costs 10k encodes.
    An example is one token row, or several pieces for a long text: each drawn example brings all
    of its pieces, so the mixture's shares stay shares of examples."""
    if count == 0:
        return None, _line(s, share, 0, 0, 0)
    drawn = draw_indices(len(s.train), count, rng_for(recipe.seed, s.cfg.name, "draw"))
    unique, positions = np.unique(drawn, return_inverse=True)
    encoded = _tokenize(s.train.select(unique), s, tokenizer, recipe)
    pieces = _pieces_of(np.asarray(encoded["row"], dtype=np.int64), positions)
    trained = int(np.asarray(encoded["n_trained_tokens"], dtype=np.int64)[pieces].sum())
    truncated = int(np.asarray(encoded["truncated"], dtype=bool)[pieces].sum())
    rows = encoded.remove_columns(["truncated", "row"]).select(pieces)
    return rows, _line(s, share, count, trained, truncated)


def _pieces_of(row_of_piece: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices of the pieces of each of `rows`, in that order; a row's pieces are consecutive and
    `row_of_piece` (sorted) names each piece's row."""
    first = np.searchsorted(row_of_piece, rows, side="left")
    lengths = np.searchsorted(row_of_piece, rows, side="right") - first
    starts = np.repeat(first - np.cumsum(lengths) + lengths, lengths)
    return starts + np.arange(int(lengths.sum()))


def load_splits(recipe: Recipe, seed: int | None = None, cache_dir: str | None = None,
                with_train: bool = True) -> dict[str, tuple[list[Example], list[Example]]]:
    """(train, held-out) examples per task, exactly the rows `prepare` uses, without tokenizing.
    `with_train=False` leaves the training lists empty (an evaluator needs only the held-out
    rows, and turning a large hub split into Python objects takes a while)."""
    seed = recipe.seed if seed is None else seed
    return {s.cfg.name: (to_examples(s.train, s) if with_train else [], to_examples(s.val, s))
            for s in _load_sources(recipe, seed, cache_dir)}


def _load_sources(recipe: Recipe, seed: int, cache_dir: str | None) -> list[_Source]:
    out = []
    for i, cfg in enumerate(recipe.data.datasets):
        where = f"data.datasets[{i}]"
        rows, dropped, words = load_source(cfg, where, cache_dir)
        train_idx, val_idx = split_indices(len(rows), cfg.val_size, seed, cfg.name)
        if len(train_idx) == 0:
            raise UserError(f"{where}.val_size: holding out {cfg.val_size} leaves none of the "
                            f"{len(rows)} usable rows of {cfg.name} for training", "lower val_size")
        out.append(_Source(cfg, i, rows.select(train_idx), rows.select(val_idx), len(rows), dropped, words))
    return out


def split_indices(n: int, val_size: float | int, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices, each sorted: a fraction rounds to at least one row, an int
    is a count. Depends only on the seed and the task name."""
    if isinstance(val_size, int):
        n_val = min(val_size, n)
    else:
        n_val = max(1, round(val_size * n)) if val_size > 0 else 0
    order = rng_for(seed, name, "val").permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def to_examples(rows: Any, source: _Source) -> list[Example]:
    return [to_example(r, source.cfg.name, source.cfg.kind, source.words) for r in rows.to_list()]


def to_example(row: dict[str, Any], task: str, kind: str, words: list[str] | None = None) -> Example:
    """A normalized row (rows.normalize_row's schema) as an Example with only meaningful fields."""
    if kind == "instruction":
        fields = {k: row[k] for k in ("instruction", "output")}
        fields |= {"input": row["input"]} if row["input"] else {}
    elif kind == "nlu":
        fields = {"text": row["text"], "label": row["label"], "label_words": list(words or [])}
        fields |= {"text_pair": row["text_pair"]} if row["text_pair"] else {}
    elif kind == "knowledge":
        fields = {"question": row["question"], "answer": row["answer"]}
        if row["choices"]:
            fields |= {"choices": list(row["choices"]), "answer_index": int(row["answer_index"])}
        fields |= {k: row[k] for k in ("format", "targets") if row.get(k)}
    elif kind == "chat":
        fields = {"messages": [dict(m) for m in row["messages"]]}
    else:  # completion, text: the fields as they are
        fields = {k: row[k] for k in KIND_FIELDS[kind][0]}
    return Example(task, kind, fields)


def _tokenize(rows: Any, s: _Source, tokenizer: Any, recipe: Recipe) -> Any:
    """Token rows of `rows`, each with `row` (its example's index in `rows`): a long text's pieces
    share it, in order."""
    # The templates' text is in the fingerprint, so editing one invalidates the cache.
    version = [PIPELINE_VERSION, TEMPLATES[s.cfg.kind], CHAT_TEMPLATES.get(s.cfg.template)]
    kwargs = {"task": s.cfg.name, "task_id": s.task_id, "kind": s.cfg.kind, "template": s.cfg.template,
              "words": s.words, "tokenizer": tokenizer, "max_length": recipe.data.max_length,
              "train_on_prompt": recipe.data.train_on_prompt, "prefix": special_prefix(tokenizer),
              "version": version}
    return rows.map(_encode_rows, batched=True, with_indices=True, fn_kwargs=kwargs,
                    remove_columns=rows.column_names, desc=f"{s.cfg.name}: tokenizing")


def _encode_rows(batch: dict[str, list], indices: list[int], *, task: str, task_id: int, kind: str,
                 template: str, words: Any, tokenizer: Any, max_length: int, train_on_prompt: bool,
                 prefix: list[int], version: Any) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "task_id", "n_trained_tokens",
                                            "truncated", "row")}
    for index, values in zip(indices, zip(*batch.values())):
        example = to_example(dict(zip(batch, values)), task, kind, words)
        for e in encode_pieces(example, tokenizer, template=template, max_length=max_length,
                               train_on_prompt=train_on_prompt, prefix=prefix):
            out["input_ids"].append(e.input_ids)
            out["labels"].append(e.labels)
            out["n_trained_tokens"].append(sum(1 for x in e.labels if x != IGNORE))
            out["truncated"].append(e.truncated)
            out["task_id"].append(task_id)
            out["row"].append(index)
    return out


def tokenize_example(example: Example, tokenizer: Any, *, template: Template = "default",
                     max_length: int | None = None, train_on_prompt: bool = False) -> Encoded:
    """Render and encode one example the way training sees it (a long text: its first piece;
    `encode_pieces` gives them all)."""
    return encode_pieces(example, tokenizer, template=template, max_length=max_length,
                         train_on_prompt=train_on_prompt)[0]


def encode_pieces(example: Example, tokenizer: Any, *, template: Template = "default",
                  max_length: int | None = None, train_on_prompt: bool = False,
                  prefix: list[int] | None = None) -> list[Encoded]:
    """Every token row training makes of one example: `encode` of its rendered segments, except that
    a text longer than `max_length` is cut into pieces rather than truncated."""
    segments = render(example, tokenizer, template)
    if example.kind != "text":
        return [encode(segments, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt,
                       prefix=prefix)]
    whole = encode(segments, tokenizer, prefix=prefix)
    if max_length is None or len(whole.input_ids) <= max_length:
        return [whole]
    head = _head(segments, tokenizer, special_prefix(tokenizer) if prefix is None else prefix)
    return _cut(whole, len(head), max_length)


def _cut(whole: Encoded, n_head: int, max_length: int) -> list[Encoded]:
    """A long text's pieces, each at most max_length tokens. Pretraining text has no response to
    protect, and truncating it would silently drop the rest, so it is cut into consecutive
    windows instead. Each piece opens with the special prefix (BOS: the model always starts as it
    was trained to), and every piece after the first repeats the previous window's last token as
    untrained context, so each text token (and the EOS) is a target exactly once: the token that
    opens a window would otherwise have nothing before it to predict it from."""
    head_ids, ids, labels = whole.input_ids[:n_head], whole.input_ids[n_head:], whole.labels[n_head:]
    pieces, start = [], 0
    while start < len(ids):
        context = [] if start == 0 else [ids[start - 1]]
        stop = start + max(1, max_length - n_head - len(context))
        pieces.append(Encoded(head_ids + context + ids[start:stop],
                              [IGNORE] * (n_head + len(context)) + labels[start:stop], False))
        start = stop
    return pieces


def encode(segments: list[tuple[str, bool]], tokenizer: Any, *, max_length: int | None = None,
           train_on_prompt: bool = False, prefix: list[int] | None = None) -> Encoded:
    """Token ids and labels of rendered segments: each segment tokenized alone (a token never
    spans the prompt/response boundary), the tokenizer's BOS in front when it adds one, EOS after
    the last trained segment unless it already ends with it. Labels are -100 on untrained text and
    on the first token (nothing predicts it; in a packed row that keeps examples apart).
    `prefix` is `special_prefix(tokenizer)`, computed once by callers that encode many examples."""
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    head = _head(segments, tokenizer, prefix)
    ids, labels, last_start = list(head), [IGNORE] * len(head), len(head)
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            last_start = len(ids)
        ids += piece
        labels += piece if trained or train_on_prompt else [IGNORE] * len(piece)
    eos = tokenizer.eos_token_id
    last_trained = next((t for t, trained in reversed(segments) if trained), None)
    ends_with_eos = last_trained is not None and last_trained.rstrip().endswith(tokenizer.eos_token)
    if eos is not None and last_trained is not None and not ends_with_eos:
        ids.append(eos)
        labels.append(eos)
    if labels:
        labels[0] = IGNORE
    if max_length is None or len(ids) <= max_length:
        return Encoded(ids, labels, False)
    ids, labels = _truncate(ids, labels, max_length, len(head), last_start)
    labels[0] = IGNORE
    return Encoded(ids, labels, True)


def _head(segments: list[tuple[str, bool]], tokenizer: Any, prefix: list[int]) -> list[int]:
    """The ids in front of the segments: the special prefix, unless a chat template wrote the BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return [] if bos and segments and segments[0][0].startswith(bos) else list(prefix)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of every text (BOS for Llama, nothing for Qwen); the one
    definition that training (`encode`), scoring and generation all prepend, so a prompt is the
    same ids wherever it is tokenized.

    The probe is two words, "a b": the text's own ids are then a run of several ids, which an id
    the tokenizer adds cannot fake, and the probe holds a space, as every prompt does. The prefix
    is what comes before that run; ids after it are not a prefix (a tokenizer configured to also
    append EOS, e.g. Llama's add_eos_token, keeps its BOS here, and its EOS stays off prompts)."""
    plain = list(tokenizer("a b", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a b", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []  # the specials change how the text itself splits: prepend nothing rather than guess


def _truncate(ids: list[int], labels: list[int], max_length: int, head: int, start: int) -> tuple[list, list]:
    """Cut from the prompt side, keeping the special prefix and the whole last response; a
    response that cannot fit keeps its beginning after a quarter of the budget of prompt."""
    budget = max_length - head
    response = len(ids) - start
    if response <= budget:
        keep = budget - response
        cut = slice(start - keep, None)
    else:
        keep = min(start - head, budget // 4)
        cut = slice(start - keep, start - keep + budget)
    return ids[:head] + ids[cut], labels[:head] + labels[cut]


def _line(s: _Source, share: float, used: int, trained_tokens: int, truncated: int) -> dict[str, Any]:
    return {"name": s.cfg.name, "kind": s.cfg.kind, "path": s.cfg.path, "weight": s.cfg.weight,
            "target_share": share, "rows": s.rows, "dropped": s.dropped, "val_rows": len(s.val),
            "train_rows": len(s.train), "used": used, "trained_tokens": trained_tokens,
            "truncated": truncated}


def _templates(recipe: Recipe) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in recipe.data.datasets:
        out.setdefault(d.kind, template_info(d.kind, d.template))
    return out
