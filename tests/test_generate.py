"""rlora generate on the tiny model: greedy output with an adapter equals transformers' generate on
the merged model, prompts use the template saved with the adapter, JSONL in and out, a base model
and a merged folder work alike, sampling is seeded, and bad input is one UserError."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlora_cli.generate as generate_module
from rlora_cli.adapters import AdapterConfig, inject_adapters, merge_adapters
from rlora_cli.checkpoint import load_adapter, save_adapter
from rlora_cli.data.templates import TEMPLATES, template_info
from rlora_cli.errors import UserError
from rlora_cli.export import merge_to_folder
from rlora_cli.generate import _rows, build_prompt, generate, read_prompts

NEW = 12
ALPACA = TEMPLATES["instruction"]["prompt"]
ALPACA_INPUT = TEMPLATES["instruction"]["prompt_with_input"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A perturbed MultiLoRA adapter (gates non-zero, so it is not the identity) that was 'trained'
    with the default instruction template and the chat template for knowledge rows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inject_adapters(model, AdapterConfig(type="multilora", r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    templates = {"instruction": template_info("instruction"), "knowledge": template_info("knowledge", "chat")}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return save_adapter(model, tmp_path_factory.mktemp("gen") / "adapter", tokenizer=tokenizer,
                        metadata={"templates": templates})


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter, tmp_path_factory):
    return merge_to_folder(adapter, tmp_path_factory.mktemp("merged") / "model")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter):
    """Greedy continuation (up to EOS) by plain transformers on the adapter merged in memory."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = merge_adapters(load_adapter(model, adapter)).eval()
    return _greedy(model, AutoTokenizer.from_pretrained(tiny_model_dir))


def _greedy(model, tokenizer):
    def run(text: str) -> str:
        ids = tokenizer(text, return_tensors="pt")
        out = model.generate(**ids, do_sample=False, max_new_tokens=NEW, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in out:
            out = out[:out.index(tokenizer.eos_token_id)]
        return tokenizer.decode(out, skip_special_tokens=True)
    return run


def test_greedy_with_an_adapter_equals_generate_on_the_merged_model(adapter, reference, capsys):
    prompt = "Name three colors of the sea."
    [row] = generate(prompt, adapter=str(adapter), max_new_tokens=NEW)
    expected = reference(ALPACA.format(instruction=prompt))
    assert row == {"prompt": prompt, "completion": expected}
    assert expected.strip()  # something was generated at all
    assert capsys.readouterr().out.strip() == expected.strip()  # streamed to stdout as it came


def test_jsonl_in_and_out_with_each_kind_and_template(adapter, reference, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    lines = [
        {"prompt": "List two animals.", "id": 1},
        {"prompt": "Summarize the text.", "input": "The cat sat on the old tree.", "id": 2},
        {"prompt": "What is the capital of the moon?", "kind": "knowledge", "id": 3},  # saved: chat
        {"prompt": "The red bird", "kind": "raw", "id": 4},
        # no saved template for nlu
        {"prompt": "Is it good?", "kind": "nlu", "label_words": ["bad", "good"], "id": 5},
    ]
    texts = [
        ALPACA.format(instruction=lines[0]["prompt"]),
        ALPACA_INPUT.format(instruction=lines[1]["prompt"], input=lines[1]["input"]),
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Question: {lines[2]['prompt']}\nAnswer:"}],
            tokenize=False, add_generation_prompt=True),
        "The red bird",
        "Classify the text. Answer with one of: bad, good.\n\nText: Is it good?\nAnswer:",
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")  # a blank line is fine
    out = tmp_path / "out" / "answers.jsonl"
    rows = generate(file=src, adapter=str(adapter), output=out, max_new_tokens=NEW, batch_size=1)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written == rows
    assert [{k: v for k, v in r.items() if k != "completion"} for r in written] == lines  # input kept as is
    assert [r["completion"] for r in written] == [reference(t) for t in texts]
    for line, text in zip(lines, texts):
        assert build_prompt(line, tokenizer, {"knowledge": {"template": "chat"}}) == text
    # left-padded batches give the same greedy text (fp32, tiny model)
    batched = generate(file=src, adapter=str(adapter), max_new_tokens=NEW, batch_size=3)
    assert [r["completion"] for r in batched] == [r["completion"] for r in rows]


def test_a_merged_folder_and_a_base_model_work_alike(adapter, merged, tiny_model_dir, reference):
    prompt = "Write a word."
    via_merged = generate(prompt, model=str(merged), max_new_tokens=NEW, stream=False)
    via_adapter = generate(prompt, adapter=str(adapter), max_new_tokens=NEW, stream=False)
    expected = [{"prompt": prompt, "completion": reference(ALPACA.format(instruction=prompt))}]
    assert via_merged == via_adapter == expected
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = _greedy(base, AutoTokenizer.from_pretrained(tiny_model_dir))
    [row] = generate("The sun is", model=str(tiny_model_dir), kind="raw", max_new_tokens=NEW, stream=False)
    assert row["completion"] == plain("The sun is")
    [row] = generate("Hi", model=str(tiny_model_dir), kind="instruction", template="chat", max_new_tokens=NEW,
                     stream=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": ALPACA.format(instruction="Hi")}],
                                   tokenize=False, add_generation_prompt=True)
    assert row["completion"] == plain(chat)


def test_sampling_is_seeded_and_differs_from_greedy(adapter):
    kw = dict(adapter=str(adapter), max_new_tokens=NEW, stream=False, kind="raw")
    a = generate("The", temperature=1.5, seed=1, **kw)
    assert a == generate("The", temperature=1.5, seed=1, **kw)
    samples = {generate("The", temperature=1.5, seed=s, **kw)[0]["completion"] for s in range(4)}
    assert len(samples | {generate("The", **kw)[0]["completion"]}) > 1


def test_completion_text_and_named_formats(adapter, tiny_model_dir, tmp_path):
    """Completion and text prompts are continued as written; --template takes the named formats; an
    adapter's saved format is rendered from its saved text, not from today's table."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = _greedy(base, tok)
    kw = dict(model=str(tiny_model_dir), max_new_tokens=NEW, stream=False)
    for kind in ("completion", "text"):
        assert generate("The sun is", kind=kind, **kw)[0]["completion"] == plain("The sun is")
    gemma = "<start_of_turn>user\nThe sun is<end_of_turn>\n<start_of_turn>model\n"
    assert build_prompt({"prompt": "The sun is", "kind": "completion"}, tok, template="gemma") == gemma
    assert generate("The sun is", kind="completion", template="gemma", **kw)[0]["completion"] == plain(gemma)
    with pytest.raises(UserError, match="--template: unknown template 'llama2'") as e:
        generate("hi", template="llama2", **kw)
    assert "llama3, qwen, mistral, gemma, alpaca" in e.value.fix
    with pytest.raises(UserError, match="a text example is raw text, with no turns for template 'chat'"):
        generate("hi", kind="text", template="chat", **kw)
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "rlora_config.json").read_text())
    saved = template_info("chat", "mistral")
    saved["chat_template"] = saved["chat_template"].replace("[/INST]", "[/ASK]")  # as if the table changed
    config["templates"] = {**config["templates"], "chat": saved}
    (copy / "rlora_config.json").write_text(json.dumps(config))
    [row] = generate("Hi", adapter=str(copy), kind="chat", max_new_tokens=NEW, stream=False)
    merged = merge_adapters(load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                                              dtype=torch.float32), copy))
    assert row["completion"] == _greedy(merged.eval(), tok)("[INST] Hi [/ASK]")
    hi = {"prompt": "Hi", "kind": "chat"}
    assert build_prompt(hi, tok, config["templates"], "mistral") == "[INST] Hi [/ASK]"  # the saved one
    assert build_prompt(hi, tok, config["templates"], "qwen") == (  # another format: the table's
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_bad_input_is_one_user_error(tmp_path, adapter, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no prompts in the file"):
        generate(file=empty, adapter=str(adapter))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        generate(file=bad, adapter=str(adapter))
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text('{"text": "hi"}\n')
    with pytest.raises(UserError, match=r":1: a line needs a string \"prompt\""):
        read_prompts(no_prompt)
    kind = tmp_path / "kind.jsonl"
    kind.write_text('{"prompt": "hi", "kind": "poem"}\n')
    with pytest.raises(UserError, match="unknown kind 'poem'"):
        generate(file=kind, adapter=str(adapter))
    with pytest.raises(UserError, match="no such prompts file"):
        generate(file=tmp_path / "missing.jsonl", adapter=str(adapter))
    with pytest.raises(UserError, match="one of them"):
        generate(adapter=str(adapter))
    with pytest.raises(UserError, match="one of them"):
        generate("hi", file=kind, adapter=str(adapter))
    with pytest.raises(UserError, match="nothing to generate with"):
        generate("hi")
    with pytest.raises(UserError, match="not an rlora adapter"):
        generate("hi", adapter=str(tmp_path))
    with pytest.raises(UserError, match="kind nlu needs the label words"):
        generate("hi", model=str(tiny_model_dir), kind="nlu")
    with pytest.raises(UserError, match="--kind: unknown kind"):
        generate("hi", model=str(tiny_model_dir), kind="poem")
    with pytest.raises(UserError, match="--temperature"):
        generate("hi", model=str(tiny_model_dir), temperature=-1)


# ------------------------------------------------------------------ the command line, from anywhere



def test_cli_adapter_by_absolute_path_from_another_folder_then_base_moved(tiny_model_dir, tmp_path,
                                                                         monkeypatch, capfd):
    """An adapter trained on `.models/x` (relative, as recipes say) works from any working folder;
    once the base is gone the command is one line naming the path and --model."""
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / ".models" / "x")
    monkeypatch.chdir(project)
    model = AutoModelForCausalLM.from_pretrained(".models/x", dtype=torch.float32)
    inject_adapters(model, AdapterConfig(type="lora", r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, "runs/demo/adapter", tokenizer=AutoTokenizer.from_pretrained(".models/x"))
    monkeypatch.chdir(tmp_path)
    run = str(project / "runs" / "demo")
    assert run_cli(["generate", "--adapter", run, "--max-new-tokens", "2", "--dtype", "fp32", "Hi"]) == 0
    assert "Repo id" not in capfd.readouterr().err
    shutil.move(project / ".models", project / "models-elsewhere")
    assert run_cli(["generate", "--adapter", run, "--max-new-tokens", "2", "Hi"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{project / '.models' / 'x'} no longer exists" in err and "pass --model" in err
    assert run_cli(["generate", "--adapter", run, "--model", str(project / "models-elsewhere" / "x"),
                 "--max-new-tokens", "2", "--dtype", "fp32", "Hi"]) == 0


def test_custom_code_adapter_generates_only_with_the_flag(adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "rlora_config.json").read_text())
    (copy / "rlora_config.json").write_text(json.dumps({**config, "trust_remote_code": True}))
    with pytest.raises(UserError, match="runs its own code") as e:
        generate("hi", adapter=str(copy), max_new_tokens=2, stream=False)
    assert "--trust-remote-code" in e.value.fix
    expected = generate("hi", adapter=str(adapter), max_new_tokens=2, stream=False)
    allowed = generate("hi", adapter=str(copy), max_new_tokens=2, stream=False, trust_remote_code=True)
    assert allowed == expected


def test_non_finite_adapter_generates_nothing_and_says_which_tensor(adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    tensors = load_file(str(copy / "rlora_adapter.safetensors"))
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("-inf"))
    save_file(tensors, str(copy / "rlora_adapter.safetensors"))
    with pytest.raises(UserError, match=f"tensor {first} holds NaN or infinite values"):
        generate("hi", adapter=str(copy), max_new_tokens=2, stream=False)


def test_output_that_is_a_folder_is_refused_before_loading(adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "load_with_adapter", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UserError, match="is a folder"):
        generate("hi", adapter=str(adapter), output=tmp_path)


def test_shipped_demo_prompts_cover_each_demo_kind(adapter):
    """data/demo/prompts.jsonl (used in the README) parses and has a line of each kind the demo trains."""
    path = REPO / "data" / "demo" / "prompts.jsonl"
    rows = _rows(None, path, "instruction")
    assert {r.get("kind", "instruction") for r in rows} == {"instruction", "nlu", "knowledge"}
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert all(build_prompt(r, tokenizer).strip() for r in rows)
    out = generate(file=path, adapter=str(adapter), max_new_tokens=2, batch_size=6)
    assert len(out) == len(rows) and all("completion" in r for r in out)
