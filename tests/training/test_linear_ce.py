"""linear_cross_entropy against the plain formula (logits built, F.cross_entropy) in float64:
per-token losses and the hidden states' gradient under any per-token upstream gradient, over
several chunks with a short last one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rlora_cli.training.linear_ce as linear_ce
from rlora_cli.training.linear_ce import linear_cross_entropy, torch_chunk


def _case(T=37, d=16, V=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, d, generator=g, dtype=dtype)
    weight = torch.randn(V, d, generator=g, dtype=dtype) / d**0.5
    labels = torch.randint(0, V, (T,), generator=g)
    labels[:5] = -100  # a prompt
    labels[20:23] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")


# one chunk, 8 rows (5 chunks, the last short), 1 row
@pytest.mark.parametrize("chunk_elements", [1 << 27, 8 * 50, 50])
def test_losses_and_gradients_match_the_plain_formula(monkeypatch, chunk_elements):
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, labels = _case()
    h0 = hidden.clone().requires_grad_(True)
    h1 = hidden.clone().requires_grad_(True)
    want = _reference(h0, weight, labels)
    got = linear_cross_entropy(h1, weight, labels)
    assert got.dtype == torch.float64 and got.shape == (37,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(got.detach()[:5].abs().sum()) == 0.0
    # Any per-token upstream gradient (the loop's is a constant 1/tokens; logging needs none).
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h0.grad, rtol=1e-12, atol=1e-12)
    assert float(h1.grad[:5].abs().sum()) == 0.0  # unlabelled rows get no gradient


def test_without_gradients_only_losses():
    hidden, weight, labels = _case()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(got, _reference(hidden, weight, labels), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def test_no_tokens_gives_an_empty_loss():
    hidden, weight, _ = _case()
    h = hidden[:0].clone().requires_grad_(True)
    loss = linear_cross_entropy(h, weight, torch.zeros(0, dtype=torch.long))
    loss.sum().backward()
    assert loss.shape == (0,) and h.grad.shape == (0, 16)


def test_every_token_unlabelled_gives_zero_loss_and_gradient():
    hidden, weight, labels = _case()
    labels[:] = -100
    h = hidden.requires_grad_(True)
    loss = linear_cross_entropy(h, weight, labels)
    loss.sum().backward()
    assert float(loss.detach().abs().sum()) == 0.0 and float(h.grad.abs().sum()) == 0.0


def test_half_precision_losses_are_float32_and_near_the_float64_ones():
    hidden, weight, labels = _case(dtype=torch.float64)
    got = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(hidden, weight, labels), rtol=3e-2, atol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inputs, bf16 matmuls
        auto = linear_cross_entropy(hidden.float(), weight.float(), labels)
    torch.testing.assert_close(auto.double(), _reference(hidden, weight, labels), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("chunk_elements", [1 << 27, 8 * 50])
def test_a_trained_head_gets_its_gradient_too(monkeypatch, chunk_elements):
    """A tied or trained head: the backward builds the logits again, weighted per token."""
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, labels = _case()
    upstream = torch.rand(37, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = [(hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)) for _ in range(2)]
    (_reference(*leaves[0], labels) * upstream).sum().backward()
    (linear_cross_entropy(*leaves[1], labels) * upstream).sum().backward()
    for want, got in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_the_torch_chunk_writes_the_logits_gradient_in_place():
    """softmax − one-hot on labelled rows, zeros on the others: what Liger's row kernel writes."""
    logits = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, -100, 0, 8, -100, 5])
    losses = torch.zeros(6, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    F.cross_entropy(x, labels, ignore_index=-100, reduction="sum").backward()
    torch_chunk(logits, labels, losses, True)
    torch.testing.assert_close(logits, x.grad, rtol=1e-12, atol=1e-12)
    expected = F.cross_entropy(x.detach(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(losses, expected)
