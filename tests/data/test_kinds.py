"""The completion and text kinds and the named chat formats: token-exact label masks, long texts cut
into pieces that train every token exactly once, each format's literal text, the mixture of pieces,
and bad rows, roles and templates as one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import bos_tokenizer
import yaml

from rlora_cli.cli import main
from rlora_cli.config.data import CHAT_FORMATS
from rlora_cli.data.chat_templates import ALPACA_HEAD, CHAT_TEMPLATES
from rlora_cli.data.pipeline import encode, encode_pieces, load_splits, prepare, tokenize_example
from rlora_cli.data.templates import ChatFormat, Example, prompt_text, render, saved_template, template_info
from rlora_cli.errors import UserError
from rlora_cli.recipe.load import load_recipe
from rlora_cli.testing import tiny_corpus, write_kinds_data


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def bos_tok(tiny_model_dir):
    """The tiny tokenizer with a BOS in front of every text, as Llama's."""
    return bos_tokenizer(tiny_model_dir)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(e):
    return [x for x in e.labels if x != -100]


COMPLETION = Example("capitals", "completion",
                     {"prompt": "The capital of France is", "completion": " Paris."})
CHAT = Example("dialogues", "chat", {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name a color"},
    {"role": "assistant", "content": "blue"}]})


# ------------------------------------------------------------------------------ completion, text


def test_completion_trains_exactly_the_completion_and_eos(tok):
    e = tokenize_example(COMPLETION, tok)
    prompt, completion = ids(tok, "The capital of France is"), ids(tok, " Paris.")
    assert e.input_ids == prompt + completion + [tok.eos_token_id]  # verbatim: no template around it
    assert e.labels == [-100] * len(prompt) + completion + [tok.eos_token_id]
    on_prompt = tokenize_example(COMPLETION, tok, train_on_prompt=True)
    assert on_prompt.labels == [-100] + on_prompt.input_ids[1:]
    # in a chat template: one user turn and one assistant turn, as every other kind
    assert render(COMPLETION, tok, "chat") == [
        ("<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>\n", True)]
    assert prompt_text(COMPLETION, tok) == "The capital of France is"


def test_text_trains_every_token_and_eos(tok, bos_tok):
    text = "The cat is on the tree."
    example = Example("notes", "text", {"text": text})
    e = tokenize_example(example, tok)
    assert e.input_ids == ids(tok, text) + [tok.eos_token_id]
    assert e.labels == [-100] + ids(tok, text)[1:] + [tok.eos_token_id]  # nothing predicts the first token
    assert tokenize_example(example, tok, train_on_prompt=True) == e
    with_bos = tokenize_example(example, bos_tok)  # after a BOS the first text token is a target too
    assert trained(with_bos) == ids(bos_tok, text) + [bos_tok.eos_token_id]
    assert prompt_text(example, tok) == text
    with pytest.raises(UserError, match="notes: a text example is raw text, with no turns for template"):
        render(example, tok, "chat")


@pytest.mark.parametrize("with_bos", [False, True])
def test_a_long_text_becomes_pieces_that_train_every_token_once(tok, bos_tok, with_bos):
    t = bos_tok if with_bos else tok
    text = " ".join(tiny_corpus(30))
    whole = ids(t, text) + [t.eos_token_id]
    head = [t.convert_tokens_to_ids("<|im_start|>")] if with_bos else []
    pieces = encode_pieces(Example("notes", "text", {"text": text}), t, max_length=32)
    assert len(pieces) > 5 and all(len(p.input_ids) == 32 for p in pieces[:-1])
    assert 0 < len(pieces[-1].input_ids) <= 32
    assert not any(p.truncated for p in pieces)
    # every text token and the EOS is a target exactly once, in order
    assert [x for p in pieces for x in trained(p)] == (whole if with_bos else whole[1:])
    # each piece opens with the prefix; after the first, the previous window's last token is context
    windows = [p.input_ids[len(head) + (i > 0):] for i, p in enumerate(pieces)]
    assert [x for w in windows for x in w] == whole
    for i, p in enumerate(pieces):
        untrained = len(head) + (i > 0)
        assert p.input_ids[:len(head)] == head and p.labels[:untrained] == [-100] * untrained
        if i:
            assert p.input_ids[len(head)] == windows[i - 1][-1]
    assert encode_pieces(Example("notes", "text", {"text": text}), t) == [tokenize_example(
        Example("notes", "text", {"text": text}), t)]  # no max_length: one row


def recipe_for(tmp_path: Path, datasets: list[dict], **data) -> object:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny"},
                                    "data": {"datasets": datasets, **data}}))
    return load_recipe(path)


def test_text_pieces_in_the_mixture_and_packed(tmp_path, tok):
    prose = write_kinds_data(tmp_path)[1]
    recipe = recipe_for(tmp_path, [prose], max_length=64)
    (train_ex, val_ex), = load_splits(recipe, with_train=True).values()
    expected = [encode_pieces(ex, tok, max_length=64) for ex in train_ex]
    p = prepare(recipe, tok, cache_dir=str(tmp_path / "cache"))
    source = p.mixture.sources[0]
    assert source.used == len(train_ex) == 20 and source.truncated == 0  # shares count texts, not pieces
    assert len(p.train) == sum(map(len, expected)) > len(train_ex)  # some texts are longer than 64 tokens
    assert sorted(p.train["input_ids"]) == sorted(e.input_ids for pieces in expected for e in pieces)
    assert source.trained_tokens == sum(len(trained(e)) for pieces in expected for e in pieces) \
        == sum(len(ids(tok, ex.fields["text"])) for ex in train_ex)  # each text: its tokens - first + EOS
    assert len(p.val["prose"]) == sum(len(encode_pieces(ex, tok, max_length=64)) for ex in val_ex)
    packed = prepare(recipe_for(tmp_path, [prose], max_length=64, packing=True), tok,
                     cache_dir=str(tmp_path / "cache"))
    assert sum(packed.train["n_examples"]) == len(p.train) > len(packed.train)
    assert all(len(r) <= 64 for r in packed.train["input_ids"])
    assert sum(packed.train["n_trained_tokens"]) == source.trained_tokens


# ------------------------------------------------------------------------------ named formats

# Each format's rendering of CHAT with the tiny tokenizer (no BOS, EOS <|endoftext|>): the whole
# text, its trained segments, and the generation prompt of a single user turn "hi".
EOS = "<|endoftext|>"
EXPECTED = {
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nname a color<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nblue<|eot_id|>",
               ["hello<|eot_id|>", "blue<|eot_id|>"],
               "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
             "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nname a color<|im_end|>\n"
             "<|im_start|>assistant\nblue<|im_end|>\n",
             ["hello<|im_end|>\n", "blue<|im_end|>\n"],
             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": (f"[INST] Be brief.\n\nhi [/INST]hello{EOS}[INST] name a color [/INST]blue{EOS}",
                [f"hello{EOS}", f"blue{EOS}"],
                "[INST] hi [/INST]"),
    "gemma": ("<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
              "<start_of_turn>user\nname a color<end_of_turn>\n<start_of_turn>model\nblue<end_of_turn>\n",
              ["hello<end_of_turn>\n", "blue<end_of_turn>\n"],
              "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"),
    "alpaca": (f"Be brief.\n\n### Instruction:\nhi\n\n### Response:\nhello{EOS}"
               f"\n\n### Instruction:\nname a color\n\n### Response:\nblue{EOS}",
               [f"hello{EOS}", f"blue{EOS}"],
               f"{ALPACA_HEAD}\n\n### Instruction:\nhi\n\n### Response:\n"),
}


def test_every_format_is_in_the_table_and_the_recipe_check():
    assert tuple(CHAT_TEMPLATES) == CHAT_FORMATS == tuple(EXPECTED)


@pytest.mark.parametrize("name", CHAT_FORMATS)
def test_named_format_renders_as_its_family_writes_it(tok, name):
    full, turns, generation = EXPECTED[name]
    segments = render(CHAT, tok, name)
    assert "".join(text for text, _ in segments) == full
    assert [text for text, flag in segments if flag] == turns
    hi = Example("hi", "chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert prompt_text(hi, tok, name) == generation
    # the loss mask is token-exact: exactly the assistant turns' ids (+ EOS unless a turn wrote it);
    # tokens the vocabulary lacks (<|eot_id|>, <start_of_turn>) are plain text, never an error
    e = encode(segments, tok)
    expected = [x for text in turns for x in ids(tok, text)]
    assert trained(e) == expected + ([] if turns[-1].endswith(EOS) else [tok.eos_token_id])
    assert tok.decode(trained(e)) == "".join(turns) + ("" if turns[-1].endswith(EOS) else EOS)


def test_qwen_is_chatml_and_alpaca_is_alpacas_prompt(tok):
    assert render(CHAT, tok, "qwen") == render(CHAT, tok, "chat")  # the tiny tokenizer's own is ChatML
    one = Example("a", "chat", {"messages": [{"role": "user", "content": "Say hi."},
                                             {"role": "assistant", "content": "hi"}]})
    assert "".join(t for t, _ in render(one, tok, "alpaca")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\nSay hi.\n\n### Response:\nhi{EOS}")


def test_named_format_writes_the_tokenizers_bos_once(bos_tok):
    bos = bos_tok.convert_tokens_to_ids("<|im_start|>")
    for name in ("llama3", "mistral", "gemma"):  # the families whose templates open with BOS
        segments = render(CHAT, bos_tok, name)
        assert segments[0][0].startswith("<|im_start|>")
        assert encode(segments, bos_tok).input_ids[:2] != [bos, bos]
    assert not render(CHAT, bos_tok, "qwen")[0][0].startswith("<|im_start|>system<|im_start|>")
    assert encode(render(CHAT, bos_tok, "alpaca"), bos_tok).input_ids[0] == bos  # the prefix, as default


def test_named_format_on_other_kinds_and_roles_it_lacks(tok):
    assert render(COMPLETION, tok, "gemma") == [
        ("<start_of_turn>user\nThe capital of France is<end_of_turn>\n<start_of_turn>model\n", False),
        ("Paris.<end_of_turn>\n", True)]
    tool = Example("tools", "chat", {"messages": [
        {"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}]})
    as_llama3 = render(tool, tok, "llama3")[0][0]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in as_llama3
    for name in ("mistral", "gemma", "alpaca"):
        with pytest.raises(UserError, match=f"tools: the {name} chat template cannot render this example: "
                                            f"the {name} format has no tool role"):
            render(tool, tok, name)
    lone_system = Example("s", "chat", {"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"},
                                                     {"role": "system", "content": "c"},
                                                     {"role": "assistant", "content": "d"}]})
    with pytest.raises(UserError, match="puts a system message into the user turn after it"):
        render(lone_system, tok, "gemma")


def test_saved_format_text_wins_over_the_table(tok):
    info = json.loads(json.dumps(template_info("chat", "llama3")))
    assert info["template"] == "llama3" and info["chat_template"] == CHAT_TEMPLATES["llama3"]
    assert saved_template(info) == ChatFormat("llama3", CHAT_TEMPLATES["llama3"])
    assert saved_template(template_info("chat", "chat")) == "chat"
    edited = ChatFormat("llama3", CHAT_TEMPLATES["llama3"].replace("<|eot_id|>", "<|end|>"))
    assert [t for t, flag in render(CHAT, tok, edited) if flag] == ["hello<|end|>", "blue<|end|>"]


def test_a_conversation_opened_by_the_assistant(tok):
    greeted = Example("g", "chat", {"messages": [{"role": "assistant", "content": "Welcome!"},
                                                 {"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]})
    segments = render(greeted, tok, "qwen")  # the greeting answers nothing: context, not trained
    assert [t for t, flag in segments if flag] == ["hello<|im_end|>\n"]
    assert segments[0] == ("<|im_start|>assistant\nWelcome!<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                           "<|im_start|>assistant\n", False)


# ------------------------------------------------------------------------------ bad input, exit 2


def _rows(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]
BAD_INPUTS = [
    ("completion-list", "completion", {}, [*GOOD[:2], {"prompt": "p", "completion": ["a", "b"]}, *GOOD],
     ("(bad, ", "row 2: completion is a list (['a', 'b']), expected a string")),
    ("completion-mapped-column", "completion", {"columns": {"prompt": "question"}},
     [{"question": {"q": 1}, "completion": "a"}] * 10,
     ("row 0: prompt (column 'question') is a mapping",)),
    ("completion-missing-column", "completion", {}, [{"prompt": "p", "answer": "a"}] * 10,
     ("data.datasets[0]: completion needs a 'completion' column", "its columns are prompt, answer")),
    ("text-mapping", "text", {}, [{"text": "fine"}, {"text": {"a": 1}}] * 5,
     ("row 1: text is a mapping", "expected a string")),
    ("text-with-chat-template", "text", {"template": "chat"}, [{"text": "fine"}] * 10,
     ("data.datasets[0].template: a text source is raw text", "remove template")),
    ("unknown-template", "chat", {"template": "llama2"}, [{"messages": []}] * 10,
     ("data.datasets[0].template: unknown value 'llama2'", "llama3, qwen, mistral, gemma, alpaca")),
    ("role-outside-the-four", "chat", {"template": "gemma"},
     [{"messages": [{"role": "user", "content": "hi"}, {"role": "narrator" if i == 3 else "assistant",
                                                        "content": "x"}]} for i in range(10)],
     ("row 3: messages[1] has role 'narrator'", "system, user, assistant, tool")),
    ("tool-role-in-gemma", "chat", {"template": "gemma"},
     [{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "y"}]}] * 10,
     ("bad: the gemma chat template cannot render this example: the gemma format has no tool role",)),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_rows_roles_and_templates_are_one_line(case, tmp_path, tiny_model_dir, capfd, quiet):
    _, kind, extra, rows, expect = case
    (tmp_path / "bad.jsonl").write_text(_rows(rows))
    recipe = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"max_length": 64, "datasets": [
        {"name": "bad", "path": str(tmp_path / "bad.jsonl"), "kind": kind, "val_size": 2, **extra}]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "recipe.yaml"), "--dry-run"])
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for text in expect:
        assert text in lines[0], lines[0]
