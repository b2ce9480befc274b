"""Results files and `rlora eval compare`: lm-eval's output in rlora's shape, per-task deltas on
each task's own metric, a chart with every task of both files, names and paths printed literally."""

from __future__ import annotations

import json

import pytest
from evalkit import RESULT_KEYS, quiet, results_file

from rlora_cli.eval.lm_eval import lm_eval_tasks
from rlora_cli.eval.results import compare, results_dict
from rlora_cli.report.common import pyplot
from rlora_cli.report.eval import comparison_figure


def test_lm_eval_results_convert_to_the_results_shape():
    raw = {
        "results": {
            "mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01, "alias": "mmlu"},
            "mmlu_astronomy": {"alias": " - astronomy", "acc,none": 0.5, "acc_stderr,none": 0.04},
            "mmlu_virology": {"alias": " - virology", "acc,none": 0.25, "acc_stderr,none": 0.03},
            "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.35, "alias": "hellaswag"},
            "gsm8k": {"exact_match,flexible-extract": 0.2, "exact_match,strict-match": 0.1, "alias": "gsm8k",
                      "exact_match_stderr,strict-match": "N/A"},
        },
        "groups": {"mmlu": {"acc,none": 0.4}},
        "group_subtasks": {"mmlu": ["mmlu_astronomy", "mmlu_virology"], "hellaswag": [], "gsm8k": []},
        "n-samples": {"mmlu_astronomy": {"original": 152, "effective": 10},
                      "mmlu_virology": {"original": 166, "effective": 30},
                      "hellaswag": {"original": 10042, "effective": 10042},
                      "gsm8k": {"original": 1319, "effective": 20}},
    }
    tasks = lm_eval_tasks(raw)
    assert tasks["mmlu_astronomy"] == {"accuracy": 0.5, "n": 10, "acc": 0.5, "acc_stderr": 0.04}
    assert tasks["hellaswag"]["accuracy"] == 0.3 and tasks["hellaswag"]["acc_norm"] == 0.35
    assert tasks["gsm8k"]["accuracy"] == 0.1 and tasks["gsm8k"]["exact_match,flexible-extract"] == 0.2
    assert "mmlu" not in tasks
    results = results_dict("mmlu,hellaswag,gsm8k", "m", None, None, None, 1.0, tasks)
    assert set(results) == RESULT_KEYS and results["n"] == 10 + 30 + 10042 + 20
    assert results["mean_accuracy"] == pytest.approx((0.5 + 0.25 + 0.3 + 0.1) / 4)



def test_compare_deltas_and_plot(tmp_path):
    a = results_file(tmp_path / "a.json", {"snarks": 0.5, "physics": 0.25, "chat": None}, chat={"loss": 2.0})
    b = results_file(tmp_path / "b.json", {"snarks": 0.75, "physics": 0.125, "chat": None, "new": 1.0},
                     chat={"loss": 1.5})
    console = quiet()
    out = compare(a, b, plot=tmp_path / "plots" / "cmp.png", console=console)
    assert out["tasks"]["snarks"] == {"metric": "accuracy", "a": 0.5, "b": 0.75, "delta": 0.25}
    assert out["tasks"]["physics"]["delta"] == -0.125
    assert out["tasks"]["chat"] == {"metric": "loss", "a": 2.0, "b": 1.5, "delta": -0.5}
    assert out["tasks"]["new"] == {"metric": "accuracy", "a": None, "b": 1.0, "delta": None}
    assert out["mean_accuracy"]["delta"] == pytest.approx((0.75 + 0.125 + 1.0) / 3 - 0.375)
    assert (tmp_path / "plots" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "+0.2500" in console.file.getvalue()



def test_compare_chart_shows_every_task_loss_scored_ones_too(tmp_path):
    """The demo's textops is scored by held-out loss: the chart has a lower-is-better panel for it."""
    a = results_file(tmp_path / "a.json", {"reviews": 0.6, "quiz": 0.18, "textops": None, "chat": None},
                     textops={"loss": 3.93}, chat={"perplexity": 40.0})
    b = results_file(tmp_path / "b.json", {"reviews": 1.0, "quiz": 0.33, "textops": None, "chat": None,
                                           "only_in_b": 0.5},
                     textops={"loss": 0.62}, chat={"perplexity": 12.0})
    out = compare(a, b, plot=tmp_path / "cmp.png", console=quiet())
    fig = comparison_figure(out, "A", "B")
    try:
        ticks = {t.get_text().split(" (")[0] for ax in fig.axes for t in ax.get_xticklabels()}
        labels = " ".join(ax.get_ylabel() for ax in fig.axes)
    finally:
        pyplot().close(fig)
    tasks = set(json.loads(a.read_text())["tasks"]) | set(json.loads(b.read_text())["tasks"])
    assert tasks <= ticks and "overall" in ticks
    assert "lower is better" in labels and "higher is better" in labels
    loss_ax = next(ax for ax in fig.axes if "lower" in ax.get_ylabel())
    assert {t.get_text() for t in loss_ax.get_xticklabels()} == {"textops", "chat (perplexity)"}
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_task_names_and_paths_literally(tmp_path):
    folder = tmp_path / "runs[bold]"
    folder.mkdir()
    a = results_file(folder / "a[red].json", {"[bold]x[/]": 0.5, "t[/b]": 0.25})
    console = quiet()
    compare(a, a, console=console)
    text = console.file.getvalue()
    assert "[bold]x[/]" in text and "t[/b]" in text and "runs[bold]/a[red].json" in text
