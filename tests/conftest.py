"""Shared fixtures: everything offline, one tiny Llama-style model per test session."""

from __future__ import annotations

import os

# Set before transformers/datasets are imported anywhere, so nothing waits on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent  # the checkout: recipes/, data/demo/, scripts/
# Small BIG-bench-format tasks written for the tests; fixtures/bigbench/README.md lists their shapes.
BIGBENCH_FIXTURES = REPO / "tests" / "fixtures" / "bigbench"
# The real BIG-bench tasks, where `make bigbench-data` writes them (git-ignored, absent on a fresh clone).
BIGBENCH_DATA = REPO / "data" / "bigbench"


def real_bigbench_task(name: str) -> Path:
    """The real corpus' `<name>/task.json`; skips the calling test when it is not there."""
    path = BIGBENCH_DATA / name / "task.json"
    if not path.is_file():
        pytest.skip(f"needs the real BIG-bench task {name}: {path} is missing (run `make bigbench-data`)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama-style model + byte-level BPE tokenizer (load it with from_pretrained)."""
    from rlora_cli.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory):
    """The tiny model with a trained model's logit range, for tests where training must learn."""
    from rlora_cli.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("learnable") / "model", embedding_std=0.1)


def perturb(model, scale=0.2, seed=7):
    """Random trainable tensors: at init ΔW is 0 for most methods, which would prove nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# The method matrix shared by the adapter tests: every method, and the router-off variants.
METHODS = [
    dict(type="lora"),
    dict(type="multilora"),
    dict(type="hydralora"),
    dict(type="hydralora", router="off"),
    dict(type="rlora"),
    dict(type="rlora", router="off"),
]


def mid(m: dict) -> str:
    return m["type"] + ("-router-off" if m.get("router") == "off" else "")


def load(path, dtype=None):
    """The saved tiny model, in float64 unless told (reference comparisons want float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float64).eval()


def cfg_for(method: dict, **kw):
    from rlora_cli.adapters import AdapterConfig

    return AdapterConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **method, **kw})


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """(model, tokenizer) of the tiny model in float32, eval mode."""
    from rlora_cli.model import load_model

    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """(adapter folder, the adapted model): a LoRA on every Linear, perturbed so it changes logits."""
    import torch

    from rlora_cli.adapters import AdapterConfig, inject_adapters
    from rlora_cli.checkpoint import save_adapter
    from rlora_cli.model import load_model

    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    inject_adapters(model, AdapterConfig(type="lora", r=2, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rlora" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", tokenizer=tok), model.eval()


# ------------------------------------------------------------------------ the command line


def run_cli(argv: list[str]) -> int:
    """`rlora ARGV` in this process; its exit code."""
    from rlora_cli.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def no_progress_bars():
    """Data and weight loading draw progress bars on stderr before an error can be found; they
    are not part of the error, so they are off here and stderr holds the error alone."""
    import datasets
    from transformers.utils import logging as hf_logging

    before = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    yield
    if before[0]:
        datasets.enable_progress_bars()
    if before[1]:
        hf_logging.enable_progress_bar()


@pytest.fixture
def quiet(monkeypatch, tmp_path):
    """datasets' progress bars share stderr with the error line; a fresh cache per test."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    yield
    if was_on:
        datasets.enable_progress_bars()


def bos_tokenizer(model_dir):
    """The tiny tokenizer made to put a BOS (<|im_start|>) in front of every text, as Llama's does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                       special_tokens=[("<|im_start|>", bos)])
    tok.bos_token = "<|im_start|>"
    return tok
