"""The full-step benchmark in --smoke mode: every variant runs, counts agree with PEFT and rlora,
ratios are over the anchor (the fastest PEFT variant), and the Liger bookkeeping (module-global
RoPE) holds with a stand-in."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.step_bench import (
    TARGETS,
    build_base,
    default_names,
    largest_fitting,
    main,
    parse_name,
)
from rlora_cli.adapters import AdapterConfig, inject_adapters, parameter_counts


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("step_bench") / "x.json"
    result = main(["--smoke", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert [r["variant"] for r in saved["results"]] == [r["variant"] for r in result["results"]]
    return saved


def test_variant_names_parse_into_flags():
    spec = parse_name("rlora+ce+bf16+compile")
    assert ((spec.kind, spec.liger, spec.ce, spec.fused_ce, spec.bf16, spec.compiled)
            == ("rlora", False, True, True, True, True))
    assert parse_name("peft-lora+liger").fused_ce and parse_name("peft-lora-r32").r == 32
    assert parse_name("peft-lora+ce+bf16+compile").bf16
    sized = parse_name("rlora+ce+bf16+compile+graphs+n8+r16")
    assert (sized.r, sized.num_heads, sized.graphs, sized.compiled) == (16, 8, True, True)
    assert (parse_name("peft-lora+r16").r, parse_name("peft-lora+r16").num_heads) == (16, 1)
    assert (parse_name("lora").r, parse_name("rlora").num_heads, parse_name("rlora").graphs) == (8, 4, False)
    for bad in ("rlora+liger+ce", "base+bf16", "rlora+fast", "qlora", "rlora+graphs", "peft-lora+n8",
                "base+r16", "rlora+r0"):
        with pytest.raises(SystemExit, match="unknown variant"):
            parse_name(bad)
    assert all(parse_name(n) for n in default_names(smoke=False, compiled=True))


def rows_by_variant(result):
    return {r["variant"]: r for r in result["results"]}


def test_every_variant_runs_with_finite_times_and_losses(smoke):
    rows = rows_by_variant(smoke)
    assert list(rows) == default_names(smoke=True, compiled=False)
    assert {"base", "peft-lora", "peft-lora-r32", "peft-lora+bf16", "lora", "multilora", "hydralora",
            "rlora", "reference"} == set(rows)
    for name, r in rows.items():
        assert r["ok"], (name, r.get("error"))
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and math.isfinite(r["max_ms"])
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] / 1e3))
        assert r["kernels"] > 0 and r["gpu_busy_ms"] > 0 and r["peak_gib"] is None  # CPU: no allocator peak
        assert abs(r["loss"] - math.log(512)) < 1.0  # random init: about ln(vocab)
    meta = smoke["meta"]
    assert meta["anchors"] == {"tiny 2x16": rows["peft-lora"]["anchor"]}
    assert meta["kernels_are"] == "leaf CPU ops"
    assert "--smoke" in meta["command"] and meta["environment"]["torch"] == torch.__version__


def test_rows_keep_their_busiest_kernels(smoke):
    for r in smoke["results"]:
        top = r["top_kernels"]
        assert 0 < len(top) <= 200 and all(k["calls"] >= 1 and k["ms"] >= 0 for k in top)
        assert sum(k["calls"] for k in top) == r["kernels"]  # every kernel, grouped by name
        assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
        assert sum(k["ms"] for k in top) <= r["gpu_busy_ms"] + 1e-3 * len(top)


def test_rank_and_heads_flags_size_the_adapters(tmp_path):
    names = "peft-lora,peft-lora+r16,rlora,rlora+n2+r16"
    result = main(["--smoke", "--variants", names, "--json", str(tmp_path / "x.json")])
    rows = {r["variant"]: r for r in result["results"]}
    assert rows["peft-lora+r16"]["trainable"] == 2 * rows["peft-lora"]["trainable"]
    model = inject_adapters(build_base("tiny", torch.device("cpu")), AdapterConfig(
        type="rlora", r=16, lora_alpha=32, lora_dropout=0.05, num_heads=2, target_modules=TARGETS))
    assert rows["rlora+n2+r16"]["trainable"] == parameter_counts(model)[0] != rows["rlora"]["trainable"]
    assert (rows["rlora+n2+r16"]["heads"], rows["rlora+n2+r16"]["r"]) == (2, 16)
    assert {r["anchor"] for r in rows.values()} == {"peft-lora"}  # the anchor is PEFT at r = 8 only


def test_trainable_counts_match_peft_and_rlora(smoke):
    from peft import LoraConfig, get_peft_model

    rows = rows_by_variant(smoke)
    assert rows["base"]["trainable"] == 0
    for name, r in (("peft-lora", 8), ("peft-lora-r32", 32)):
        peft_model = get_peft_model(build_base("tiny", torch.device("cpu")),
                                    LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                               target_modules=list(TARGETS)))
        assert rows[name]["trainable"] == peft_model.get_nb_trainable_parameters()[0]
    # tiny: 2 layers; r·(d_in + d_out) over q, k, v, o (64→64, 64→32, 64→32, 64→64) and the MLP (64↔128)
    assert rows["peft-lora"]["trainable"] == 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)
    for method in ("multilora", "rlora"):
        model = inject_adapters(build_base("tiny", torch.device("cpu")), AdapterConfig(
            type=method, r=8, lora_alpha=16, lora_dropout=0.05, num_heads=4, target_modules=TARGETS))
        assert rows[method]["trainable"] == parameter_counts(model)[0]
    assert rows["reference"]["trainable"] == rows["rlora"]["trainable"]  # same A, n B heads, router


def test_held_memory_is_the_base_plus_each_variants_own_tensors(smoke):
    rows = rows_by_variant(smoke)
    base = rows["base"]["held_gib"] * 2**30
    lora = rows["lora"]
    own = lora["held_gib"] * 2**30 - base
    # fp32 adapters + AdamW's two moments (+ a 4-byte step counter per tensor: 2 layers x 7 x (A, B))
    assert 12 * lora["trainable"] <= own <= 12 * lora["trainable"] + 4 * 28 + 1
    assert rows["rlora"]["held_gib"] > rows["hydralora"]["held_gib"]  # plus its A0/B0 buffers
    # PEFT with autocast_adapter_dtype=False: bf16 adapters and moments, half of fp32's 12 bytes each
    peft_own = rows["peft-lora"]["held_gib"] * 2**30 - base
    peft_bf16_own = rows["peft-lora+bf16"]["held_gib"] * 2**30 - base
    assert peft_bf16_own == pytest.approx(peft_own / 2, abs=4 * 28 + 1)


def test_ratios_are_over_the_fastest_peft_variant(smoke):
    rows = rows_by_variant(smoke)
    peft = [rows["peft-lora"], rows["peft-lora+bf16"]]  # r = 8; peft-lora-r32 is no candidate
    anchor = min(peft, key=lambda r: r["median_ms"])
    assert {r["anchor"] for r in rows.values()} == {anchor["variant"]}
    assert anchor["vs_anchor"]["step"] == 1.0 and anchor["vs_anchor"]["kernels"] == 1.0
    for r in rows.values():
        x = r["vs_anchor"]
        assert x["step"] == pytest.approx(r["median_ms"] / anchor["median_ms"])
        assert x["busy"] == pytest.approx(r["gpu_busy_ms"] / anchor["gpu_busy_ms"])
        assert x["kernels"] == pytest.approx(r["kernels"] / anchor["kernels"])
        assert x["peak"] is None
    assert rows["reference"]["kernels"] > rows["rlora"]["kernels"]  # the per-head Python loop


@pytest.mark.parametrize("limit,cap,expected", [(3, 4096, 0), (8, 4096, 8), (37, 4096, 37), (64, 4096, 64),
                                                 (1000, 50, 50)])
def test_largest_fitting_doubles_then_bisects(limit, cap, expected):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit
    assert largest_fitting(fits, 8, cap) == expected
    assert len(tried) <= 2 * math.log2(max(cap, 8)) + 2


def fake_liger(monkeypatch):
    """A stand-in for liger_kernel on the CPU doing what 0.8.5's instance patch does to globals:
    it rebinds the modeling file's apply_rotary_pos_emb and the RMSNorm/MLP classes."""
    from transformers.models.llama import modeling_llama as ml

    for key in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(ml, key, getattr(ml, key))  # undone after the test, whatever happens
    plain, calls = ml.apply_rotary_pos_emb, []

    def fake_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls.append(q.shape)
        return plain(q, k, cos, sin, unsqueeze_dim)

    def apply(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
              fused_linear_cross_entropy=False):
        assert model.config.model_type == "llama" and not (cross_entropy or fused_linear_cross_entropy)
        ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaMLP = fake_rope, object, object

    class FusedLinearCE(nn.Module):
        def __init__(self, reduction="mean"):
            super().__init__()

        def forward(self, weight, x, target):
            return F.cross_entropy((x @ weight.t()).float(), target, ignore_index=-100)

    module = types.ModuleType("liger_kernel.transformers")
    module._apply_liger_kernel_to_instance = apply
    module.LigerFusedLinearCrossEntropyLoss = FusedLinearCE
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    return ml, plain, calls


def test_liger_rope_is_set_per_variant_and_globals_restored(monkeypatch, tmp_path):
    ml, plain, calls = fake_liger(monkeypatch)
    classes = (ml.LlamaRMSNorm, ml.LlamaMLP)
    result = main(["--smoke", "--variants", "base,base+liger,lora+liger", "--json", str(tmp_path / "l.json")])
    rows = rows_by_variant(result)
    assert all(r["ok"] for r in rows.values()), rows
    # Only the two +liger variants ran Liger's RoPE: 2 warm-up + 2 timed + 1 profiled steps, 2 layers each.
    assert len(calls) == 2 * (2 + 2 + 1) * 2
    assert ml.apply_rotary_pos_emb is plain and (ml.LlamaRMSNorm, ml.LlamaMLP) == classes
    # The fused-loss path (hidden states and the head's weight) gives the logits path's loss.
    assert rows["base+liger"]["loss"] == pytest.approx(rows["base"]["loss"], rel=1e-3)
    assert (rows["lora+liger"]["trainable"]
            == rows["base+liger"]["trainable"] + 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192))


def test_gpu_annotations_are_not_counted_as_kernels():
    from types import SimpleNamespace

    from benchmarks.common import busy_ms, cuda_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, us, device=cuda, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 300),
              event("void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_bf16_64x128_tn_align2>(x)", 200),
              event("Optimizer.step#AdamW.step", 7000),  # the optimizer's range on the GPU timeline
              event("my_range", 5000, annotation=True), event("Memcpy DtoD", 50), event("aten::mm", 900, cpu)]
    kernels = cuda_kernels(SimpleNamespace(events=lambda: events))
    assert [e.name[:6] for e in kernels] == ["nvjet_", "void c"] and busy_ms(kernels) == 0.5


def test_cuda_graph_rows_measure_no_peak_and_the_peak_anchor_skips_them():
    from benchmarks.step_bench import add_ratios

    def row(variant, ms, peak):
        return {"shape": "s", "batch": "8x1024", "variant": variant, "ok": True, "median_ms": ms,
                "gpu_busy_ms": ms - 5, "kernels": 1000, "peak_gib": peak}

    rows = [row("peft-lora+ce+bf16+compile+graphs", 100.0, None),
            row("peft-lora+ce+bf16+compile", 110.0, 16.0),
            row("rlora+ce+bf16+compile", 99.0, 12.0), row("rlora+ce+bf16+compile+graphs", 90.0, None)]
    assert add_ratios(rows) == {"s 8x1024": "peft-lora+ce+bf16+compile+graphs"}
    rlora, graphs = rows[2], rows[3]
    assert rlora["anchor"] == "peft-lora+ce+bf16+compile+graphs"
    assert rlora["peak_anchor"] == "peft-lora+ce+bf16+compile"
    assert rlora["vs_anchor"]["step"] == pytest.approx(0.99)
    assert rlora["vs_anchor"]["peak"] == pytest.approx(0.75)
    assert graphs["vs_anchor"]["step"] == pytest.approx(0.90) and graphs["vs_anchor"]["peak"] is None
