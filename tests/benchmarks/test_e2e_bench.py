"""The end-to-end benchmark's smoke mode (CPU, tiny shape), its FLOP accounting and its recipes."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import e2e
from benchmarks.shapes import config, matmul_parameters
from rlora_cli.recipe.load import load_recipe


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `python -m benchmarks.e2e --smoke` (two 3-step training subprocesses): (OUT, report)."""
    out = tmp_path_factory.mktemp("e2e")
    e2e.main(["--smoke", "--floor", "--out", str(out), "--json", str(out / "report.json")])
    return out, json.loads((out / "report.json").read_text())


def test_floor_is_the_frozen_base_on_full_rows_with_the_same_peak(smoke):
    _, report = smoke
    floors = [r["floor"] for r in report["results"]]
    assert floors[0] == floors[1]  # one floor per shape
    floor = floors[0]
    assert floor["variant"] == "base" and floor["batch"] == f"{e2e.MICRO_BATCH}x512"  # no Liger on the CPU
    assert floor["attention_context"] == pytest.approx(256.5)
    dense, attention = e2e.flops_per_token(config("tiny"), 256.5)
    assert floor["mfu"] == pytest.approx(
        (dense + attention) * floor["tokens_per_s"] / (report["peak_tflops"] * 1e12))
    for r in report["results"]:
        assert r["vs_floor_mfu"] == pytest.approx(r["mfu"] / floor["mfu"])
        assert r["vs_floor_tokens"] == pytest.approx(r["input_tokens_per_s"] / floor["tokens_per_s"])


def test_smoke_reports_both_packing_settings(smoke):
    _, report = smoke
    rows = {r["packing"]: r for r in report["results"]}
    assert set(rows) == {True, False} and all(r["shape"] == "tiny" for r in rows.values())
    assert report["peak_tflops"] > 0 and report["environment"]["torch"]
    for r in rows.values():
        assert math.isfinite(r["input_tokens_per_s"]) and r["input_tokens_per_s"] > 0
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0
        # No upper bound on mfu: on the CPU the smoke run's "peak" is a tiny timed matmul, not a real peak.
        assert math.isfinite(r["mfu"]) and 0 < r["mfu_4n"] < r["mfu"]
        # The replayed rows are the ones the run trained on: their label tokens equal the run's.
        assert r["replay_matches"]
        assert r["windows_used"] == 2 and r["peak_memory_gib"] > 0
        for w in r["windows"]:  # train.py's count and the replayed rows' agree
            assert w["input_tokens_per_s"] == pytest.approx(w["replayed_input_tokens_per_s"], rel=1e-9)
    # Unpacked: one example per row; packed: several, and more input tokens per step.
    assert rows[False]["examples_per_step"] == 8
    assert rows[True]["examples_per_step"] > 8
    assert rows[True]["input_tokens_per_step"] > rows[False]["input_tokens_per_step"]


def test_flops_per_token_by_hand(smoke):
    _, report = smoke
    # tiny: hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 512 (tied head).
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    n = 2 * per_layer + 512 * 64
    assert matmul_parameters(config("tiny")) == n
    for r in report["results"]:
        c = r["attention_context"]
        assert r["flops_4n"] == 4 * n
        assert r["flops_attention"] == pytest.approx(12 * 2 * 64 * c)
        assert r["mfu"] == pytest.approx((4 * n + 12 * 2 * 64 * c) * r["input_tokens_per_s"]
                                         / (report["peak_tflops"] * 1e12))
        assert 1 <= c <= report["max_length"]


def test_attention_context_of_a_packed_row():
    # Examples of 3 and 5 tokens packed: token i of an example attends to i + 1 tokens.
    assert e2e.example_lengths([0, 1, 2, 0, 1, 2, 3, 4]) == [3, 5]
    assert e2e.attention_context([3, 5]) == pytest.approx((1 + 2 + 3 + 1 + 2 + 3 + 4 + 5) / 8)
    assert e2e.attention_context([4]) == pytest.approx(2.5)  # an unpacked row of 4 (padding not counted)


def test_windows_take_logged_throughput_and_replay_it_as_a_check():
    # Window time = label tokens / tokens_per_s: 10/5 = 2 s, then 30/15 = 2 s.
    steps = [e2e.Step(100, 10, (100,)), e2e.Step(60, 10, (20, 40)), e2e.Step(200, 20, (200,))]
    rows = [{"step": 1, "loss": 1.0, "tokens": 10, "tokens_per_s": 5.0, "input_tokens_per_s": 49.0},
            {"step": 3, "loss": 1.0, "tokens": 40, "tokens_per_s": 15.0, "input_tokens_per_s": 131.0}]
    w = e2e.windows(rows, steps)
    assert [(x["first"], x["last"]) for x in w] == [(1, 1), (2, 3)]
    assert [x["seconds"] for x in w] == pytest.approx([2.0, 2.0])
    assert [x["input_tokens_per_s"] for x in w] == [49.0, 131.0]
    assert [x["replayed_input_tokens_per_s"] for x in w] == pytest.approx([50.0, 130.0])
    assert all(x["labels_match"] for x in w)


@pytest.mark.parametrize("shape", ["llama-1b", "qwen-0.5b"])
def test_shipped_recipes_load(smoke, shape):
    out, _ = smoke
    path = e2e.RECIPES[shape]
    data = out / "data" / "synthetic.jsonl"
    # The loader checks that local data files exist; the model folder is only read by train.
    recipe = load_recipe(path, [f"data.datasets.synthetic.path={data}"])
    assert recipe.model.name_or_path == f"runs/e2e/models/{shape}"  # the benchmark's default --out
    assert path.read_text().startswith("# python -m benchmarks.e2e")
    a, d, t = recipe.adapter, recipe.data, recipe.train
    assert (a.type, a.r, a.lora_alpha, a.lora_dropout, a.num_heads) == ("rlora", 8, 16.0, 0.05, 4)
    assert set(a.target_modules) == {f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    assert ((d.max_length, d.packing, d.datasets[0].kind, d.datasets[0].val_size)
            == (1024, True, "instruction", 0))
    assert ((t.micro_batch_size, t.gradient_accumulation_steps, t.precision, t.kernels)
            == (8, 1, "bf16", "auto"))
    assert recipe.output.save_steps == 0 and recipe.output.eval_steps == 0
    raw = path.read_text()
    assert "path: runs/e2e/data/synthetic.jsonl" in raw
    # The override the benchmark applies to every run loads too.
    model = out / "models" / "tiny"
    load_recipe(path, e2e.run_overrides(model, data, False, 3, 512, 1))


def test_model_folder_is_reused_and_has_the_tokenizer_ids(smoke):
    from transformers import AutoConfig, AutoTokenizer

    out, _ = smoke
    folder = out / "models" / "tiny"
    weights = next(folder.glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    e2e.write_model("tiny", folder, "cpu")
    assert weights.stat().st_mtime_ns == before  # same settings: kept, not rebuilt
    cfg, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert cfg.vocab_size == config("tiny").vocab_size and str(cfg.dtype).endswith("bfloat16")
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert max(tok.pad_token_id, tok.eos_token_id) < cfg.vocab_size


def test_max_steps_must_leave_logging_windows():
    with pytest.raises(SystemExit):
        e2e.parse(["--max-steps", "-1"])  # a recipe's -1 (epochs) would leave no windows to report
