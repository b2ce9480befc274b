"""Next-token cross-entropy straight from the last hidden states: `linear_cross_entropy`.

The logits of a step are [tokens × vocab]: for 8×1024 tokens and Llama-3's 128k vocabulary,
2 GiB in bf16 and twice that in fp32. Here they are built a chunk of tokens at a time, turned
into their gradient in place while the loss is taken, and multiplied back into the hidden
states' gradient before the next chunk reuses the buffer; only that gradient is kept for the
backward pass.

Unlike Liger's fused linear cross-entropy, whose row kernel this uses on CUDA, nothing here
reads a value back from the GPU (Liger counts the labelled tokens with `.item()` and compares
the upstream gradient with 1.0 on the host: two waits for the GPU every step, after which the
host's launches no longer run ahead of it), and the loss of every token comes out, so the
training loop's per-task losses cost nothing extra: the backward scales each token's gradient
by its own upstream gradient, which is exact, because a token's hidden state reaches only its
own logits.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from rlora_cli.data.packing import IGNORE

# Rows per chunk: the largest power of two whose logits fit this many elements (256 MiB in
# bf16): 1024 rows for a 128k vocabulary, 512 for Qwen's 152k. Bigger chunks mean fewer
# launches; this bounds the memory whatever the batch.
CHUNK_ELEMENTS = 1 << 27

# (logits [rows, V], labels [rows], losses [rows]) -> None: writes each row's loss (0 where the
# label is IGNORE) and, when asked, overwrites the logits with d loss / d logits.
ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [T] (float32, or float64 for float64 inputs) of `hidden` [T, d]
    · `weight`ᵀ [d, V] against `labels` [T], 0 where the label is -100."""
    # Liger's kernel computes in fp32: float64 stays with torch.
    liger = hidden.is_cuda and hidden.dtype != torch.float64 and _liger_kernel() is not None
    chunk_fn = liger_chunk if liger else torch_chunk
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_fn)


class _LinearCrossEntropy(torch.autograd.Function):
    """With a frozen head (adapter training) the hidden states' gradient is computed in the
    forward pass, while each chunk's logits are at hand, and the backward only scales it. A
    trained head's gradient sums over tokens, so it needs the upstream gradient first: the
    backward then builds the logits again."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_fn: ChunkFn) -> torch.Tensor:
        device_type = hidden.device.type
        # The matmuls write into buffers (out=), which autocast does not see: cast here.
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        losses = torch.zeros(h.shape[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                             device=h.device)
        ctx.dtypes, ctx.chunk_fn = (hidden.dtype, weight.dtype), chunk_fn
        if ctx.needs_input_grad[1]:
            _sweep(h, w, labels, chunk_fn, losses)
            ctx.save_for_backward(h, w, labels)
        else:
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            _sweep(h, w, labels, chunk_fn, losses, grad_h=grad_h)
            ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any,
                 upstream: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden_dtype, weight_dtype = ctx.dtypes
        if not ctx.needs_input_grad[1]:
            (grad_h,) = ctx.saved_tensors
            # fp32 product (the loop's upstream gradient is ~1/tokens), rounded once.
            return None if grad_h is None else (grad_h * upstream[:, None]).to(hidden_dtype), None, None, None
        h, w, labels = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.float64 if w.dtype == torch.float64 else torch.float32,
                             device=w.device)
        _sweep(h, w, labels, ctx.chunk_fn, torch.zeros(h.shape[0], dtype=upstream.dtype, device=h.device),
               grad_h=grad_h, grad_w=grad_w, upstream=upstream)
        return (None if grad_h is None else grad_h.to(hidden_dtype)), grad_w.to(weight_dtype), None, None


def _sweep(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk_fn: ChunkFn, losses: torch.Tensor,
           grad_h: torch.Tensor | None = None, grad_w: torch.Tensor | None = None,
           upstream: torch.Tensor | None = None) -> None:
    """One pass over the token chunks: `losses`, and the gradients asked for (rows weighted by
    `upstream`, when given), written into the tensors passed."""
    T, V = h.shape[0], w.shape[0]
    grads = grad_h is not None or grad_w is not None
    rows = max(1, min(T, 1 << max((CHUNK_ELEMENTS // V).bit_length() - 1, 0)))
    logits = torch.empty(rows, V, dtype=h.dtype, device=h.device)
    for start in range(0, T, rows):
        part = slice(start, start + rows)
        buf = logits[:h[part].shape[0]]
        torch.mm(h[part], w.t(), out=buf)
        chunk_fn(buf, labels[part], losses[part], grads)
        if upstream is not None:
            buf.mul_(upstream[part, None])
        if grad_h is not None:
            torch.mm(buf, w, out=grad_h[part])
        if grad_w is not None:
            grad_w += (buf.t() @ h[part]).to(grad_w.dtype)


def torch_chunk(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, grads: bool) -> None:
    """The chunk's loss and logits gradient in plain torch (CPU, or CUDA without Liger)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    labelled = labels != IGNORE
    target = torch.where(labelled, labels, 0)[:, None]
    lse = torch.logsumexp(x, dim=-1)
    losses.copy_(torch.where(labelled, lse - x.gather(1, target)[:, 0], 0.0))
    if grads:
        p = torch.exp(x - lse[:, None])
        p.scatter_add_(1, target, torch.full_like(target, -1, dtype=p.dtype))
        logits.copy_(p * labelled[:, None])


def liger_chunk(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, grads: bool) -> None:
    """The same, in one Triton kernel launch: Liger's cross-entropy row kernel (online softmax,
    gradient written over the logits). Called with reduction "sum", where it divides by
    nothing, so it needs no token count (Liger's own callers read that count on the host)."""
    kernel, max_block = _liger_kernel()
    V = logits.shape[1]
    kernel[(logits.shape[0],)](
        X_ptr=logits, X_stride=logits.stride(0), Y_ptr=labels, Y_stride=labels.stride(0),
        loss_ptr=losses, loss_stride=losses.stride(0), n_cols=V,
        BLOCK_SIZE=min(max_block, 1 << (V - 1).bit_length()), HAS_GRADIENTS=grads, **_KERNEL_FIXED,
        num_warps=16 if torch.version.hip else 32)


# The row kernel's parameters (liger-kernel 0.8.x): these fixed ones, and those liger_chunk
# passes per call. The kernel is internal to Liger: when another release changes its
# parameters, torch_chunk runs instead.
_KERNEL_FIXED = dict(weight_ptr=None, z_loss_ptr=None, token_accuracy_ptr=None, token_accuracy_stride=0,
                     predicted_tokens_ptr=None, predicted_tokens_stride=0, n_non_ignore=1.0,
                     sum_non_ignore_weight=1.0, weight_sum=0.0, ignore_index=IGNORE, lse_square_scale=0.0,
                     label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False,
                     RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False,
                     HAS_SOFTCAPPING=False)
_KERNEL_PER_CALL = ("X_ptr", "X_stride", "Y_ptr", "Y_stride", "loss_ptr", "loss_stride", "n_cols",
                    "BLOCK_SIZE", "HAS_GRADIENTS")


@functools.cache
def _liger_kernel() -> tuple[Any, int] | None:
    """Liger's row kernel and its largest block, or None when liger-kernel is not installed or
    its kernel takes other parameters than liger_chunk passes."""
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
        from liger_kernel.ops.fused_linear_cross_entropy import MAX_FUSED_SIZE
    except ImportError:
        return None
    if set(getattr(liger_cross_entropy_kernel, "arg_names", ())) != {*_KERNEL_FIXED, *_KERNEL_PER_CALL}:
        return None
    return liger_cross_entropy_kernel, MAX_FUSED_SIZE
