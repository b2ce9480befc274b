"""Load a base model and its tokenizer.

`load_model` is the one way rlora loads a causal LM: a hub id or a local folder, with a clear
error when it cannot be had (offline, typo, gated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError, first_line


def resolve_dtype(name: str) -> Any:
    """'auto' = bf16 where a CUDA device supports it, else fp32; or a torch dtype name."""
    import torch

    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
             "float64": torch.float64}
    if name not in table:
        raise UserError(f"model.dtype: unknown dtype {name!r}", "use auto, bfloat16, float16 or float32")
    return table[name]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without one; padding is masked anyway
    return tok


def load_model(name_or_path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa", device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a hub id or a local folder; UserError with a fix when it fails."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if device is not None:
        model.to(device)
    return model, tokenizer


def meta_model(name_or_path: str, *, fix: str, trust_remote_code: bool = False) -> Any:
    """The model's architecture with no weights (meta device): shapes and module names only,
    from its config.json alone. `fix` tells the user what to pass when the config can't be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of model {name_or_path!r}: {first_line(e)}",
                        REMOTE_CODE_FIX if _wants_remote_code(e) else fix) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


REMOTE_CODE_FIX = ("if you trust the model's repository, allow its code: model.trust_remote_code: true "
                   "in the recipe, --trust-remote-code for eval, generate, merge, export and analyze")


def _wants_remote_code(error: Exception) -> bool:
    """transformers refuses a repository with its own code and names the argument in the message."""
    return "trust_remote_code" in str(error)


def _load_error(name: str, error: Exception) -> UserError:
    first = first_line(error)
    if _wants_remote_code(error):
        return UserError(f"model {name!r} needs its repository's own code: {first}", REMOTE_CODE_FIX)
    if Path(name).exists():
        return UserError(f"cannot load a model from {name}: {first}",
                         "give a folder written by save_pretrained (config.json, weights, tokenizer)")
    return UserError(f"cannot load model {name!r}: {first}",
                     "check the hub id, log in for gated models, or pass a local folder "
                     "(offline: HF_HUB_OFFLINE=1 and a downloaded copy)")
