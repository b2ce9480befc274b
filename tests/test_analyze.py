"""rlora analyze on the tiny model, checked against references computed here from the saved files:
head cosines from the safetensors tensors, singular values from the weights `merge` folds in,
router usage from a manual forward; then the files it writes and bad input."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import yaml
from conftest import perturb  # noqa: E402
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlora_cli.adapters import AdapterConfig, adapter_layers, inject_adapters, merge_adapters
from rlora_cli.analyze import analyze, analyze_adapter, effective_rank, top1_energy
from rlora_cli.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from rlora_cli.data.pipeline import load_splits, tokenize_example
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import load_recipe

METHODS = {
    "lora": dict(type="lora", num_heads=1),
    "multilora": dict(type="multilora"),
    "hydralora": dict(type="hydralora"),
    "hydralora-router-off": dict(type="hydralora", router="off"),
    "rlora": dict(type="rlora"),
    "rlora-router-off": dict(type="rlora", router="off"),
}
STATIC = ["lora", "multilora", "hydralora-router-off", "rlora-router-off"]
SV_TOL = 2e-4  # the merged weight minus the base carries float32 rounding of W0 + ΔW



@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """One perturbed adapter per method (r = 4, 3 heads, every linear), saved with rlora's saver."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, method in METHODS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        inject_adapters(model, AdapterConfig(r=4, lora_alpha=8, target_modules="all-linear", **method))
        perturb(model)
        out[name] = save_adapter(model, root / name)
    return out


def saved(directory):
    config = json.loads((directory / CONFIG_FILE).read_text())
    return config, load_file(str(directory / WEIGHTS_FILE))


def reference_cosine(vectors):
    v = torch.stack([x.double().flatten() for x in vectors])
    v = v / v.norm(dim=1, keepdim=True)
    return v @ v.t()


@pytest.mark.parametrize("name", ["multilora", "hydralora", "rlora", "rlora-router-off"])
def test_head_cosine_equals_reference_from_the_saved_tensors(adapters, name):
    config, tensors = saved(adapters[name])
    n, r, s = config["layer"]["num_heads"], config["layer"]["r"], config["layer"]["scaling"]
    result = analyze_adapter(adapters[name])
    assert result["method"] == config["method"] and list(result["modules"]) == config["modules"]
    for module in config["modules"]:
        A, B = tensors[f"{module}.rlora_A"].double(), tensors[f"{module}.rlora_B"].double()
        if name == "multilora":  # ΔW_i = s·g_i·B_i·A_i
            g = tensors[f"{module}.rlora_gate"].double()
            heads = [s * g[i] * B[:, i * r:(i + 1) * r] @ A[i * r:(i + 1) * r] for i in range(n)]
        else:  # the B heads
            heads = [B[:, i * r:(i + 1) * r] for i in range(n)]
        ref = reference_cosine(heads)
        got = torch.tensor(result["modules"][module]["head_cosine"], dtype=torch.float64)
        assert got.shape == (n, n)
        tol = 1e-6 if name == "multilora" else 1e-12  # multilora: static_factors folds s·g_i in float32
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
        off = ref[~torch.eye(n, dtype=torch.bool)].mean().item()
        assert result["modules"][module]["mean_offdiag_cosine"] == pytest.approx(off, abs=tol)


@pytest.mark.parametrize("name", STATIC)
def test_singular_values_are_those_of_the_delta_merge_folds_in(tiny_model_dir, adapters, name):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = copy.deepcopy(base)
    load_adapter(model, adapters[name])
    merge_adapters(model)
    merged, original = dict(model.named_parameters()), dict(base.named_parameters())
    result = analyze_adapter(adapters[name])
    for module, m in result["modules"].items():
        delta = merged[f"{module}.weight"] - original[f"{module}.weight"]
        ref = torch.linalg.svdvals(delta.float()).tolist()
        got = m["singular_values"]
        assert got == sorted(got, reverse=True) and all(x >= 0 for x in got)
        assert len(got) <= len(ref)
        assert got == pytest.approx(ref[:len(got)], abs=SV_TOL)
        assert max(ref[len(got):], default=0.0) < SV_TOL  # ΔW's rank is at most the factors' width
        p = [x / sum(got) for x in got]
        assert m["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p if x > 0)))
        assert m["top1_energy"] == pytest.approx(got[0] ** 2 / sum(x * x for x in got))
        assert ("head_singular_values" in m) == (name not in ("lora", "multilora"))
        assert ("gate_abs" in m) == (name == "multilora")


def test_multilora_gates_are_reported_as_saved(adapters, tmp_path, capsys):
    """|gᵢ| per module equals the saved gates, and the summary prints their mean per head."""
    from rich.console import Console

    config, tensors = saved(adapters["multilora"])
    a, _ = analyze(adapters["multilora"], output=tmp_path, console=Console(width=200))
    for module, m in a["modules"].items():
        assert m["gate_abs"] == tensors[f"{module}.rlora_gate"].double().abs().tolist()
    means = [sum(col) / len(col) for col in zip(*(m["gate_abs"] for m in a["modules"].values()))]
    assert " ".join(f"{g:.3g}" for g in means) in capsys.readouterr().out


@pytest.mark.parametrize("name", ["hydralora", "rlora"])
def test_softmax_router_spectra_are_the_uniform_router_and_each_head(adapters, name):
    """ΔW of the uniform router = the router-off layer's ΔW (s·B̄·A − s·B0·A0); head i alone =
    s·B_i·A − s·B0·A0, both from the saved tensors."""
    config, tensors = saved(adapters[name])
    n, r, s = config["layer"]["num_heads"], config["layer"]["r"], config["layer"]["scaling"]
    result = analyze_adapter(adapters[name])
    for module, m in result["modules"].items():
        A, B = tensors[f"{module}.rlora_A"].double(), tensors[f"{module}.rlora_B"].double()
        comp = (s * tensors[f"{module}.rlora_B0"].double() @ tensors[f"{module}.rlora_A0"].double()
                if name == "rlora" else 0.0)
        heads = [s * B[:, i * r:(i + 1) * r] @ A - comp for i in range(n)]
        mean = s * B.view(B.shape[0], n, r).mean(1) @ A - comp
        k = len(m["singular_values"])
        assert m["singular_values"] == pytest.approx(torch.linalg.svdvals(mean)[:k].tolist(), abs=1e-4)
        assert len(m["head_singular_values"]) == n
        for got, ref in zip(m["head_singular_values"], heads):
            assert got == pytest.approx(torch.linalg.svdvals(ref)[:len(got)].tolist(), abs=1e-4)


def test_zero_delta_gives_nulls_not_nans(tiny_model_dir, tmp_path):
    """An untrained MultiLoRA (gates 0): every head is zero, so cosines and ranks are null."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inject_adapters(model, AdapterConfig(type="multilora", r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "zero")
    m = next(iter(analyze_adapter(tmp_path / "zero")["modules"].values()))
    assert m["mean_offdiag_cosine"] is None and all(x is None for row in m["head_cosine"] for x in row)
    assert m["effective_rank"] is None and m["top1_energy"] is None and max(m["singular_values"]) == 0.0
    assert effective_rank([0.0, 0.0]) is None and top1_energy([0.0]) is None
    json.dumps(m, allow_nan=False)


# ------------------------------------------------------------------------------ router usage


def write_recipe(folder, model_dir):
    rng = random.Random(0)
    facts = [{"question": f"What color is the {t} number {i}?", "answer": rng.choice(["red", "blue"])}
             for i in range(4) for t in ("sky", "grass", "sun", "sea")]
    reviews = [{"text": f"The film was {rng.choice(['nice', 'awful', 'fine', 'dull'])}.", "label": i % 2}
               for i in range(16)]
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "adapter": {"type": "rlora", "r": 4, "num_heads": 3},
        "data": {"max_length": 64, "datasets": [
            {"name": "facts", "path": str(folder / "facts.jsonl"), "kind": "knowledge", "val_size": 5},
            {"name": "reviews", "path": str(folder / "reviews.jsonl"), "kind": "nlu",
             "label_words": ["bad", "good"], "val_size": 4, "template": "chat"}]},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@torch.no_grad()
def manual_usage(model_dir, adapter, recipe_path):
    """One example at a time: capture each adapted module's input, apply softmax(W_r·x) from the
    saved router tensor in float64, average over every token of the task."""
    from transformers import AutoTokenizer

    tensors = load_file(str(adapter / WEIGHTS_FILE))
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recipe = load_recipe(recipe_path)
    templates = {d.name: d.template for d in recipe.data.datasets}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in adapter_layers(model).items()]
    out = {}
    for task, (_, val) in load_splits(recipe, with_train=False).items():
        sums, tokens = {}, 0
        for ex in val:
            ids = tokenize_example(ex, tokenizer, template=templates[task], max_length=64).input_ids
            model(torch.tensor([ids]))
            tokens += len(ids)
            for name, x in inputs.items():
                w = torch.softmax(x[0].double() @ tensors[f"{name}.rlora_router"].double().t(), dim=-1)
                sums[name] = sums.get(name, 0) + w.sum(0)
        out[task] = {name: (s / tokens).tolist() for name, s in sums.items()}
    for h in hooks:
        h.remove()
    return out


def test_router_usage_rows_sum_to_one_and_match_a_manual_forward(tiny_model_dir, adapters, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    result, _ = analyze(adapters["rlora"], recipe=recipe, output=tmp_path / "out", batch_size=3)
    usage = result["router_usage"]
    ref = manual_usage(tiny_model_dir, adapters["rlora"], recipe)
    assert set(usage) == set(ref) == {"facts", "reviews"}
    for task, entry in usage.items():
        assert set(entry) == {"mean", "per_module"}
        assert list(entry["per_module"]) == list(ref[task])
        for module, row in entry["per_module"].items():
            assert sum(row) == pytest.approx(1.0, abs=1e-6)  # float32 softmax
            assert row == pytest.approx(ref[task][module], abs=1e-5)
        rows = list(entry["per_module"].values())
        assert entry["mean"] == pytest.approx([sum(c) / len(rows) for c in zip(*rows)], abs=1e-12)
        assert sum(entry["mean"]) == pytest.approx(1.0, abs=1e-6)
    # the router really routes: a uniform 1/3 everywhere would make this test prove little
    assert max(abs(x - 1 / 3) for e in usage.values() for row in e["per_module"].values() for x in row) > 0.01
    saved_json = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved_json["router_usage"] == json.loads(json.dumps(usage))
    assert (tmp_path / "out" / "router_usage.png").stat().st_size > 0


# ---------------------------------------------------------------------------- files and plots


def test_two_dirs_write_both_analyses_and_the_comparison_plots(adapters, tmp_path):
    run = tmp_path / "run"  # a run folder: analyze reads its adapter/
    run.mkdir()
    (run / "adapter").symlink_to(adapters["hydralora"], target_is_directory=True)
    first, second = analyze(adapters["rlora"], run, output=tmp_path / "out")
    out = tmp_path / "out"
    a, b = (json.loads((out / f).read_text()) for f in ("analysis.json", "analysis_2.json"))
    assert a == json.loads(json.dumps(first)) and b == json.loads(json.dumps(second))
    assert (a["method"], b["method"]) == ("rlora", "hydralora")
    assert set(a) == {"method", "modules"}  # router_usage only with --recipe
    m = next(iter(a["modules"].values()))
    assert set(m) == {"head_cosine", "mean_offdiag_cosine", "singular_values", "head_singular_values",
                      "effective_rank", "top1_energy"}
    for png in ("head_cosine.png", "head_similarity.png", "spectra.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "router_usage.png").exists()


def test_lora_against_multilora_plots_spectra(adapters, tmp_path):
    a, b = analyze(adapters["lora"], adapters["multilora"], output=tmp_path)
    m = next(iter(a["modules"].values()))
    assert m["head_cosine"] == [[pytest.approx(1.0)]] and m["mean_offdiag_cosine"] is None
    assert "head_singular_values" not in m and len(m["singular_values"]) == 4
    assert len(next(iter(b["modules"].values()))["singular_values"]) == 12  # rank n·r
    assert (tmp_path / "spectra.png").is_file() and (tmp_path / "head_similarity.png").is_file()


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["lora", "multilora", "rlora-router-off"])
def test_recipe_for_a_method_without_a_softmax_router_is_refused(adapters, tmp_path, name):
    with pytest.raises(UserError, match="no softmax router"):
        analyze(adapters[name], recipe=tmp_path / "never-read.yaml", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path, adapters):
    with pytest.raises(UserError, match="not an rlora adapter"):
        analyze(tmp_path, output=tmp_path / "out")
    with pytest.raises(UserError, match="no such adapter directory"):
        analyze(tmp_path / "missing", output=tmp_path / "out")
    with pytest.raises(UserError, match="not an rlora adapter"):
        analyze(adapters["rlora"], tmp_path, output=tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((adapters["lora"] / CONFIG_FILE).read_text())
    (broken / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read the adapter weights"):
        analyze_adapter(broken)


def test_output_that_is_a_file_is_refused_before_any_work(adapters, tmp_path, monkeypatch):
    import rlora_cli.analyze as an

    monkeypatch.setattr(an, "analyze_adapter",
                        lambda *a, **k: pytest.fail("analysed before checking --output"))
    (tmp_path / "report.txt").write_text("keep")
    with pytest.raises(UserError, match="--output .*report.txt exists and is a file, not a folder"):
        analyze(adapters["lora"], output=tmp_path / "report.txt")
    with pytest.raises(UserError, match="report.txt is a file, not a folder"):
        analyze(adapters["lora"], output=tmp_path / "report.txt" / "sub")
    assert (tmp_path / "report.txt").read_text() == "keep"


def test_non_finite_adapter_is_refused_naming_the_tensor(adapters, tmp_path):
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "nan"
    shutil.copytree(adapters["rlora"], d)
    tensors = load_file(str(d / WEIGHTS_FILE))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(d / WEIGHTS_FILE))
    with pytest.raises(UserError, match=f"tensor {name} holds NaN or infinite values"):
        analyze(d, output=tmp_path / "out")
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_router_usage_of_a_custom_code_base_needs_the_flag(adapters, tiny_model_dir, tmp_path):
    import shutil

    d = tmp_path / "remote"
    shutil.copytree(adapters["rlora"], d)
    config = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**config, "trust_remote_code": True}))
    recipe = write_recipe(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match="runs its own code") as e:
        analyze(d, recipe=recipe, output=tmp_path / "out", limit=1)
    assert "--trust-remote-code" in e.value.fix
    analyze(d, output=tmp_path / "tensors-only")  # reading the adapter files runs no code: no flag needed
    first, _ = analyze(d, recipe=recipe, output=tmp_path / "out", limit=1, trust_remote_code=True)
    assert set(first["router_usage"]) == {"facts", "reviews"}
