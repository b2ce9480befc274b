"""Load a base model and its tokenizer; build the offline tiny model for the demo and tests.

`load_model` is the one way rlora loads a causal LM: a hub id or a local folder, with a clear
error when it cannot be had (offline, typo, gated). `build_tiny_model` writes a small random
Llama-style model and a byte-level BPE tokenizer (with pad/eos tokens and a chat template) to a
folder with `save_pretrained`, so tests exercise the real `from_pretrained` path.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rlora_cli.errors import UserError, first_line

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# Our own word list for the tokenizer's training corpus (no third-party text).
_WORDS = (
    "the a an of to in on at for with from by is are was were be been has have had do does did "
    "not and or but if then so because what which who where when why how question answer input "
    "output instruction response label positive negative neutral true false yes no choice option "
    "sentence text task example number one two three four five six seven eight nine ten zero "
    "red blue green yellow cat dog bird fish tree river mountain city country water fire earth "
    "sun moon star day night year month week time small large big little good bad happy sad "
    "fast slow hot cold new old first last left right up down before after always never more "
    "less many few all some any each every other same different color animal plant food place "
    "capital planet ocean language music book game team player ball sport win lose plausible "
    "implausible entailment contradiction summarize translate classify list write explain name"
).split()


def tiny_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences from our own word list, with digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]) + f" {rng.randint(0, 999)}")
    return lines


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained offline on `tiny_corpus` (any text encodes: bytes are the base)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


def build_tiny_model(path: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     vocab_size: int = 512, tie_word_embeddings: bool = True,
                     embedding_std: float | None = None) -> Path:
    """Write a random tiny Llama-style causal LM and its tokenizer to `path`; returns the path.

    `embedding_std` re-draws the (tied) embeddings at that scale. Llama's 0.02 init caps the
    logits of a 64-wide model near ±1, so its frozen head cannot express a confident
    prediction; ~0.1 gives a trained model's logit range, for tests where training must learn.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2 + 48,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if embedding_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Turn a GGUF checkpoint into a normal Hugging Face folder (needs the `gguf` package).

    transformers dequantizes GGUF weights when it loads them in float32; we then drop the
    quantizer so `save_pretrained` writes plain safetensors that load without `gguf`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlora_cli.checkpoint import atomic_dir

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file", "give the path of a .gguf file")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package", 'pip install "rlora[demo]"') from None
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(resolve_dtype(dtype))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
