"""Score and continue text with a causal LM: summed log-likelihoods, and the one batched decoder.

    scores = loglikelihoods(model, tokenizer, [("Q: 2+2?\nA:", [" 4", " 5"])])   # [[Score, Score]]
    texts = decode(model, tokenizer, ["Q: 2+2?\nA:"], until_newline=True)       # greedy, one line

`loglikelihoods(model, tokenizer, [(context, [continuation, ...]), ...])` is the one scorer
behind MMLU, BIG-bench multiple choice, NLU label words and held-out losses. Tokenization follows
lm-evaluation-harness: trailing whitespace of the context moves to the continuation, the
continuation's tokens are those of `encode(context + continuation)` past `encode(context)`, and
exactly those tokens are scored. Rows are right-padded with an attention mask, so a batched score
equals the one-by-one score (up to float rounding); when every candidate of a request is one token
the context is run once and all candidates are read off its last position.

`decode` is what eval and `rlora generate` both continue prompts with: left-padded batches,
greedy or sampled, until EOS (and, for eval's free-form answers, a newline). `task_record` is
shared by every eval task (benchmarks, the recipe's held-out tasks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import StoppingCriteriaList, TextStreamer

from rlora_cli.data.packing import IGNORE, pad_batch, pad_id
from rlora_cli.data.pipeline import special_prefix

Progress = Callable[[int], None]


class Score(NamedTuple):
    """Summed log-probability of a continuation's tokens, and how many tokens that was."""

    logprob: float
    n_tokens: int


@dataclass
class _Row:
    """One forward pass input and what to read from it: (request, candidate, first position, targets)."""

    ids: list[int]
    reads: list[tuple[int, int, int, list[int]]]


def encode_pair(tokenizer: Any, context: str, continuation: str,
                prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-eval's rules; never an empty context."""
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    n_space = len(context) - len(context.rstrip())
    if n_space:  # "Answer: " + "A" scores " A": BPE vocabularies put the space on the word
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx:
        cont = whole[len(ctx):]
    else:  # a merge across the boundary: score the continuation's own tokens after the context
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx:  # something must predict the first continuation token
        ctx = [_fallback_token(tokenizer)]
    return ctx, list(cont)


def _fallback_token(tokenizer: Any) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return tid
    return 0


def max_length(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes: its position limit, or the tokenizer's if smaller."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return int(limit)


def _rows(tokenizer: Any, requests: Sequence[tuple[str, Sequence[str]]], limit: int) -> list[_Row]:
    prefix = special_prefix(tokenizer)
    rows = []
    for i, (context, continuations) in enumerate(requests):
        pairs = [encode_pair(tokenizer, context, c, prefix) for c in continuations]
        if any(not cont for _, cont in pairs):
            raise ValueError(f"request {i}: a continuation encodes to no tokens ({continuations!r})")
        if all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs):
            ids = pairs[0][0][-limit:]  # one pass; every candidate is read at the last position
            rows.append(_Row(ids, [(i, j, len(ids) - 1, cont) for j, (_, cont) in enumerate(pairs)]))
            continue
        for j, (ctx, cont) in enumerate(pairs):
            ids = (ctx + cont)[:-1][-limit:]  # truncate from the left, as lm-eval does
            rows.append(_Row(ids, [(i, j, len(ids) - len(cont), cont)]))
    return rows


def _batches(items: Sequence[Any], batch_size: int, key: Callable[[Any], int]) -> list[list[Any]]:
    """Items in batches of `batch_size`, longest first, so each batch holds similar lengths."""
    ordered = sorted(items, key=key, reverse=True)
    step = max(1, batch_size)
    return [ordered[i:i + step] for i in range(0, len(ordered), step)]


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, Sequence[str]]], *,
                   batch_size: int = 8, progress: Progress | None = None) -> list[list[Score]]:
    """For each (context, continuations) request, the Score of every continuation given the context.

    `progress(k)` is called after each batch with the number of requests it finished.
    """
    limit = max_length(model, tokenizer)
    rows = _rows(tokenizer, requests, limit)
    out: list[list[Score | None]] = [[None] * len(c) for _, c in requests]
    left = [len(c) for _, c in requests]
    pad, device = pad_id(tokenizer), _model_device(model)
    keep_ok = _accepts(model, "logits_to_keep")
    for batch in _batches(rows, batch_size, key=lambda r: len(r.ids)):
        # right padding: real tokens keep positions 0..L-1
        inputs = pad_batch([r.ids for r in batch], pad)
        width = inputs["input_ids"].shape[1]
        first = min(pos for r in batch for _, _, pos, _ in r.reads)
        kwargs = {"logits_to_keep": width - first} if keep_ok else {}
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, **kwargs).logits
        offset = width - logits.shape[1]  # logits cover positions offset..width-1
        done = 0
        for b, r in enumerate(batch):
            for i, j, pos, targets in r.reads:
                span = logits[b, pos - offset:pos - offset + len(targets)].float().log_softmax(-1)
                lp = span.gather(-1, torch.tensor(targets, device=span.device)[:, None]).sum().item()
                out[i][j] = Score(lp, len(targets))
                left[i] -= 1
                done += left[i] == 0
        if progress is not None:
            progress(done)
    return out  # type: ignore[return-value]


@torch.no_grad()
def label_losses(model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
                 batch_size: int = 8, progress: Progress | None = None) -> list[Score]:
    """Score of each (input_ids, labels) row as the trainer sees it: labels are aligned with
    input_ids, -100 where untrained; logprob sums the trained tokens (shifted: token t+1 given ≤ t)."""
    device = _model_device(model)
    out: list[Score | None] = [None] * len(rows)
    for chunk in _batches(range(len(rows)), batch_size, key=lambda k: len(rows[k][0])):
        inputs = pad_batch([rows[k][0] for k in chunk], pad_id, labels=[rows[k][1] for k in chunk])
        labels = inputs.pop("labels")
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        for b, k in enumerate(chunk):
            targets = labels[b, 1:].to(device)
            trained = targets != IGNORE  # only those positions' log-softmax is ever built
            picked = logits[b, :-1][trained].float().log_softmax(-1)
            lp = picked.gather(-1, targets[trained][:, None]).sum().item()
            out[k] = Score(lp, int(trained.sum().item()))
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the decoder


class _StopAtNewline:
    """Stop a row once its new text holds a newline (EOS is handled by generate itself)."""

    def __init__(self, tokenizer: Any, start: int) -> None:
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


@torch.no_grad()
def decode(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
           until_newline: bool = False, stream: bool = False, progress: Progress | None = None) -> list[str]:
    """The continuation of each prompt up to EOS (not included): greedy, or sampled (seeded) when
    `temperature` > 0; with `until_newline`, only its first line (eval's free-form answers).

    Batches are left-padded so every row continues at the same column, and a batched decode
    equals the one-by-one decode. A prompt too long for the model keeps its last tokens.
    `stream` prints tokens to stdout as they come (one prompt at a time).
    """
    if temperature > 0:
        torch.manual_seed(seed)
    encoded = _encode_prompts(tokenizer, prompts, max_length(model, tokenizer) - max_new_tokens)
    eos = stop_ids(model, tokenizer)
    settings = _settings(max_new_tokens, temperature, top_p, pad=pad_id(tokenizer), eos=eos)
    out: list[str] = [""] * len(prompts)
    device = _model_device(model)
    for chunk in _batches(range(len(prompts)), 1 if stream else batch_size, key=lambda k: len(encoded[k])):
        inputs = pad_batch([encoded[k] for k in chunk], settings["pad_token_id"], side="left")
        width = inputs["input_ids"].shape[1]
        extra: dict[str, Any] = {}
        if until_newline:
            extra["stopping_criteria"] = StoppingCriteriaList([_StopAtNewline(tokenizer, width)])
        if stream:
            extra["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        new = model.generate(**{k: v.to(device) for k, v in inputs.items()}, **settings, **extra)[:, width:]
        for b, k in enumerate(chunk):
            row = new[b].tolist()
            end = next((n for n, t in enumerate(row) if t in eos), len(row))
            text = tokenizer.decode(row[:end], skip_special_tokens=True)
            out[k] = text.split("\n", 1)[0] if until_newline else text
        if progress is not None:
            progress(len(chunk))
    return out


def _settings(max_new_tokens: int, temperature: float, top_p: float, *, pad: int,
              eos: list[int]) -> dict[str, Any]:
    """`generate` keywords. Explicit values override a checkpoint's sampling defaults (Qwen ships
    repetition_penalty and top_k), so greedy is plain greedy and sampling plain temperature + top-p."""
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
                else dict(do_sample=False))
    return dict(num_beams=1, max_new_tokens=max_new_tokens, repetition_penalty=1.0, pad_token_id=pad,
                eos_token_id=eos or None, **sampling)


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], keep: int) -> list[list[int]]:
    """Each prompt's ids as training encodes them (the special prefix unless a chat template
    already wrote BOS), its last `keep` tokens at most (all when `keep` < 1: no room is left for
    new tokens anyway), never empty."""
    prefix, bos = special_prefix(tokenizer), getattr(tokenizer, "bos_token", None)
    encoded = []
    for p in prompts:
        head = [] if bos and p.startswith(bos) else prefix
        ids = head + tokenizer(p, add_special_tokens=False)["input_ids"]
        encoded.append((ids[-keep:] if keep > 0 else ids) or [_fallback_token(tokenizer)])
    return encoded


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (chat models add one)."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


# ------------------------------------------------------------------ shared by the eval tasks


def task_record(correct: list[bool], **extra: Any) -> dict[str, Any]:
    """A task's accuracy over its scored examples (None when there were none) and their count."""
    return {"accuracy": sum(correct) / len(correct) if correct else None, "n": len(correct), **extra}
