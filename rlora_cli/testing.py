"""Offline stand-ins for tests, benchmarks and examples: a tiny model, its tokenizer, a recipe.

`build_tiny_model` writes a small random Llama-style model and a byte-level BPE tokenizer (with
pad/eos tokens and a chat template) to a folder with `save_pretrained`, so tests exercise the real
`from_pretrained` path. `write_recipe` writes two small learnable tasks and a recipe over them;
`write_kinds_data` writes sources of the completion, text and chat kinds to put in one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

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
        end = rng.choice([".", "?", "!", ":"])
        lines.append(" ".join(words).capitalize() + end + f" {rng.randint(0, 999)}")
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


COLORS = ["red", "blue", "green", "yellow"]
THINGS = ["sky", "grass", "sun", "sea", "leaf", "lemon", "rose", "cloud"]


def write_data(folder: Path) -> None:
    """Two small learnable tasks: a fixed thing→colour map (knowledge) and word sentiment (nlu)."""
    rng = random.Random(0)
    facts = [{"question": f"What color is the {t} number {i}?", "answer": COLORS[j % 4]}
             for i in range(6) for j, t in enumerate(THINGS)]
    reviews = []
    for i in range(48):
        good = i % 2 == 0
        pool = ["nice", "great", "lovely", "fine"] if good else ["awful", "poor", "dull", "bad"]
        words = rng.sample(pool, 2)
        reviews.append({"text": f"The film was {words[0]} and {words[1]}.", "label": int(good)})
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))


def write_kinds_data(folder: Path, template: str = "qwen") -> list[dict[str, Any]]:
    """Three small sources of the raw-data kinds and the recipe entries that read them: completion
    (a thing's colour, verbatim), text (pseudo-sentences, some texts longer than 64 tokens so they
    are cut into pieces) and chat (one question and answer per row, in the named `template`)."""
    completions = [{"prompt": f"The {t} number {i} is", "completion": f" {COLORS[j % 4]}."}
                   for i in range(4) for j, t in enumerate(THINGS)]
    lines = tiny_corpus(96, seed=1)
    texts = [{"body": " ".join(lines[i:i + 1 + i % 6])} for i in range(0, 96, 4)]
    chats = [{"messages": [{"role": "user", "content": f"What color is the {t}?"},
                           {"role": "assistant", "content": COLORS[j % 4]}]}
             for j, t in enumerate(THINGS * 3)]
    for name, rows in (("completions", completions), ("texts", texts), ("chats", chats)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        {"name": "colors", "path": str(folder / "completions.jsonl"), "kind": "completion", "val_size": 4},
        {"name": "prose", "path": str(folder / "texts.jsonl"), "kind": "text", "columns": {"text": "body"},
         "val_size": 4},
        {"name": "talk", "path": str(folder / "chats.jsonl"), "kind": "chat", "template": template,
         "val_size": 4},
    ]


def write_recipe(folder: Path, model_dir: str | Path, **sections: Any) -> str:
    write_data(folder)
    recipe = {
        "seed": 0,
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "adapter": {"type": "rlora", "r": 4, "num_heads": 2, "lora_alpha": 8, "lora_dropout": 0.1,
                    "target_modules": "all-linear"},
        "data": {"max_length": 64, "datasets": [
            {"name": "facts", "path": str(folder / "facts.jsonl"), "kind": "knowledge", "val_size": 8},
            {"name": "reviews", "path": str(folder / "reviews.jsonl"), "kind": "nlu",
             "label_words": ["bad", "good"], "val_size": 8},
        ]},
        "train": {"max_steps": 6, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "learning_rate": 5e-3, "warmup_ratio": 0.1, "precision": "fp32"},
        "output": {"save_steps": 3, "logging_steps": 1, "save_total_limit": 2},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(run: Path) -> dict[str, Any]:
    return load_file(str(run / "adapter" / "rlora_adapter.safetensors"))
