"""Packing several examples into one row, and batching rows into tensors: `collate` for training
rows, `pad_batch` for the padded batches that scoring, generation and analysis build.

A packed row concatenates examples up to max_length with `position_ids` restarting at 0 for each
example. Given position_ids and no attention mask, transformers (5.x masking utils, sdpa and
eager) finds the example boundaries from the restarts and builds a block-diagonal causal mask,
so no token attends across examples; flash-attention uses the same position_ids for varlen.
That detection is skipped when the model holds a KV cache, so call the model with
`use_cache=False` (every training forward should). Labels stay aligned with input_ids (the model
shifts them); the first token of every example has label -100, so no example's first token is
predicted from the previous example's last.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

IGNORE = -100


def pack(dataset: Any, max_length: int, batch_size: int = 1000) -> Any:
    """Fill rows of at most max_length tokens, best fit within each block of `batch_size`
    examples (packed on its own, which keeps the step cached by datasets' fingerprints and
    bounded in memory). The training sampler shuffles the rows, so their order does not matter."""
    return dataset.map(pack_batch, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
                       fn_kwargs={"max_length": max_length}, desc="packing")


def pack_batch(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Examples (input_ids, labels, task_id, n_trained_tokens) -> packed rows (input_ids, labels,
    position_ids, task_ids per token, n_trained_tokens, n_examples).

    Best fit decreasing: longest examples first, each into the row whose free room fits it most
    tightly. Every padded token is computed and thrown away, and on mixed lengths this leaves the
    least padding of the simple rules (filling rows in sequence leaves the most, first fit in
    dataset order sits between)."""
    keys = ("input_ids", "labels", "position_ids", "task_ids", "n_trained_tokens", "n_examples")
    rows: dict[str, list] = {k: [] for k in keys}
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for e in sorted(range(len(batch["input_ids"])), key=lambda e: -len(batch["input_ids"][e])):
        ids = batch["input_ids"][e]
        at = bisect.bisect_left(free, (len(ids), -1))
        if at < len(free):
            room, i = free.pop(at)
        else:  # a new row (an example longer than max_length gets one to itself)
            room, i = max_length, len(rows["input_ids"])
            for k in keys:
                rows[k].append(0 if k.startswith("n_") else [])
        bisect.insort(free, (room - len(ids), i))
        rows["input_ids"][i] += ids
        rows["labels"][i] += [IGNORE] + list(batch["labels"][e][1:])  # never predict across the boundary
        rows["position_ids"][i] += range(len(ids))
        rows["task_ids"][i] += [batch["task_id"][e]] * len(ids)
        rows["n_trained_tokens"][i] += batch["n_trained_tokens"][e]
        rows["n_examples"][i] += 1
    return rows


def collate(rows: list[dict[str, Any]], pad_id: int, packing: bool,
            pad_to_multiple_of: int | None = None, cu_seq_lens: bool = False) -> dict[str, Any]:
    """Pad a list of rows to the longest one (dynamic padding, on the right).

    Returns long tensors [B, T]: input_ids, labels (-100 on padding), task_ids (the task of each
    token, -1 on padding; per-task loss = labels != -100 grouped by task_ids, shifted like the
    labels), and attention_mask (unpacked) or position_ids (packed: no attention_mask, see the
    module docstring; padding continues as its own short sequence). Rows may be packed rows
    (task_ids, position_ids) or single examples (task_id)."""
    longest = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, list] = {"input_ids": [], "labels": [], "task_ids": [],
                              "position_ids" if packing else "attention_mask": []}
    for r in rows:
        n = len(r["input_ids"])
        pad = longest - n
        batch["input_ids"].append(list(r["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(r["labels"]) + [IGNORE] * pad)
        tasks = r["task_ids"] if "task_ids" in r else [r["task_id"]] * n
        batch["task_ids"].append(list(tasks) + [-1] * pad)
        if packing:
            positions = r["position_ids"] if "position_ids" in r else range(n)
            batch["position_ids"].append(list(positions) + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * n + [0] * pad)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if cu_seq_lens:
        out["rlora_cu_seq_lens"] = segment_bounds(out.get("position_ids"), out["input_ids"].shape)
    return out


def pad_id(tokenizer: Any) -> int:
    """The id padding is written with: the tokenizer's pad token, else its EOS (padding is masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(sequences: list[list[int]], pad_id: int, *, side: str = "right",
              labels: list[list[int]] | None = None, ignore: int = IGNORE) -> dict[str, Any]:
    """Pad token lists to the longest one: long tensors [B, T] input_ids, attention_mask (1 on
    tokens, 0 on padding) and, when `labels` are given (one list per sequence, same lengths),
    labels with `ignore` on padding. Generation pads on the left, so every row's last token sits
    at the same column and new tokens follow it; scoring and training pad on the right."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    longest = max((len(s) for s in sequences), default=0)
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    if labels is not None:
        out["labels"] = []
    for i, seq in enumerate(sequences):
        pad = longest - len(seq)
        rows = {"input_ids": (list(seq), pad_id), "attention_mask": ([1] * len(seq), 0)}
        if labels is not None:
            rows["labels"] = (list(labels[i]), ignore)
        for key, (values, fill) in rows.items():
            out[key].append([fill] * pad + values if side == "left" else values + [fill] * pad)
    return {k: torch.tensor(v, dtype=torch.long).reshape(len(sequences), longest) for k, v in out.items()}


def segment_bounds(position_ids: Any, shape: tuple[int, int], bucket: int = 64) -> Any:
    """Where the causal segments of the flattened [B, T] rows start, and the total: int32 [N+1].

    Packed rows: a segment starts wherever the position ids restart at 0 (the padding tail is a
    segment of its own, whose tokens are unlabelled). Unpacked rows (no position ids) are one
    segment each, padding included: they are padded on the right, so causal attention never lets
    a real token see a pad. The list is padded with the total (empty segments) to a multiple of
    `bucket` entries, so a compiled model sees few distinct shapes."""
    rows, length = shape
    if position_ids is None:
        starts = torch.arange(0, rows * length, length)
    else:
        starts = torch.nonzero(position_ids.flatten() == 0).flatten()
    n = len(starts) + 1
    total = torch.full((-(-n // bucket) * bucket - len(starts),), rows * length)
    return torch.cat([starts, total]).to(torch.int32)
