"""A run folder as its readers see it: the adapter it holds, its checkpoints, its metrics.

`rlora train` writes the folder (train/rundir.py); eval, generate, analyze, export and inspect
read it through these functions, so the folder's layout is spelled in two places only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlora_cli.checkpoint import CONFIG_FILE


def adapter_dir(path: str) -> str:
    """The adapter folder itself, or the adapter/ of a run folder (OUT of rlora train)."""
    p = Path(path)
    if not (p / CONFIG_FILE).exists() and (p / "adapter" / CONFIG_FILE).is_file():
        return str(p / "adapter")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short by a crash is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
