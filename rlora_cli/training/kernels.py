"""Optional fused kernels for training: `train.kernels: auto | liger | fused | none`.

`fused` is `auto` plus the adapters' own Triton path (adapters/fused.py): each adapted Linear's
base GEMM carries the low-rank delta in its epilogue, and dropout masks are drawn in-kernel. It
runs eagerly on CUDA (and on the CPU under Triton's interpreter, TRITON_INTERPRET=1, for tests);
elsewhere, without Triton, or inside compiled blocks the layers keep the plain path, and the
banner says so.

Packed rows (data.packing) under sdpa attend through a block-diagonal causal mask that
transformers builds from the position ids; the attention kernel then computes every masked-out
block of the row anyway. `auto` and `liger` run them through torch's variable-length flash
attention instead (`torch.nn.attention.varlen`), which computes only each example's own causal
triangle: the same attention, a fraction of the work (see `packed_attention`).

Liger's Triton kernels (RoPE, RMSNorm, SwiGLU) replace the model's own on CUDA for the
architectures Liger supports, and the loss is computed from the last hidden states chunk by chunk
with Liger's cross-entropy row kernel (linear_ce.py), so the [tokens × vocab] logits are never
stored and the host never waits for the GPU. `auto` uses them when it can and says why not
otherwise; `liger` that cannot be honoured is a user error. Liger is imported only here and in
linear_ce.py, only when used.

The fused loss is installed as the model's own `forward` (called with `rlora_labels=`), so it
runs inside whatever wraps the model (DDP, FSDP, torch.compile) exactly as the plain forward does.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlora_cli.adapters import fused
from rlora_cli.data.packing import IGNORE
from rlora_cli.errors import UserError
from rlora_cli.training.linear_ce import linear_cross_entropy

INSTALL_HINT = 'pip install "rlora[gpu]" (liger-kernel)'
# Config keys that change the logits after the output head; the fused loss would skip them.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class Kernels:
    note: str
    """One line for the start banner: what runs, or why Liger is off."""
    fused_loss: bool = False
    """The loss comes from the fused linear cross-entropy (call `token_losses(fused=True)`)."""
    packed_attention: bool = False
    """Packed rows attend through varlen flash attention: batches need `rlora_cu_seq_lens`
    (`collate(..., cu_seq_lens=True)`)."""


def apply_kernels(model: Any, kernels: str, device: Any, *, compiled: bool = False,
                  packed_length: int | None = None) -> Kernels:
    """Patch `model` in place where possible (after the adapters are injected, before compiling).

    With `compiled` (train.compile), `auto` takes only the fused cross-entropy: inside a compiled
    block Liger's Triton RoPE, RMSNorm and SwiGLU break the graph, while the compiler fuses the
    model's own versions of them (measured faster, benchmarks/RESULTS.md). `liger` takes all of them.
    `packed_length` (data.max_length when rows are packed) switches packed attention to varlen
    flash attention where it can.
    """
    if kernels == "none":
        return Kernels("none (train.kernels: none)")
    if kernels == "fused":  # auto's kernels, and the adapters' own fused Triton path
        result = apply_kernels(model, "auto", device, compiled=compiled, packed_length=packed_length)
        return replace(result, note=f"{result.note}; {fused_adapters(model, device, compiled)}")
    varlen_off = None if packed_length is None else packed_attention(model, device, packed_length)
    result = _liger(model, kernels, device, compiled)
    if varlen_off is None:
        return result
    if varlen_off:  # why not, for the banner
        return Kernels(f"{result.note}; packed rows through the model's own attention ({varlen_off})",
                       result.fused_loss)
    return Kernels(f"{result.note}; packed rows through varlen flash attention", result.fused_loss, True)


def fused_adapters(model: Any, device: Any, compiled: bool) -> str:
    """Switch the adapted layers to the fused Triton path (adapters/fused.py) where it can run;
    the banner's words for what happened. Layers it cannot serve at a call run the plain path."""
    if fused.K is None:
        return "fused adapters off: triton is not installed (plain path)"
    if getattr(device, "type", str(device)) != "cuda" and not fused.K.INTERPRETED:
        return "fused adapters off: no CUDA device (plain path)"
    if compiled:
        return "fused adapters off: train.compile traces the plain path"
    on, never = fused.enable(model)
    rest = "".join(f"; {n} on the plain path ({why})" for why, n in never.items())
    return f"fused Triton adapters on {on} layers{rest}"


def _liger(model: Any, kernels: str, device: Any, compiled: bool) -> Kernels:
    reason = _unavailable(model, device)
    if reason:
        if kernels == "liger":
            install = ", or " + INSTALL_HINT if "installed" in reason else ""
            raise UserError(f"train.kernels: liger cannot be used: {reason}",
                            f"use kernels: auto or none{install}")
        return Kernels(f"none (Liger off: {reason})")
    ops = not (compiled and kernels == "auto")
    if ops:
        _liger_ops(model)
    what = "RoPE, RMSNorm, SwiGLU; " if ops else ""
    head_problem = _plain_head_problem(model)
    if head_problem:
        if not ops:
            return Kernels(f"none (Liger's cross-entropy unfused: {head_problem}; "
                           "the compiler fuses the rest)")
        return Kernels(f"Liger ({what}cross-entropy unfused: {head_problem})")
    install_fused_loss(model)
    rest = "" if ops else "; RoPE, RMSNorm, SwiGLU left to torch.compile"
    return Kernels(f"Liger ({what}fused linear cross-entropy{rest})", fused_loss=True)


def _liger_ops(model: Any) -> None:
    """Liger's RoPE, RMSNorm and SwiGLU on this model only.

    Liger also rebinds names in the modeling file: its classes, which only models built later
    would use, are put back; its functions (the RoPE), which this model looks up at call time,
    stay."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    home = sys.modules[type(model).__module__]
    classes = {k: v for k, v in vars(home).items() if isinstance(v, type)}
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    for key, cls in classes.items():
        if getattr(home, key) is not cls:
            setattr(home, key, cls)


def _unavailable(model: Any, device: Any) -> str | None:
    if getattr(device, "type", str(device)) != "cuda":
        return "no CUDA device"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel is not installed"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger does not support model type {model_type!r}"
    return None


def _plain_head_problem(model: Any) -> str | None:
    """Why the logits are not just `hidden · Wᵀ` for this model (None when they are)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return "the output head is not a bias-free Linear"
    for key in _HEAD_TRANSFORMS:
        value = getattr(model.config, key, None)
        if value not in (None, 0, 1, 1.0):
            return f"the model rescales its logits ({key})"
    return None


# ------------------------------------------------------------------------- packed attention

PACKED_ATTENTION = "rlora_varlen"
# Models whose attention calls the interface plainly (no logit softcapping, no attention sinks).
_VARLEN_MODELS = ("llama", "mistral", "qwen2", "qwen3")
_HALF = (torch.float16, torch.bfloat16)
# How grouped-query attention (fewer key/value heads than query heads) reaches varlen flash
# attention, which groups heads itself: "flag" (torch >= 2.12: varlen_attn(enable_gqa=True)),
# "op" (torch 2.11: its public function has no such flag, the op under it takes the heads as
# they are), or "" (repeated by hand: a [T, H, D] copy of keys and values each way per layer).
_VARLEN_GQA = ""


def packed_attention(model: Any, device: Any, packed_length: int) -> str:
    """Make `model` attend through varlen flash attention; "" when it does, else why not.

    The model then wants `rlora_cu_seq_lens` (from `collate(..., cu_seq_lens=True)`) with every
    batch. Its attention mask is no longer built (transformers skips mask creation for an
    attention it does not know), which is also one host sync per forward fewer: transformers'
    packed-row detection reads a GPU value back. Without the bounds a batch attends plain causal,
    which is right only for rows padded on the right (the training loop's): a model switched here
    is for training, not for left-padded generation."""
    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    reason = ("no CUDA device" if getattr(device, "type", str(device)) != "cuda"
              else "the model's attention is not sdpa" if config._attn_implementation != "sdpa"
              else f"model type {config.model_type!r} not supported"
              if config.model_type not in _VARLEN_MODELS
              else "sliding-window attention" if window and window < packed_length
              else "attention dropout" if getattr(config, "attention_dropout", 0.0)
              else None)
    if reason is None:
        try:
            from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10
        except ImportError:
            reason = f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if reason:
        return reason
    global _VARLEN_GQA  # read inside compiled blocks, so decided here, once
    _VARLEN_GQA = ("flag" if "enable_gqa" in inspect.signature(varlen_attn).parameters
                   else "op" if hasattr(torch.ops.torch_attn, "_varlen_attn") else "")

    AttentionInterface.register(PACKED_ATTENTION, _varlen_attention)
    config._attn_implementation = PACKED_ATTENTION
    return ""


def _varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      rlora_cu_seq_lens: torch.Tensor | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q [B, H, S, D], k and v [B, KV, S, D] -> ([B, S, H, D], None).

    `rlora_cu_seq_lens` [N+1] int32 are the boundaries of the causal segments of the flattened
    rows (trailing repeats are empty segments that keep the shape static for the compiler)."""
    B, H, S, D = query.shape
    if rlora_cu_seq_lens is None or not _flash_ok(query):
        # The same attention written out: sdpa under the block-diagonal causal mask (CPU, fp32).
        mask = None if rlora_cu_seq_lens is None else block_causal_mask(rlora_cu_seq_lens, B, S)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = lambda t: t.transpose(1, 2).reshape(B * S, t.shape[1], D)  # noqa: E731  (a view for q)
    out = _varlen(rows(query), rows(key), rows(value), rlora_cu_seq_lens, S, scaling)
    return out.view(B, S, H, D), None


def _flash_ok(query: torch.Tensor) -> bool:
    return query.device.type == "cuda" and query.dtype in _HALF


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
            scale: float | None) -> torch.Tensor:
    """Causal flash attention within each segment of the flattened rows, [T, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    gqa = k.shape[1] != q.shape[1]
    if gqa and _VARLEN_GQA == "op":
        return torch.ops.torch_attn._varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale,
                                                 window_size=[-1, 0])[0]
    if gqa and not _VARLEN_GQA:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    extra = {"enable_gqa": True} if gqa and _VARLEN_GQA == "flag" else {}
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), **extra)


def block_causal_mask(cu: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """[rows, 1, length, length] bool: token i sees token j iff j ≤ i in the same segment."""
    pos = torch.arange(rows * length, device=cu.device, dtype=cu.dtype)
    seg = torch.searchsorted(cu, pos, right=True).view(rows, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


# ------------------------------------------------------------------------------ fused loss


def install_fused_loss(model: Any) -> None:
    """Give `model` a forward that, called with `rlora_labels`, returns the next-token loss of
    every token [B, S-1] computed from the hidden states by linear_ce.linear_cross_entropy
    instead of logits; without `rlora_labels` it is the model's own forward (generation, eval)."""
    plain = model.forward

    def forward(self: Any, *args: Any, rlora_labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if rlora_labels is None:
            return plain(*args, **kwargs)
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        # Every position against the next token (none after the last): no copy of the hidden states.
        labels = torch.nn.functional.pad(rlora_labels[:, 1:], (0, 1), value=IGNORE)
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.get_output_embeddings().weight,
                       labels.reshape(-1))
        return loss.view(labels.shape)[:, :-1]

    model.forward = types.MethodType(forward, model)


# ------------------------------------------------------------------------------- compile


def compile_model(model: Any, mode: str = "default") -> str:
    """torch.compile the decoder blocks in place (regional compilation), or the whole model when
    it has no block list; returns one line for the banner.

    Why blocks: every block has the same code, so one compiled graph serves them all (compile
    time of one block, not of the model), and inside it the adapter's small rank-space ops
    (casts, dropout, gating, the router softmax) fuse into a few kernels, which is what cuts the
    host's launch work per adapted layer. The loss (fused or not) and the embeddings stay eager.
    Compiling in place keeps parameter names, so checkpoints look the same as eager ones.
    """
    blocks = decoder_blocks(model)
    if blocks is None:
        model.compile(mode=mode)
        return f"whole model (mode {mode})"
    for block in blocks:
        block.compile(mode=mode)
    return f"{len(blocks)} decoder blocks (mode {mode})"


def decoder_blocks(model: Any) -> Any:
    """The ModuleList of decoder blocks (Llama/Qwen/Mistral `layers`, GPT-2 `h`), or None."""
    get_decoder = getattr(model, "get_decoder", None)  # transformers models have it; others: the whole model
    decoder = get_decoder() if get_decoder else model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    return None
