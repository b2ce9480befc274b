"""Scoring against references: log-likelihoods equal a one-by-one plain forward, batched or not;
the decoder's greedy first line equals transformers' own `generate`, batched or not."""

from __future__ import annotations

import evalkit
import pytest
from evalkit import reference_generate, reference_loglik

from rlora_cli.eval.scoring import decode, encode_pair, loglikelihoods

one_thread = evalkit.one_thread  # a shared fixture, found by pytest under this name


def test_encode_pair_moves_trailing_space_to_the_continuation(lm):
    _, tok = lm
    ctx, cont = encode_pair(tok, "Q: red cat\nA: ", "yes")
    assert ctx == tok("Q: red cat\nA:")["input_ids"]
    assert ctx + cont == tok("Q: red cat\nA: yes")["input_ids"]


def test_loglikelihoods_match_reference_and_batching(lm):
    model, tok = lm
    single = ["A", "B", "C", "D"]  # one byte-level token each after ":" (the tiny BPE splits " A")
    assert all(len(encode_pair(tok, "Red blue:", c)[1]) == 1 for c in single)
    requests = [
        ("The following is a question about the sun.\nAnswer:", [" A", " B", " C", " D"]),
        ("Q: how many dogs\nA: ", ["three", "two dogs", "3"]),
        ("Red blue:", single),  # every candidate one token: one pass over the context
        ("x", ["y z"]),
        ("A much longer context " * 12, [" end", " of the text."]),
    ]
    batched = loglikelihoods(model, tok, requests, batch_size=16)
    one = loglikelihoods(model, tok, requests, batch_size=1)
    for (context, conts), row_b, row_1 in zip(requests, batched, one):
        for cont, b, o in zip(conts, row_b, row_1):
            assert b.n_tokens == o.n_tokens and b.n_tokens >= 1
            assert b.logprob == pytest.approx(o.logprob, abs=1e-5)
            assert b.logprob == pytest.approx(reference_loglik(model, tok, context, cont), abs=1e-4)



def test_greedy_first_line_matches_model_generate_batched_or_not(lm):
    model, tok = lm
    prompts = ["\nQ: red cat\nA: ", "The sun is", "x",
               "\nQ: a much longer question about the river and the moon?\nA:"]
    reference = [reference_generate(model, tok, p) for p in prompts]
    assert decode(model, tok, prompts, until_newline=True, batch_size=1) == reference
    assert decode(model, tok, prompts, until_newline=True, batch_size=4) == reference
