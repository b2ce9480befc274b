"""Templates per kind, the chat template path, and the token-exact prompt/response boundary."""

from __future__ import annotations

import json

import pytest
from conftest import bos_tokenizer

from rlora_cli.data.pipeline import encode, tokenize_example
from rlora_cli.data.templates import (
    KINDS,
    TEMPLATE_NAMES,
    TEMPLATES,
    Example,
    choices,
    gold_index,
    prompt_and_response,
    prompt_text,
    render,
    template_info,
)
from rlora_cli.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


NLU = Example("sst2", "nlu",
              {"text": "A fine film.", "label": "positive", "label_words": ["negative", "positive"]})
MC = Example("arc", "knowledge", {"question": "Capital of France?", "answer": "Paris",
                                  "choices": ["London", "Paris", "Rome"], "answer_index": 1})
FREE = Example("facts", "knowledge", {"question": "Two plus two?", "answer": "four"})
INSTR = Example("alpaca", "instruction",
                {"instruction": "Reverse the words.", "input": "red cat", "output": "cat red"})
CHAT = Example("dialogues", "chat", {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name a color"},
    {"role": "assistant", "content": "blue"}]})


def test_instruction_is_alpaca():
    prompt, response = prompt_and_response(INSTR)
    assert prompt == ("Below is an instruction that describes a task, paired with an input that provides "
                      "further context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\n"
                      "Reverse the words.\n\n### Input:\nred cat\n\n### Response:\n")
    assert response == "cat red"
    no_input = Example("a", "instruction", {"instruction": "Say hi.", "output": "hi"})
    assert render(no_input) == [(TEMPLATES["instruction"]["prompt"].format(instruction="Say hi."), False),
                                ("hi", True)]
    assert "### Input" not in render(no_input)[0][0]


def test_nlu_names_the_label_set_and_scores_every_word():
    prompt, response = prompt_and_response(NLU)
    assert prompt == ("Classify the text. Answer with one of: negative, positive.\n\n"
                      "Text: A fine film.\nAnswer:")
    assert response == " positive"
    assert choices(NLU) == [" negative", " positive"] and gold_index(NLU) == 1
    pair = Example("mnli", "nlu", {"text": "A man sleeps.", "text_pair": "Someone rests.",
                                   "label": "entailment",
                                   "label_words": ["entailment", "neutral", "contradiction"]})
    assert prompt_and_response(pair)[0].endswith("Text 1: A man sleeps.\nText 2: Someone rests.\nAnswer:")
    assert choices(pair)[gold_index(pair)] == prompt_and_response(pair)[1] == " entailment"


def test_knowledge_multiple_choice_and_free_form():
    prompt, response = prompt_and_response(MC)
    assert prompt == "Question: Capital of France?\nA. London\nB. Paris\nC. Rome\nAnswer:"
    assert response == " B. Paris"
    assert choices(MC) == [" A. London", " B. Paris", " C. Rome"] and gold_index(MC) == 1
    assert prompt_and_response(FREE) == ("Question: Two plus two?\nAnswer:", " four")
    assert choices(FREE) is None and gold_index(FREE) is None


def test_bigbench_rows_keep_bigbench_text():
    q = "Is the following sentence plausible?\nQ: A cat barked.\nA: "
    ex = Example("bb", "knowledge", {"question": q, "answer": "no", "choices": ["yes", "no"],
                                     "answer_index": 1, "format": "bigbench"})
    prompt, response = prompt_and_response(ex)
    assert prompt + response == q + "no"  # exactly BIG-bench's prompt followed by the target
    assert (prompt, response) == (q.rstrip(" "), " no")
    assert choices(ex) == [" yes", " no"] and gold_index(ex) == 1


def test_chat_kind_trains_every_assistant_turn(tok):
    segments = render(CHAT, tok)
    full = tok.apply_chat_template(CHAT.fields["messages"], tokenize=False)
    assert "".join(text for text, _ in segments) == full
    trained = [text for text, flag in segments if flag]
    assert trained == ["hello<|im_end|>\n", "blue<|im_end|>\n"]
    assert [flag for _, flag in segments] == [False, True, False, True]
    with pytest.raises(UserError, match="several turns"):
        prompt_and_response(CHAT, tok)


def test_chat_template_for_any_kind(tok):
    prompt, response = prompt_and_response(MC, tok, template="chat")
    default_prompt, default_response = prompt_and_response(MC)
    user = [{"role": "user", "content": default_prompt}]
    assert prompt == tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt + response == tok.apply_chat_template(
        user + [{"role": "assistant", "content": default_response.strip()}], tokenize=False)
    assert response == "B. Paris<|im_end|>\n"
    assert choices(MC, tok, "chat") == ["A. London<|im_end|>\n", "B. Paris<|im_end|>\n",
                                        "C. Rome<|im_end|>\n"]
    assert prompt_text(MC, tok, "chat") == prompt and prompt_text(MC) == default_prompt


def test_no_chat_template_is_a_user_error(tok):
    with pytest.raises(UserError, match="chat template"):
        render(MC, None, template="chat")


def test_template_info_is_json_and_matches_render():
    for kind in KINDS:
        for template in TEMPLATE_NAMES:
            if kind == "text" and template != "default":  # raw text has no turns to template
                with pytest.raises(UserError, match="text: default only"):
                    template_info(kind, template)
                continue
            info = json.loads(json.dumps(template_info(kind, template)))
            assert (info["kind"], info["template"]) == (kind, template)
            assert info["format"] == TEMPLATES[kind]
    nlu = template_info("nlu")["format"]
    assert nlu["prompt"].format(label_list="negative, positive",
                                text="A fine film.") == prompt_and_response(NLU)[0]
    with pytest.raises(UserError):
        template_info("summary")


def test_boundary_is_token_exact_where_joint_tokenization_would_merge(tok):
    # Find a split point where tokenizing the joined text merges across it.
    text = "the cat is on the tree"
    cut = next(i for i in range(1, len(text)) if ids(tok, text[:i]) + ids(tok, text[i:]) != ids(tok, text))
    prompt, response = text[:cut], text[cut:]
    e = encode([(prompt, False), (response, True)], tok)
    n = len(ids(tok, prompt))
    assert e.input_ids == ids(tok, prompt) + ids(tok, response) + [tok.eos_token_id]
    assert e.labels == [-100] * n + ids(tok, response) + [tok.eos_token_id]
    assert tok.decode([t for t in e.labels if t != -100]) == response + tok.eos_token


def test_prompt_mask_on_a_real_template(tok):
    e = tokenize_example(NLU, tok)
    prompt, response = prompt_and_response(NLU)
    n = len(ids(tok, prompt))
    assert e.labels[:n] == [-100] * n
    assert e.labels[n:] == e.input_ids[n:] == ids(tok, response) + [tok.eos_token_id]
    assert not e.truncated
    on_prompt = tokenize_example(NLU, tok, train_on_prompt=True)
    assert on_prompt.labels == [-100] + on_prompt.input_ids[1:]  # the first token is never a target


def test_eos_once_after_chat_turns(tok):
    e = tokenize_example(CHAT, tok)
    assert e.input_ids.count(tok.eos_token_id) == 1 and e.input_ids[-1] == tok.eos_token_id
    trained_text = tok.decode([t for t in e.labels if t != -100])
    assert trained_text == "hello<|im_end|>\nblue<|im_end|>\n" + tok.eos_token


def test_truncation_keeps_the_response(tok):
    long = Example("a", "instruction", {"instruction": "word " * 300, "output": "cat red"})
    full = tokenize_example(long, tok)
    e = tokenize_example(long, tok, max_length=64)
    response = ids(tok, "cat red") + [tok.eos_token_id]
    assert e.truncated and len(e.input_ids) == 64
    assert e.input_ids[-len(response):] == response == e.labels[-len(response):]
    assert e.input_ids == full.input_ids[-64:]  # cut from the prompt side only
    assert all(x == -100 for x in e.labels[:-len(response)])
    long_answer = Example("a", "instruction", {"instruction": "Say it.", "output": "red " * 200})
    e = tokenize_example(long_answer, tok, max_length=40)
    prompt_ids = ids(tok, prompt_and_response(long_answer)[0])
    assert e.truncated and len(e.input_ids) == 40
    assert e.input_ids[:10] == prompt_ids[-10:]  # a quarter of the budget keeps the end of the prompt
    assert e.input_ids[10:] == ids(tok, "red " * 200)[:30]  # then the start of the response


def test_bos_once_for_tokenizers_that_add_one(tiny_model_dir):
    tok = bos_tokenizer(tiny_model_dir)
    bos = tok.bos_token_id
    assert tok("a")["input_ids"][0] == bos
    e = tokenize_example(NLU, tok)
    prompt, response = prompt_and_response(NLU)
    assert e.input_ids == [bos] + ids(tok, prompt) + ids(tok, response) + [tok.eos_token_id]
    assert e.labels == [-100] * (1 + len(ids(tok, prompt))) + ids(tok, response) + [tok.eos_token_id]
    chat = tokenize_example(MC, tok, template="chat")  # the chat template already starts with it
    assert chat.input_ids.count(bos) == 2 and chat.input_ids[:2] != [bos, bos]
