"""rlora merge / export / inspect, checked by the real consumers.

Every method × router on/off: the merged folder loads with plain transformers and the PEFT export
loads with `peft.PeftModel`, both giving the adapter model's logits; softmax routers are refused
before anything loads or is written, the refusal naming --task (tests/test_fold.py folds them).
Then bf16, sharding, tied heads, Conv1D (GPT-2), the tokenizer, corrupt input, interrupted
writes, inspect, and (once wired) the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import perturb, run_cli  # noqa: E402
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora_cli.adapters import AdapterConfig, inject_adapters, parameter_counts
from rlora_cli.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from rlora_cli.errors import UserError
from rlora_cli.export import export_adapter, export_peft, merge_to_folder
from rlora_cli.report.inspect import render_inspect
from rlora_cli.runs import adapter_info, inspect_dir, read_safetensors_header

METHODS = [
    dict(type="lora", num_heads=1),
    dict(type="multilora"),
    dict(type="hydralora"),
    dict(type="hydralora", router="off"),
    dict(type="rlora"),
    dict(type="rlora", router="off"),
]
# Rank of the PEFT export (r = 4, n = 3): multilora n·r, R-LoRA's compensation adds r.
PEFT_RANK = {"lora": 4, "multilora": 12, "hydralora-router-off": 4, "rlora-router-off": 8}
IDS = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
FP32_TOL = 1e-5


def mid(m: dict) -> str:
    return m["type"] + ("-router-off" if m.get("router") == "off" else "")


def load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()



def make_adapter(base_dir, out, method, *, targets="all-linear", dtype=torch.float32, tokenizer=True,
                 scale=0.2):
    """Save a perturbed adapter; returns (adapter model in eval mode, its logits on IDS)."""
    model = load(base_dir, dtype)
    inject_adapters(model, AdapterConfig(r=4, lora_alpha=8, target_modules=targets, **method))
    perturb(model, scale)
    save_adapter(model, out, tokenizer=AutoTokenizer.from_pretrained(base_dir) if tokenizer else None)
    with torch.no_grad():
        return model, model(IDS).logits


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def nothing_written(out: Path) -> bool:
    """No output folder and no temporary sibling left behind."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module", params=METHODS, ids=mid)
def case(request, tiny_model_dir, tmp_path_factory):
    method = request.param
    d = tmp_path_factory.mktemp(mid(method)) / "adapter"
    model, ref = make_adapter(tiny_model_dir, d, method)
    base = logits(load(tiny_model_dir))
    assert maxdiff(ref, base) > 0.1, "the adapter must change the logits for the test to mean anything"
    return {"method": method, "id": mid(method), "dir": d, "ref": ref,
            "trainable": parameter_counts(model)[0], "mergeable": model.rlora_config.mergeable}


# ---------------------------------------------------------------- every method × router on/off


def test_merge_matches_adapter_or_refuses(case, tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    if not case["mergeable"]:
        with pytest.raises(UserError, match="softmax router") as e:
            merge_to_folder(case["dir"], out)
        assert "adapter.router=off" in e.value.fix and "--task NAME" in e.value.fix
        assert "--recipe" in e.value.fix  # no run folder around it: no recipe names the tasks
        assert nothing_written(out)
        return
    merge_to_folder(case["dir"], out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not [n for n in names if n.startswith("rlora_")]
    assert "library_name: transformers" in (out / "README.md").read_text()  # its model card
    merged = load(out)  # plain transformers, nothing of rlora
    diff = maxdiff(logits(merged), case["ref"])
    print(f"{case['id']}: merged fp32 max |Δlogit| = {diff:.2e}")
    assert diff <= FP32_TOL
    # Tied embeddings stay tied: one tensor, one key in the file.
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_peft_export_round_trip_or_refuses(case, tmp_path, tiny_model_dir):
    out = tmp_path / "peft"
    if not case["mergeable"]:
        with pytest.raises(UserError, match="softmax router"):
            export_peft(case["dir"], out)
        assert nothing_written(out)
        return
    from peft import PeftModel

    cfg = export_peft(case["dir"], out)
    rank = PEFT_RANK[case["id"]]
    written = json.loads((out / "adapter_config.json").read_text())
    assert written == cfg
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"]) == ("LORA", "CAUSAL_LM", rank)
    assert cfg["lora_alpha"] == pytest.approx(2.0 * rank)  # s = 8 / 4
    assert cfg["use_rslora"] is False and cfg["lora_dropout"] == 0 and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False and cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                     "v_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 14
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (rank, 176)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, rank)
    assert adapter_info(case["dir"])["peft_rank"] == rank  # inspect predicts what export writes
    assert "library_name: peft" in (out / "README.md").read_text()  # its model card
    peft_model = PeftModel.from_pretrained(load(tiny_model_dir), out).eval()  # untouched base
    diff = maxdiff(logits(peft_model), case["ref"])
    print(f"{case['id']}: PEFT rank {rank} max |Δlogit| = {diff:.2e}")
    assert diff <= FP32_TOL


def test_router_refusal_happens_before_any_load(case, tmp_path, monkeypatch):
    if case["mergeable"]:
        pytest.skip("only router adapters are refused")

    def boom(*a, **k):
        raise AssertionError("the base model was read before the refusal")

    monkeypatch.setattr("rlora_cli.export.load_model", boom)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", boom)
    for fmt in ("peft", "merged"):
        with pytest.raises(UserError, match="softmax router") as e:
            export_adapter(case["dir"], tmp_path / fmt, format=fmt)
        assert nothing_written(tmp_path / fmt)
        assert ("--per-task" in e.value.fix) is (fmt == "peft")


def test_inspect_adapter_fields(case):
    info = inspect_dir(case["dir"])
    assert info["kind"] == "adapter" and info["method"] == case["method"]["type"]
    assert info["num_modules"] == 14 and info["targets"] == "all-linear"
    assert info["trainable_params"] == case["trainable"]  # from the header alone
    assert info["mergeable"] is case["mergeable"]
    assert (info["not_mergeable_because"] is None) is case["mergeable"]
    assert info["peft_rank"] == PEFT_RANK.get(case["id"])
    r = 4
    linears = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 176), (64, 176), (176, 64)]  # (d_in, d_out)
    compensated = case["method"]["type"] == "rlora"  # R-LoRA saves A0 [r, d_in] and B0 [d_out, r]
    assert info["frozen_params"] == (2 * sum(r * (i + o) for i, o in linears) if compensated else 0)
    assert info["base_dtype"] == "float32" and info["tensor_dtypes"] == ["F32"]
    json.dumps(info)  # --json works


# ---------------------------------------------------------------- precision, layout, special models


def test_bf16_merge_rounds_once_and_is_as_close_to_fp32_as_the_bf16_adapter_model(tiny_model_dir, tmp_path):
    """Exact part: every merged weight is bf16(W0 + ΔW) computed in float32, rounded once.

    Logits part, the tolerance: bf16 keeps 8 significant bits (unit round-off 2^-9 ≈ 2e-3), and
    rounding W0 + ΔW once is the same kind of error as holding W0 in bf16 at all. So the merged
    model must be as close to the float32 truth as the bf16 adapter model users run: RMS error
    ≤ 1.25× that model's (measured ratios 0.9-1.05 over seeds and methods; the max over a few
    logits is too noisy a statistic for a ratio test), and ≤ 2% of the adapter's effect (RMS).
    """
    from rlora_cli.adapters import adapter_layers
    from rlora_cli.checkpoint import load_adapter

    ids = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(1))
    adapter_bf16, _ = make_adapter(tiny_model_dir, tmp_path / "adapter", dict(type="rlora", router="off"),
                                   dtype=torch.bfloat16, scale=0.05)  # ΔW about as large as W0
    truth_model = load_adapter(load(tiny_model_dir), tmp_path / "adapter")
    merge_to_folder(tmp_path / "adapter", tmp_path / "merged")  # default: the recorded bf16
    merged = load(tmp_path / "merged", dtype=None)
    assert merged.dtype == torch.bfloat16
    weights = dict(merged.named_parameters())
    for name, layer in adapter_layers(truth_model).items():
        expected = (layer.base.weight + layer.delta_weight()).to(torch.bfloat16)
        assert torch.equal(weights[name + ".weight"], expected), name

    with torch.no_grad():
        truth, base = truth_model(ids).logits, load(tiny_model_dir)(ids).logits
        got, bf16_adapter = merged(ids).logits.float(), adapter_bf16(ids).logits.float()

    def rms(a):
        return a.pow(2).mean().sqrt().item()

    err_merged, err_adapter, effect = rms(got - truth), rms(bf16_adapter - truth), rms(truth - base)
    print(f"bf16 RMS |Δlogit|: merged {err_merged:.2e}, bf16 adapter model {err_adapter:.2e}, "
          f"adapter effect {effect:.2e}; max: merged {maxdiff(got, truth):.2e}, "
          f"adapter model {maxdiff(bf16_adapter, truth):.2e}")
    assert err_merged <= 1.25 * err_adapter and err_merged <= 0.02 * effect
    # Asking for float32 from the same adapter is exact again.
    merge_to_folder(tmp_path / "adapter", tmp_path / "merged32", dtype="float32")
    assert maxdiff(load(tmp_path / "merged32")(ids).logits, truth) <= FP32_TOL


def test_bf16_stored_base_loads_in_bf16_and_still_rounds_once(tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 checkpoint merged to bf16 loads in bf16 (half the memory): W0 is exact either way."""
    import rlora_cli.export
    from rlora_cli.adapters import adapter_layers
    from rlora_cli.checkpoint import load_adapter

    load(tiny_model_dir, torch.bfloat16).save_pretrained(tmp_path / "base16")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "base16")
    make_adapter(tmp_path / "base16", tmp_path / "adapter", dict(type="multilora"), dtype=torch.bfloat16,
                 scale=0.05)
    seen, real = [], rlora_cli.export.load_model
    monkeypatch.setattr(rlora_cli.export, "load_model",
                        lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    merge_to_folder(tmp_path / "adapter", tmp_path / "merged")
    assert seen == ["bfloat16"]
    weights = dict(load(tmp_path / "merged", None).named_parameters())
    for name, layer in adapter_layers(load_adapter(load(tmp_path / "base16"), tmp_path / "adapter")).items():
        assert torch.equal(weights[name + ".weight"],
                           (layer.base.weight + layer.delta_weight()).to(torch.bfloat16))


def test_sharded_output_loads(tiny_model_dir, tmp_path):
    _, ref = make_adapter(tiny_model_dir, tmp_path / "adapter", dict(type="multilora"))
    merge_to_folder(tmp_path / "adapter", tmp_path / "merged", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert maxdiff(logits(load(tmp_path / "merged")), ref) <= FP32_TOL


def test_adapted_lm_head_is_untied_and_partial_targets_export_full_paths(tiny_model_dir, tmp_path):
    """An adapter on the tied LM head must not leak into the input embeddings; an adapter on
    some layers only must make PEFT wrap exactly those (full paths, not short names)."""
    from peft import PeftModel

    targets = r"lm_head|model\.layers\.0\.self_attn\.q_proj"
    _, ref = make_adapter(tiny_model_dir, tmp_path / "adapter", dict(type="lora", num_heads=1),
                          targets=targets)
    merge_to_folder(tmp_path / "adapter", tmp_path / "merged")
    merged, base = load(tmp_path / "merged"), load(tiny_model_dir)
    assert not merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert maxdiff(logits(merged), ref) <= FP32_TOL
    cfg = export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert cfg["target_modules"] == ["lm_head", "model.layers.0.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert maxdiff(logits(peft_model), ref) <= FP32_TOL


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2: its linears are transformers' Conv1D (weight stored [d_in, d_out])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlora_cli.testing import build_tokenizer

    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("gpt2") / "model"
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=len(tok),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", [dict(type="lora", num_heads=1), dict(type="rlora", router="off")],
                         ids=mid)
def test_conv1d_model_merges_and_exports_with_fan_in_fan_out(gpt2_dir, tmp_path, method):
    from peft import PeftModel

    _, ref = make_adapter(gpt2_dir, tmp_path / "adapter", method)
    merge_to_folder(tmp_path / "adapter", tmp_path / "merged")
    assert maxdiff(logits(load(tmp_path / "merged")), ref) <= FP32_TOL
    cfg = export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    peft_model = PeftModel.from_pretrained(load(gpt2_dir), tmp_path / "peft").eval()
    assert maxdiff(logits(peft_model), ref) <= FP32_TOL


def test_tokenizer_comes_from_the_adapter_else_the_base(tiny_model_dir, tmp_path):
    method = dict(type="lora", num_heads=1)
    make_adapter(tiny_model_dir, tmp_path / "bare", method, tokenizer=False)
    merge_to_folder(tmp_path / "bare", tmp_path / "m1")
    base_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(tmp_path / "m1").chat_template == base_tok.chat_template

    model = load(tiny_model_dir)
    inject_adapters(model, AdapterConfig(type="lora", num_heads=1, r=4, target_modules=["q_proj"]))
    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    own.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    save_adapter(model, tmp_path / "own", tokenizer=own)
    merge_to_folder(tmp_path / "own", tmp_path / "m2")
    assert AutoTokenizer.from_pretrained(tmp_path / "m2").chat_template == own.chat_template
    export_peft(tmp_path / "own", tmp_path / "p2")  # PEFT folder carries it too
    assert AutoTokenizer.from_pretrained(tmp_path / "p2").chat_template == own.chat_template


# ---------------------------------------------------------------- bad input, atomic writes


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "adapter"
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    make_adapter(tiny_model_dir, d, dict(type="rlora", router="off"), targets=targets)
    return d


def _edit_config(d: Path, **changes):
    config = json.loads((d / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if key == "type":
            config["adapter"]["type"] = value
        else:
            config[key] = value
    (d / CONFIG_FILE).write_text(json.dumps(config))


def _drop_tensor(d: Path):
    tensors = load_file(str(d / WEIGHTS_FILE))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(d / WEIGHTS_FILE))


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "no-folder": (lambda d: shutil.rmtree(d), "no such adapter directory"),
    "no-config": (lambda d: (d / CONFIG_FILE).unlink(), "not an rlora adapter"),
    "invalid-json": (lambda d: (d / CONFIG_FILE).write_text("{\"format_version\": 1,"), "not valid JSON"),
    "newer-format": (lambda d: _edit_config(d, format_version=99), "newer rlora"),
    "unknown-method": (lambda d: _edit_config(d, type="dora"), "unknown method"),
    "no-weights": (lambda d: (d / WEIGHTS_FILE).unlink(), "cannot read the adapter weights"),
    "truncated": (lambda d: _truncate(d / WEIGHTS_FILE), "truncated"),
    "garbage": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "not a safetensors file"),
    "missing-tensor": (_drop_tensor, "missing tensors"),
    "nan-tensor": (lambda d: _nan_tensor(d), r"tensor \S+ holds NaN or infinite values"),
}


def _nan_tensor(d: Path):
    tensors = load_file(str(d / WEIGHTS_FILE))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[-1] = float("nan")
    save_file(tensors, str(d / WEIGHTS_FILE))


@pytest.mark.parametrize("fmt", ["merged", "peft"])
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_adapter_is_a_user_error_and_writes_nothing(good_adapter, tmp_path, kind, fmt):
    d = tmp_path / "adapter"
    shutil.copytree(good_adapter, d)
    corrupt, message = CORRUPTIONS[kind]
    corrupt(d)
    with pytest.raises(UserError, match=message) as e:
        export_adapter(d, tmp_path / "out", format=fmt)
    assert e.value.fix and "\n" not in e.value.message
    assert nothing_written(tmp_path / "out")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    from rlora_cli.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", hidden_size=32)


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_adapter_for_another_base_is_refused(good_adapter, other_base, tmp_path, fmt):
    with pytest.raises(UserError, match="has shape"):
        export_adapter(good_adapter, tmp_path / "out", format=fmt, base=str(other_base))
    assert nothing_written(tmp_path / "out")


def test_output_rules(good_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    for fmt in ("merged", "peft"):
        with pytest.raises(UserError, match="not empty") as e:
            export_adapter(good_adapter, out, format=fmt)
        assert "--overwrite" in e.value.fix and (out / "keep.txt").is_file()
    export_peft(good_adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()
    with pytest.raises(UserError, match="would replace the input"):
        merge_to_folder(good_adapter, good_adapter, overwrite=True)
    with pytest.raises(UserError, match="unknown format"):
        export_adapter(good_adapter, tmp_path / "x", format="onnx")
    with pytest.raises(UserError, match="unknown dtype"):
        merge_to_folder(good_adapter, tmp_path / "x", dtype="int8")
    with pytest.raises(UserError, match="--dtype applies to --format merged only"):
        export_adapter(good_adapter, tmp_path / "x", format="peft", dtype="bfloat16")
    assert nothing_written(tmp_path / "x")
    (tmp_path / "empty").mkdir()  # an empty folder is fine to write into
    merge_to_folder(good_adapter, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_missing_base_names_the_base_option(good_adapter, tiny_model_dir, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(good_adapter, d)
    _edit_config(d, base_model=str(tmp_path / "moved-away"))
    for fmt in ("merged", "peft"):
        with pytest.raises(UserError, match="moved-away") as e:
            export_adapter(d, tmp_path / fmt, format=fmt)
        assert "--base" in e.value.fix and nothing_written(tmp_path / fmt)
        export_adapter(d, tmp_path / fmt, format=fmt, base=str(tiny_model_dir))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir)


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_interrupted_merge_leaves_nothing_half_made(good_adapter, tmp_path, monkeypatch, interrupt):
    from transformers import PreTrainedModel

    def half_save(self, directory, **kwargs):
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise interrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_save)
    with pytest.raises(type(interrupt)):
        merge_to_folder(good_adapter, tmp_path / "merged")
    assert nothing_written(tmp_path / "merged")
    # Interrupting an --overwrite keeps the previous output whole.
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "config.json").write_text("{}")
    with pytest.raises(type(interrupt)):
        merge_to_folder(good_adapter, tmp_path / "prev", overwrite=True)
    assert [p.name for p in (tmp_path / "prev").iterdir()] == ["config.json"]
    assert not list(tmp_path.glob(".prev.*"))


# ---------------------------------------------------------------- inspect


def test_inspect_run_directory(good_adapter, tmp_path):
    from rich.console import Console

    run = tmp_path / "run"
    for step in (5, 10):
        shutil.copytree(good_adapter, run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "recipe.yaml").write_text("seed: 0\n")
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": {"a": 2.7}}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\nnot json\n")
    info = inspect_dir(run)  # unfinished run: the latest checkpoint's adapter is described
    assert info["kind"] == "run" and not info["final_adapter"]
    assert [c["step"] for c in info["checkpoints"]] == [5, 10] and info["checkpoints"][0]["training_state"]
    assert info["adapter"]["path"].endswith("checkpoint-10")
    assert info["metrics"] == {"rows": 3, "bad_lines": 1, "last_step": 2, "last_loss": 2.5}
    shutil.copytree(good_adapter, run / "adapter")
    info = inspect_dir(run)
    assert info["final_adapter"] and info["adapter"]["path"].endswith("adapter")
    assert info["adapter"]["num_modules"] == 8 and info["adapter"]["peft_rank"] == 8
    assert info["adapter"]["module_names"] == ["down_proj", "gate_proj", "q_proj", "v_proj"]
    json.dumps(info)
    console = Console(record=True, width=120)
    render_inspect(info, console)
    text = console.export_text()
    for needle in ("run ", "checkpoints", "5, 10", "rlora", "rank 8", "8 modules", "frozen init factors"):
        assert needle in text
    # merge and export accept the run folder and use its adapter/
    cfg = export_peft(run, tmp_path / "peft")
    assert cfg["r"] == 8


def test_inspect_rejects_what_it_cannot_read(tmp_path, good_adapter):
    with pytest.raises(UserError, match="no such directory"):
        inspect_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither an rlora adapter nor a training run"):
        inspect_dir(tmp_path / "empty")
    d = tmp_path / "adapter"
    shutil.copytree(good_adapter, d)
    (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        inspect_dir(d)


def test_router_adapter_inspect_says_why(tiny_model_dir, tmp_path):
    from rich.console import Console

    make_adapter(tiny_model_dir, tmp_path / "a", dict(type="hydralora"), targets=["q_proj"])
    info = inspect_dir(tmp_path / "a")
    assert not info["mergeable"] and info["peft_rank"] is None
    assert "router" in info["not_mergeable_because"]
    console = Console(record=True, width=200)
    render_inspect(info, console)
    assert "no: softmax router" in console.export_text()


def test_header_reader_matches_safetensors(good_adapter):
    header = read_safetensors_header(good_adapter / WEIGHTS_FILE)
    with safe_open(str(good_adapter / WEIGHTS_FILE), "pt") as f:
        assert sorted(header) == sorted(f.keys())
        assert all(header[k]["shape"] == list(f.get_slice(k).get_shape()) for k in f.keys())


# ---------------------------------------------------------------- CLI


def test_cli_merge_export_inspect(good_adapter, tmp_path, capsys):
    assert run_cli(["merge", "--adapter", str(good_adapter), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert run_cli(["export", "--adapter", str(good_adapter), "--format", "peft",
                 "--output", str(tmp_path / "p")]) == 0
    assert "rank 8" in capsys.readouterr().err
    assert run_cli(["export", "--adapter", str(good_adapter), "--format", "merged", "--output",
                 str(tmp_path / "m2"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run_cli(["inspect", str(good_adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peft_rank"] == 8
    assert run_cli(["inspect", str(good_adapter)]) == 0
    assert "rank 8" in capsys.readouterr().out


def test_cli_errors_exit_2_with_one_line(good_adapter, tmp_path, capsys):
    for argv in (["export", "--adapter", str(good_adapter), "--format", "onnx",
                  "--output", str(tmp_path / "x")],
                 ["merge", "--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "x")],
                 ["merge", "--adapter", str(good_adapter), "--output", str(good_adapter.parent)]):
        assert run_cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "—" in err
    assert nothing_written(tmp_path / "x")


# ---------------------------------------------------------------- portable, custom code, literal output


def test_peft_export_records_a_local_base_by_absolute_path(good_adapter, tiny_model_dir, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    cfg = export_peft(good_adapter, tmp_path / "peft", base=tiny_model_dir.name)  # relative, as typed
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir)
    # An older adapter recorded the base relative to where it trained: found above the adapter.
    project = tmp_path / "project"
    shutil.copytree(good_adapter, project / "runs" / "demo" / "adapter")
    shutil.copytree(tiny_model_dir, project / ".models" / "tiny")
    _edit_config(project / "runs" / "demo" / "adapter", base_model=".models/tiny")
    monkeypatch.chdir(tmp_path)
    cfg = export_peft(project / "runs" / "demo", tmp_path / "peft-old")
    assert cfg["base_model_name_or_path"] == str(project / ".models" / "tiny")
    merge_to_folder(project / "runs" / "demo", tmp_path / "merged-old")
    assert (tmp_path / "merged-old" / "config.json").is_file()


def test_custom_code_adapter_merges_and_exports_only_with_the_flag(good_adapter, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(good_adapter, d)
    _edit_config(d, trust_remote_code=True)
    for fmt in ("merged", "peft"):
        with pytest.raises(UserError, match="runs its own code") as e:
            export_adapter(d, tmp_path / fmt, format=fmt)
        assert "--trust-remote-code" in e.value.fix and nothing_written(tmp_path / fmt)
        export_adapter(d, tmp_path / fmt, format=fmt, trust_remote_code=True)
    info = inspect_dir(d)
    assert info["trust_remote_code"] is True and "trust_remote_code" not in info["metadata"]


def test_output_that_is_a_file_or_under_a_file_is_refused(good_adapter, tmp_path):
    (tmp_path / "model.bin").write_text("keep")
    for fmt in ("merged", "peft"):
        with pytest.raises(UserError, match="exists and is a file, not a folder"):
            export_adapter(good_adapter, tmp_path / "model.bin", format=fmt)
        with pytest.raises(UserError, match="model.bin is a file, not a folder"):
            export_adapter(good_adapter, tmp_path / "model.bin" / "out", format=fmt)
    assert (tmp_path / "model.bin").read_text() == "keep"


def test_inspect_prints_bracketed_paths_literally(good_adapter, tmp_path):
    from rich.console import Console

    d = tmp_path / "runs[bold]" / "a[/b]x"
    shutil.copytree(good_adapter, d)
    console = Console(record=True, width=300)
    render_inspect(inspect_dir(d), console)
    text = console.export_text()
    assert "runs[bold]/a[/b]x" in text and "['q_proj', 'v_proj', 'gate_proj', 'down_proj']" in text
