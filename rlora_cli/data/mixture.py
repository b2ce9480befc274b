"""How many training examples each source contributes, which rows, and the mixture report.

Shares follow p_i ∝ w_i^(1/T): T = 1 keeps the recipe's weights, a larger T flattens them
toward uniform (T5's temperature mixing). Counts are the largest-remainder rounding of N·p_i,
capped by each source's max_samples (a capped source's surplus is not handed to the others, so
the report shows the shares that really result). Rows are drawn without replacement; a source
asked for more rows than it has is repeated whole k times plus a random remainder, so sampling
"with replacement" happens only when a source must be upsampled, and never unevenly.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlora_cli.files import atomic_write_text


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator that depends only on the seed and the names (stable across runs and machines)."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def target_shares(weights: list[float], temperature: float) -> list[float]:
    """p_i ∝ w_i^(1/T), for any finite w_i > 0 and T > 0: each weight is first divided by the
    largest, so the powers stay in [0, 1] (w^(1/T) itself overflows for, say, w = 10 and T = 0.001)."""
    top = max(weights)
    scaled = [(w / top) ** (1.0 / temperature) for w in weights]
    total = sum(scaled)
    return [s / total for s in scaled]


def plan_counts(available: list[int], weights: list[float], temperature: float,
                caps: list[int | None], total: int | None = None) -> list[int]:
    """Training examples per source: N·p_i rounded (largest remainder), then capped.
    N = `total`, else the sum of every source's available rows, each capped by its max_samples."""
    if total is None:
        total = sum(min(a, c) if c is not None else a for a, c in zip(available, caps))
    raw = [total * p for p in target_shares(weights, temperature)]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return [min(n, c) if c is not None else n for n, c in zip(counts, caps)]


def draw_indices(n_rows: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices out of `n_rows`: distinct while count <= n_rows, else whole copies."""
    copies, rest = divmod(count, n_rows)
    parts = [np.arange(n_rows)] * copies + [rng.permutation(n_rows)[:rest]]
    return np.concatenate(parts).astype(np.int64)


@dataclass(frozen=True)
class SourceMix:
    """One source's line of the mixture report."""

    name: str
    kind: str
    path: str
    weight: float
    target_share: float  # p_i before caps
    rows: int  # usable rows (after dropping empty ones)
    dropped: int  # rows dropped as empty
    val_rows: int  # held out
    train_rows: int  # available for training
    used: int  # training examples drawn per epoch (repeats counted)
    share_examples: float
    trained_tokens: int  # loss-bearing tokens over the drawn examples
    share_tokens: float
    truncated: int  # drawn examples longer than max_length (cut from the prompt side)


@dataclass(frozen=True)
class MixtureReport:
    """The planned mixture (OUT/mixture.json)."""

    seed: int
    temperature: float
    max_length: int
    packing: bool
    examples: int  # training examples per epoch
    rows: int  # training rows per epoch (fewer than examples when packed)
    trained_tokens: int
    sources: tuple[SourceMix, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"sources": [asdict(s) for s in self.sources]}


def make_report(lines: list[dict[str, Any]], **totals: Any) -> MixtureReport:
    """Fill in the shares of examples and trained tokens from each source's counts."""
    examples = sum(x["used"] for x in lines)
    tokens = sum(x["trained_tokens"] for x in lines)
    sources = tuple(SourceMix(**x, share_examples=x["used"] / max(examples, 1),
                              share_tokens=x["trained_tokens"] / max(tokens, 1)) for x in lines)
    return MixtureReport(examples=examples, trained_tokens=tokens, sources=sources, **totals)


def write_mixture(report: MixtureReport, path: str | Path) -> None:
    """Write the report as JSON, atomically (OUT/mixture.json)."""
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
