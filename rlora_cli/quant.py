"""A bitsandbytes-quantized base turned back into plain Linears, so a QLoRA adapter can be merged.

    model = dequantized_base("runs/base", QuantizationConfig(bits=4), "bfloat16")
    load_adapter(model, "runs/qlora/adapter")
    merge_adapters(model)                        # W' + ΔW, then save_pretrained as usual

An adapter trained over a quantized base learned against W' = dequant(W_q), not the original W.
`dequantized_base` loads the base quantized exactly as training did (`model.load_model` with the
adapter's recorded `quantization`), then `dequantize_model` puts a plain nn.Linear holding W' in
place of every quantized Linear, computed by bitsandbytes' own dequantize functions. The merged
weight W' + ΔW is then the function the adapter trained, up to one rounding to the merged dtype
(and, for 8-bit, LLM.int8()'s rounding of the activations, which a merged model no longer does).
bitsandbytes is imported here only when a quantized model is met: it is an optional extra.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlora_cli.adapters.inject import is_quantized
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.model import load_model, resolve_dtype


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized Linear by its path (inside an adapter too: `...q_proj.base`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)}


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W' [out, in] of a bitsandbytes Linear4bit or Linear8bitLt, as its forward uses it: 4-bit
    in the dtype the weights were loaded in, 8-bit in float32 (int8 rows times their scales)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Params4bit
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for an inference-only CPU kernel after an eval forward.
            raise ValueError("this 4-bit weight was repacked for CPU inference; dequantize a freshly "
                             "loaded model (dequantized_base)")
        return bnbf.dequantize_4bit(weight.data, state)
    scales = getattr(weight, "SCB", None)  # Int8Params: the row scales move to the module's state
    if scales is None:                     # after its first forward
        scales = module.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scales)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every quantized Linear of `model` (in place) by a plain nn.Linear holding W' in
    `dtype`, and forget the quantization, so save_pretrained writes an ordinary model. Returns
    the model; the rest of its weights keep their dtype."""
    for name, module in quantized_linears(model).items():
        with torch.device("meta"):  # no throwaway random init of a full-size weight
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = nn.Parameter(dequantized_weight(module).to(dtype), requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        plain.train(module.training)
        model.set_submodule(name, plain)
    _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Drop what transformers keeps about the quantization (its config entry above all, which
    would make a reload quantize again)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


def dequantized_base(base: str, quantization: QuantizationConfig, dtype: str,
                     *, trust_remote_code: bool = False, device: Any = None) -> nn.Module:
    """The base loaded quantized as in training (on CUDA when there is one, as training ran),
    every quantized Linear then dequantized into `dtype`; in eval mode. The unquantized weights
    (embeddings, norms, LM head) load in `dtype` too."""
    model, _ = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code, device=device,
                          quantization=quantization)
    return dequantize_model(model, resolve_dtype(dtype)).eval()
