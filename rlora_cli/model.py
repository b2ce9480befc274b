"""Load a base model and its tokenizer, and an adapter on top.

    model, tokenizer = load_model("Qwen/Qwen2.5-0.5B", dtype="bf16")
    model, tokenizer, info = load_with_adapter(None, "runs/mixed/adapter")   # the adapter's own base

`load_model` is the one way rlora loads a causal LM: a hub id or a local folder, with a clear
error when it cannot be had (offline, typo, gated), quantized by bitsandbytes when the recipe's
`model.quantization` asks (QLoRA; `rlora_cli/quant.py` dequantizes it again for merging).
`load_with_adapter` is what eval, generate and analyze load: a base (given, else the one the
adapter records, else a default) with the adapter applied, quantized as it was in training; it
prints nothing and returns what it found worth saying in `LoadInfo.warnings`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from rlora_cli.checkpoint import check_remote_code, load_adapter, read_adapter_config, recorded_base
from rlora_cli.config import canonical_dtype
from rlora_cli.config.model import QuantizationConfig
from rlora_cli.errors import UserError, first_line


def resolve_dtype(name: str, where: str = "model.dtype") -> torch.dtype:
    """The torch dtype for any spelling `config.canonical_dtype` accepts (bf16 = bfloat16);
    'auto' = bf16 where a CUDA device supports it, else fp32. `where` names the key or flag."""
    if name == "float64":  # not offered to users; tests compare against float64 references
        return torch.float64
    name = canonical_dtype(name, where)
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without one; padding is masked anyway
    return tok


def load_model(name_or_path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa", device: Any = None,
               quantization: QuantizationConfig | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a hub id or a local folder; UserError with a fix when it fails.
    With `quantization` the Linear layers load quantized by bitsandbytes (not the LM head, which
    transformers keeps as loaded), straight onto `device` (default: CUDA when there is one)."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        # A quantized model cannot be moved after loading: bitsandbytes quantizes as it places.
        place = device if device is not None else default_device()
        kwargs["quantization_config"] = bnb_config(quantization, cpu=torch.device(place).type == "cpu")
        kwargs["device_map"] = {"": place}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    except (ImportError, RuntimeError) as e:  # bitsandbytes without a backend for this device
        if quantization is None or isinstance(e, torch.OutOfMemoryError):
            raise
        raise UserError(f"model.quantization: bitsandbytes cannot quantize here: {first_line(e)}",
                        "run on a CUDA GPU (or update bitsandbytes), or drop model.quantization") from None
    if device is not None and quantization is None:
        model.to(device)
    return model, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# bitsandbytes' CPU backend runs the 4-bit forward and backward (nf4 and fp4) from 0.47 on;
# 0.45 fails its first 4-bit forward on the CPU, 0.46 refuses fp4 there.
CPU_BITSANDBYTES = "0.47"


def bnb_config(q: QuantizationConfig, *, cpu: bool = False) -> BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig for the recipe's `model.quantization` (as PEFT and
    LLaMA-Factory users write it); UserError when bitsandbytes is not installed, or is too old to
    run on the CPU when `cpu`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.quantization needs bitsandbytes, which is not installed",
                        "pip install 'rlora[qlora]' (or drop model.quantization)")
    installed = importlib.metadata.version("bitsandbytes")
    if cpu and Version(installed) < Version(CPU_BITSANDBYTES):
        raise UserError(f"model.quantization on the CPU needs bitsandbytes >= {CPU_BITSANDBYTES} "
                        f"(installed: {installed})", "pip install -U bitsandbytes, or train on a CUDA GPU")
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=resolve_dtype(q.compute_dtype,
                                                                   "model.quantization.compute_dtype"))


def recorded_quantization(config: dict[str, Any],
                          where: str = "rlora_config.json") -> QuantizationConfig | None:
    """The quantization an adapter trained over (its config's `quantization` record), or None."""
    record = config.get("quantization")
    if record is None:
        return None
    try:
        return QuantizationConfig(**record)
    except (TypeError, UserError) as e:
        raise UserError(f"{where}: unreadable quantization record {record!r} ({first_line(e)})",
                        "save the adapter again with rlora") from None


def quantization_record(q: QuantizationConfig | None) -> dict[str, Any]:
    """What an adapter records about its base's quantization: {"quantization": {...} or None}."""
    return {"quantization": asdict(q) if q is not None else None}


def meta_model(name_or_path: str, *, fix: str, trust_remote_code: bool = False) -> Any:
    """The model's architecture with no weights (meta device): shapes and module names only,
    from its config.json alone. `fix` tells the user what to pass when the config can't be read."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of model {name_or_path!r}: {first_line(e)}",
                        REMOTE_CODE_FIX if _wants_remote_code(e) else fix) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------ base + adapter


@dataclass
class LoadInfo:
    """What `load_with_adapter` loaded, and what the user should hear about it."""

    base: str
    """The base model's hub id or folder, as loaded."""
    adapter: str | None = None
    """The adapter folder applied on it, if any."""
    warnings: list[str] = field(default_factory=list)
    """Plain-text notes for the command to render (e.g. an adapter applied to another base)."""


def load_with_adapter(model: str | None, adapter: str | None, *, dtype: str = "auto",
                      default: str | None = None, trust_remote_code: bool = False,
                      device: Any = "auto") -> tuple[Any, Any, LoadInfo]:
    """(model in eval mode, tokenizer, LoadInfo): the base is `model`, else the adapter's recorded
    base, else `default` (e.g. the recipe's model); the adapter is applied on it, and its saved
    tokenizer wins. An adapter whose base runs its own code needs `trust_remote_code`.
    `device` "auto" is CUDA when there is one."""
    config = read_adapter_config(adapter) if adapter else {}
    if adapter:
        check_remote_code(config, adapter, trust_remote_code)
    recorded = _recorded(config, adapter, strict=not model)
    base = model or recorded or default
    if not base:
        raise UserError("no model to evaluate" + (f": {adapter} records no base model" if adapter else ""),
                        "give --model ID_OR_PATH (a hub id, a local folder, or a merged model)")
    info = LoadInfo(base, adapter)
    if adapter and model and recorded and not _same_model(model, recorded):
        info.warnings.append(f"adapter {adapter} was trained on {recorded}, applying it to {model}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    # Over the base quantized as in training: the adapter learned against its dequantized weights.
    lm, tokenizer = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code, device=device,
                               quantization=recorded_quantization(config, f"{adapter}/rlora_config.json"))
    if adapter:
        load_adapter(lm, adapter)  # UserError on a shape mismatch: the adapter is for another base
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(adapter, trust_remote_code=trust_remote_code)
    lm.eval()
    return lm, tokenizer, info


def _recorded(config: dict[str, Any], adapter: str | None, *, strict: bool) -> str | None:
    """The adapter's base, found from here. With --model given (`strict` False) the record only
    feeds a warning, so a base that has moved away is no error."""
    if not adapter:
        return None
    try:
        return recorded_base(config, adapter, option="--model")
    except UserError:
        if strict:
            raise
        return config.get("base_model")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


# ------------------------------------------------------------------------------- errors


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
