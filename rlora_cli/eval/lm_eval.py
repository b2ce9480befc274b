"""`rlora eval --backend lm-eval`: lm-evaluation-harness tasks on the loaded model (adapters
injected, or a merged folder), converted to rlora's results shape.

    rlora eval --backend lm-eval --task hellaswag,gsm8k --adapter runs/mixed/adapter --limit 100

lm-evaluation-harness is an optional extra (`pip install 'rlora[eval]'`), so it is imported only
here, and `require_lm_eval` is called before any model loads.
"""

from __future__ import annotations

import math
from typing import Any

from rlora_cli.errors import UserError

LM_EVAL_HINT = "install it with: pip install 'rlora[eval]' (lm-evaluation-harness with its hf backend)"


def require_lm_eval() -> Any:
    """The lm_eval module, with its hf backend; UserError with the install line when missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the hf backend is an extra)
    except ImportError as e:
        raise UserError(f"--backend lm-eval needs lm-evaluation-harness ({e})", LM_EVAL_HINT) from None
    return lm_eval


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, shots: int | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """lm-eval's raw results for the loaded model (adapters injected, or merged)."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit)
    except (KeyError, ValueError) as e:  # lm-eval's "Tasks not found: ..." and bad task options
        raise UserError(f"lm-eval: {e}", "check the task names with: lm-eval ls tasks") from None
    if raw is None:  # non-zero ranks of a distributed run
        raise UserError("lm-eval returned no results", "run it in a single process")
    return raw


def lm_eval_tasks(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's results as {task: {accuracy, n, <metric>: value}}; groups are left out (they are
    re-aggregated from their subtasks by `results.results_dict`)."""
    subtasks = raw.get("group_subtasks") or {}
    groups = set(raw.get("groups") or {}) | {g for g, subs in subtasks.items() if subs}
    n_samples = raw.get("n-samples") or {}
    out = {}
    for name, metrics in (raw.get("results") or {}).items():
        if name in groups:
            continue
        values = _metrics(metrics)
        accuracy = next((values[k] for k in _accuracy_keys(values) if k in values), None)
        count = n_samples.get(name, {})
        n = count.get("effective", count.get("original")) if isinstance(count, dict) else None
        out[name] = {"accuracy": accuracy, "n": n, **values}
    if not out:
        raise UserError("lm-eval returned no task results", "check the task names: lm-eval ls tasks")
    return out


def _metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numbers only, keyed `metric` for the unfiltered value and `metric,filter` otherwise."""
    values = {}
    for key, value in metrics.items():
        metric, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[metric if filt in ("", "none") else f"{metric},{filt}"] = value
    return values


def _accuracy_keys(values: dict[str, Any]) -> list[str]:
    """Which metric is the accuracy: acc, else exact match (strict before flexible), else acc_norm."""
    exact = sorted((k for k in values if k.startswith("exact_match")), key=lambda k: ("strict" not in k, k))
    return ["acc", *exact, "acc_norm", "mc2", "mc1"]
