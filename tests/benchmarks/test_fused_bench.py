"""The fused-path benchmark in --smoke mode: every row runs, the fused forward agrees with the eager
layer and the Triton GEMM with torch's, in float32.

    PYTHONPATH=<triton site> TRITON_INTERPRET=1 python -m pytest tests/benchmarks/test_fused_bench.py

Skipped without triton, or without the interpreter (the smoke run is CPU-only).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("triton")
fused = pytest.importorskip("rlora_cli.adapters.fused")
if fused.K is None or not fused.K.INTERPRETED:
    pytest.skip("the smoke run needs TRITON_INTERPRET=1", allow_module_level=True)

from benchmarks.fused_bench import IMPLS, METHODS, main  # noqa: E402


def test_smoke_runs_every_variant_and_the_fused_rows_match(tmp_path):
    path = tmp_path / "fused.json"
    returned = main(["--smoke", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["results"] == json.loads(json.dumps(returned["results"]))
    rows = saved["results"]
    expected = {("-", "base Linear")} | {(m, v) for m in METHODS for v in ("eager", "fused")}
    assert {(r["method"], r["variant"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and math.isfinite(r["max_ms"])
        if r["variant"] == "fused":
            assert r["forward_gap"] < 1e-5, r  # float32 throughout: the same math as the eager layer
    gemm = saved["gemm"]
    assert {(r["op"], r["impl"]) for r in gemm} == {(op, impl) for op in ("x·Wᵀ", "dy·W", "x·Wᵀ + Z·Bᵀ")
                                                    for impl in IMPLS[:3]} | {("x·Wᵀ + Z·Bᵀ", IMPLS[3])}
    assert all(r["gap"] < 1e-5 for r in gemm)
