"""The QLoRA benchmark in --smoke mode (tiny model, bitsandbytes' CPU backend): every variant runs,
the adapters are the same over the bf16 and the 4-bit base, PEFT's count is r·(d_in + d_out) per
module, and the targets are computed from the rows."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from benchmarks.qlora_bench import TARGETS, VARIANTS, main, targets  # noqa: E402
from benchmarks.shapes import config  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("qlora_bench") / "q.json"
    result = main(["--smoke", "--out", str(path), "--variants", ",".join(VARIANTS)])
    saved = json.loads(path.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    return saved


def test_every_variant_steps_with_finite_times_and_losses(smoke):
    rows = {r["variant"]: r for r in smoke["results"]}
    assert list(rows) == list(VARIANTS)
    for name, r in rows.items():
        assert r["ok"], (name, r.get("error"))
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and math.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] / 1e3))
        assert r["peak_gib"] is None and r["base_gib"] is None  # no allocator statistics on the CPU
    assert smoke["meta"]["quantization"] == {"bits": 4, "type": "nf4", "double_quant": True,
                                             "compute_dtype": "bf16"}


def test_same_adapters_over_both_bases_and_peft_counts_r_times_the_sides(smoke):
    rows = {r["variant"]: r for r in smoke["results"]}
    assert rows["rlora-nf4"]["trainable"] == rows["rlora-bf16"]["trainable"]
    cfg = config("tiny")
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * h // cfg.num_attention_heads
    sides = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q, k+v, o, gate+up, down
    expected = 8 * sides * cfg.num_hidden_layers
    assert rows["peft-qlora"]["trainable"] == rows["peft-bf16"]["trainable"] == expected


def test_targets_are_the_ratios_of_the_rows(smoke):
    rows = {r["variant"]: r for r in smoke["results"]}
    checks = {c["target"]: c for c in smoke["targets"]}
    assert len(checks) == len(TARGETS)
    for label, num, den, field, limit in TARGETS:
        c = checks[f"{label} <= {limit}"]
        if field == "peak_gib":  # no peak on the CPU
            assert c["ratio"] is None and c["met"] is None
            continue
        assert c["ratio"] == pytest.approx(rows[num][field] / rows[den][field])
        assert c["met"] == (c["ratio"] <= limit)
    assert targets([{"variant": "rlora-nf4", "ok": False}])[1]["ratio"] is None


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(tmp_path / "x.json"), "--variants", "rlora-int3"])
