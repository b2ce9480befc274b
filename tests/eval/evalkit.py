"""What the eval tests share: references (a plain forward, transformers' own generate), a quiet
console, small data files, and eval-only fixtures. A test module binds those by name
(`one_thread = evalkit.one_thread`); a second conftest.py would shadow the one `from conftest
import` reads. The tiny model and adapter fixtures (`lm`, `adapter_dir`) are in tests/conftest.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from rlora_cli.eval.results import results_dict

RESULT_KEYS = {"task", "model", "adapter", "shots", "limit", "rlora_version", "wall_s", "accuracy",
               "n", "mean_accuracy", "tasks"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on 2 shared cores OpenMP's spinning threads
    make generation 10x slower whenever another process is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)




def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mmlu_rows(subject: str, n: int, offset: int = 0) -> list[dict]:
    words = ["red", "blue", "green", "cat", "dog", "river", "sun", "moon", "tree", "fish", "city", "star"]
    return [{"question": f"What is {words[(i + offset) % 12]} number {i}?", "subject": subject,
             "choices": [words[(i + k + offset) % 12] for k in range(4)], "answer": (i + offset) % 4}
            for i in range(n)]


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmlu")
    write_jsonl(folder / "dev.jsonl", mmlu_rows("astronomy", 3) + mmlu_rows("high_school_biology", 3, 5))
    write_jsonl(folder / "test.jsonl", mmlu_rows("astronomy", 5, 2) + mmlu_rows("high_school_biology", 4, 7))
    return folder




def results_file(path: Path, accs: dict[str, float | None], **extra) -> Path:
    tasks = {k: {"accuracy": v, "n": 10, **extra.get(k, {})} for k, v in accs.items()}
    path.write_text(json.dumps(results_dict("bbh", "m", None, 0, None, 1.0, tasks)))
    return path


# ------------------------------------------------------------------------------- references


def reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Plain forward on the whole text; lm-eval's rule: trailing context spaces go to the continuation."""
    stripped = context.rstrip()
    ids = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(stripped)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))


def reference_generate(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=64, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in out:
        out = out[:out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True).split("\n", 1)[0]
