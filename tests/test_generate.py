"""rlora generate on the tiny model: greedy output with an adapter equals transformers' generate on
the merged model, prompts use the template saved with the adapter, JSONL in and out, a base model
and a merged folder work alike, sampling is seeded, and bad input is one UserError."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora_cli.adapters import AdapterConfig, inject_adapters, merge_adapters
from rlora_cli.checkpoint import save_adapter
from rlora_cli.errors import UserError
from rlora_cli.export import merge_to_folder
from rlora_cli.generate import build_prompt, generate, read_prompts
from rlora_cli.templates import TEMPLATES, template_info

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
    from rlora_cli.checkpoint import load_adapter

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
        {"prompt": "Is it good?", "kind": "nlu", "label_words": ["bad", "good"], "id": 5},  # no saved template
    ]
    texts = [
        ALPACA.format(instruction=lines[0]["prompt"]),
        ALPACA_INPUT.format(instruction=lines[1]["prompt"], input=lines[1]["input"]),
        tokenizer.apply_chat_template([{"role": "user", "content": f"Question: {lines[2]['prompt']}\nAnswer:"}],
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
    assert via_merged == via_adapter == [{"prompt": prompt, "completion": reference(ALPACA.format(instruction=prompt))}]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    plain = _greedy(base, AutoTokenizer.from_pretrained(tiny_model_dir))
    [row] = generate("The sun is", model=str(tiny_model_dir), kind="raw", max_new_tokens=NEW, stream=False)
    assert row["completion"] == plain("The sun is")
    [row] = generate("Hi", model=str(tiny_model_dir), kind="instruction", template="chat", max_new_tokens=NEW,
                     stream=False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": ALPACA.format(instruction="Hi")}], tokenize=False,
                                   add_generation_prompt=True)
    assert row["completion"] == plain(chat)


def test_sampling_is_seeded_and_differs_from_greedy(adapter):
    kw = dict(adapter=str(adapter), max_new_tokens=NEW, stream=False, kind="raw")
    a = generate("The", temperature=1.5, seed=1, **kw)
    assert a == generate("The", temperature=1.5, seed=1, **kw)
    samples = {generate("The", temperature=1.5, seed=s, **kw)[0]["completion"] for s in range(4)}
    assert len(samples | {generate("The", **kw)[0]["completion"]}) > 1


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
