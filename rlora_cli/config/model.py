"""The `model:` section (with its `quantization:` subsection) and the one dtype vocabulary every
command shares."""

from __future__ import annotations

from dataclasses import dataclass

from rlora_cli.config.common import choice, validate
from rlora_cli.errors import UserError

# One dtype vocabulary for the recipe and every command's --dtype: each accepted spelling -> torch's
# name ("auto" stays auto: the model loader picks per device).
DTYPE_NAMES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
               "float16": "float16", "fp32": "float32", "float32": "float32"}
DTYPES = tuple(DTYPE_NAMES)
DTYPE_HELP = "auto | bf16 | fp16 | fp32"


def canonical_dtype(name: str, where: str) -> str:
    """torch's name for a dtype in any accepted spelling ('bf16' -> 'bfloat16'; 'auto' stays);
    UserError naming `where` (a YAML key or a flag) for anything else."""
    if name not in DTYPE_NAMES:
        raise UserError(f"{where}: unknown dtype {name!r}",
                        f"use {DTYPE_HELP} (or bfloat16, float16, float32)")
    return DTYPE_NAMES[name]


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """The frozen base loaded quantized by bitsandbytes (QLoRA); the adapters keep their own dtype.
    The 4-bit keys default when bits is 4 and are refused with bits 8, as `adapter:` does for the
    keys a method lacks."""

    WHERE = "model.quantization"  # the YAML path its problems start with

    bits: int = 4
    """4 (QLoRA: 4-bit blocks of 64 weights with one scale each) | 8 (LLM.int8(): int8 rows)."""
    type: str | None = None
    """4-bit only: nf4 (default; NormalFloat, levels spaced for normally distributed weights) | fp4."""
    double_quant: bool | None = None
    """4-bit only: quantize the block scales too (default true; about 0.4 bits per weight less)."""
    compute_dtype: str | None = None
    """4-bit only: the dtype the base's matmuls run in: auto (default: bf16 where the GPU has it,
    else fp32) | bf16 | fp16 | fp32."""

    def __post_init__(self) -> None:
        if self.bits == 4:
            for key, value in (("type", "nf4"), ("double_quant", True), ("compute_dtype", "auto")):
                if getattr(self, key) is None:
                    object.__setattr__(self, key, value)
        validate(self)

    def problems(self, where: str) -> list[str]:
        if self.bits not in QUANT_BITS:
            return [f"{where}.bits: must be 4 or 8, got {self.bits!r}"]
        if self.bits == 8:
            return [f"{where}.{k}: applies to 4-bit only; remove it for bits: 8"
                    for k in ("type", "double_quant", "compute_dtype") if getattr(self, k) is not None]
        p = []
        if self.type not in QUANT_TYPES:
            p.append(choice(f"{where}.type", self.type, QUANT_TYPES))
        if self.compute_dtype not in DTYPES:
            p.append(choice(f"{where}.compute_dtype", self.compute_dtype, DTYPES))
        return p


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The frozen base model."""

    WHERE = "model"  # the YAML path its problems start with

    name_or_path: str
    """Hub id (Qwen/Qwen2.5-0.5B) or a local folder written by save_pretrained."""
    dtype: str = "auto"
    """Storage dtype of the frozen base: auto (bf16 where the device has it, else fp32) | bf16 | fp16
    | fp32."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for repositories you trust)."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2 (or another transformers attention backend)."""
    quantization: QuantizationConfig | None = None
    """Load the base quantized (QLoRA), e.g. {bits: 4, type: nf4, double_quant: true,
    compute_dtype: bf16}; needs bitsandbytes (pip install 'rlora[qlora]'). null = not quantized."""

    def __post_init__(self) -> None:
        validate(self)

    def problems(self, where: str) -> list[str]:
        p = []
        if not self.name_or_path.strip():
            p.append(f"{where}.name_or_path: empty; give a hub id or a local model folder")
        if self.dtype not in DTYPES:
            p.append(choice(f"{where}.dtype", self.dtype, DTYPES))
        if self.attn_implementation not in ATTENTION and "/" not in self.attn_implementation:
            p.append(choice(f"{where}.attn_implementation", self.attn_implementation, ATTENTION))
        return p


