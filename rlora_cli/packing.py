"""Packing several examples into one row, and batching rows into tensors.

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

from typing import Any

IGNORE = -100


def pack(dataset: Any, max_length: int, batch_size: int = 1000) -> Any:
    """Greedily fill rows of at most max_length tokens, in dataset order (the mixture is already
    shuffled); each block of `batch_size` examples is packed on its own, which keeps the step
    cached by datasets' fingerprints and bounded in memory."""
    return dataset.map(pack_batch, batched=True, batch_size=batch_size, remove_columns=dataset.column_names,
                       fn_kwargs={"max_length": max_length}, desc="packing")


def pack_batch(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Examples (input_ids, labels, task_id, n_trained_tokens) -> packed rows (input_ids, labels,
    position_ids, task_ids per token, n_trained_tokens, n_examples)."""
    rows: dict[str, list] = {k: [] for k in ("input_ids", "labels", "position_ids", "task_ids",
                                             "n_trained_tokens", "n_examples")}
    current: dict[str, Any] | None = None
    for ids, labels, task, n in zip(batch["input_ids"], batch["labels"], batch["task_id"],
                                    batch["n_trained_tokens"]):
        if current is None or len(current["input_ids"]) + len(ids) > max_length:
            _flush(rows, current)
            current = {k: [] for k in rows if k not in ("n_trained_tokens", "n_examples")}
            current |= {"n_trained_tokens": 0, "n_examples": 0}
        current["input_ids"] += ids
        current["labels"] += [IGNORE] + list(labels[1:])  # never predict across the boundary
        current["position_ids"] += range(len(ids))
        current["task_ids"] += [task] * len(ids)
        current["n_trained_tokens"] += n
        current["n_examples"] += 1
    _flush(rows, current)
    return rows


def _flush(rows: dict[str, list], current: dict[str, Any] | None) -> None:
    if current is not None:
        for key, value in current.items():
            rows[key].append(value)


def collate(rows: list[dict[str, Any]], pad_id: int, packing: bool,
            pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Pad a list of rows to the longest one (dynamic padding, on the right).

    Returns long tensors [B, T]: input_ids, labels (-100 on padding), task_ids (the task of each
    token, -1 on padding; per-task loss = labels != -100 grouped by task_ids, shifted like the
    labels), and attention_mask (unpacked) or position_ids (packed: no attention_mask, see the
    module docstring; padding continues as its own short sequence). Rows may be packed rows
    (task_ids, position_ids) or single examples (task_id)."""
    import torch

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
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
