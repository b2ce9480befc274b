"""special_prefix: the ids every tokenized prompt starts with, for training, scoring and generation."""

from __future__ import annotations

import pytest

from rlora_cli.data.pipeline import special_prefix
from rlora_cli.testing import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def with_template(tok, single: str):
    from tokenizers.processors import TemplateProcessing

    names = ["<|im_start|>", "<|endoftext|>"]
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=single, special_tokens=[(n, tok.convert_tokens_to_ids(n)) for n in names])
    return tok


def test_prefix_is_what_comes_before_the_text(tok):
    assert special_prefix(tok) == []  # the tiny tokenizer adds nothing
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert special_prefix(with_template(tok, "<|im_start|> $A")) == [start]
    # a tokenizer that also appends EOS keeps its BOS, and the EOS stays off prompts
    assert special_prefix(with_template(tok, "<|im_start|> $A <|endoftext|>")) == [start]
    assert special_prefix(with_template(tok, "$A <|endoftext|>")) == []
