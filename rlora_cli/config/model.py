"""The `model:` section and the one dtype vocabulary every command shares."""

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


