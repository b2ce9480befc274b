"""Optional fused kernels for training: `train.kernels: auto | liger | none`.

Liger's Triton kernels (RoPE, RMSNorm, SwiGLU) replace the model's own on CUDA for the
architectures Liger supports. `auto` uses them when it can and says why not otherwise; `liger`
that cannot be honoured is a user error. Liger is imported only here, only when asked for.
"""

from __future__ import annotations

from typing import Any

from rlora_cli.errors import UserError

INSTALL_HINT = 'pip install "rlora[gpu]" (liger-kernel)'


def apply_kernels(model: Any, kernels: str, device: Any) -> str:
    """Patch `model` in place where possible; returns one line for the start banner."""
    if kernels == "none":
        return "none (train.kernels: none)"
    reason = _unavailable(model, device)
    if reason:
        if kernels == "liger":
            raise UserError(f"train.kernels: liger cannot be used: {reason}",
                            f"use kernels: auto or none{'' if 'installed' not in reason else ', or ' + INSTALL_HINT}")
        return f"none (Liger off: {reason})"
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return "Liger (RoPE, RMSNorm, SwiGLU)"


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
