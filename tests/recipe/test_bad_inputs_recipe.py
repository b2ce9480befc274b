"""Bad recipes and bad data through the real `rlora train` entry: every one is exit code 2 and one
stderr line that names the key or the file (its text as the user wrote it) and says what to do;
never a traceback. One table, one row per input; `--dry-run` wherever the check runs before any
model weights are read, so the whole table takes seconds."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from rlora_cli.cli import main
from rlora_cli.data.mixture import plan_counts, target_shares

FACTS = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def chat(role_of_row_3: str) -> bytes:
    return jsonl([{"messages": [{"role": "user", "content": f"hi {i}"},
                                {"role": role_of_row_3 if i == 3 else "assistant", "content": "hello"}]}
                  for i in range(20)])


LATIN1 = b'{"question": "caf\xe9?", "answer": "yes"}\n'  # é in Latin-1: 0xe9 at offset 17
BIG = jsonl(FACTS * 100)  # past the first rows the recipe check peeks at (and past one read buffer)


@dataclass(frozen=True)
class Case:
    """One bad input: recipe overrides and/or files written beside the recipe ({tmp} is that folder)."""

    id: str
    overrides: tuple[str, ...] = ()
    files: dict[str, bytes | Callable[[], bytes]] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    """Substrings of the one error line: the key or the file, and the gist of the fix."""
    dry_run: bool = True
    recipe: str = "recipe.yaml"
    """The recipe argument, relative to {tmp}."""
    recipe_bytes: bytes | None = None
    """Written as the recipe instead of the good one."""


def on(path: str) -> str:
    return f"data.datasets.facts.path={{tmp}}/{path}"


CASES = [
    # 1. text that is not UTF-8: the file, the byte and its offset, and to re-save it
    Case("jsonl-latin1", (on("bad.jsonl"),), {"bad.jsonl": LATIN1 + jsonl(FACTS)},
         ("bad.jsonl: not UTF-8 text (byte 0xe9 at offset 17)", "re-save it as UTF-8")),
    Case("jsonl-latin1-late", (on("bad.jsonl"),), {"bad.jsonl": BIG + LATIN1},
         (f"bad.jsonl: not UTF-8 text (byte 0xe9 at offset {len(BIG) + 17})", "re-save it as UTF-8")),
    Case("csv-latin1", (on("bad.csv"),), {"bad.csv": b"question,answer\nq1,a1\ncaf\xe9?,yes\n"},
         ("bad.csv: not UTF-8 text (byte 0xe9 at offset 25)", "re-save it as UTF-8")),
    Case("json-latin1", (on("bad.json"),), {"bad.json": b"[" + LATIN1.strip() + b"]"},
         ("bad.json: not UTF-8 text (byte 0xe9 at offset 18)", "re-save it as UTF-8")),
    Case("recipe-latin1", recipe_bytes=b"seed: 1\n# caf\xe9\n",
         expect=("recipe.yaml: not UTF-8 text (byte 0xe9 at offset 13)", "re-save it as UTF-8")),
    # 2. seeds numpy cannot take
    Case("seed-negative", ("seed=-1",),
         expect=("seed: -1 is out of range; give an integer from 0 to 4294967295",)),
    Case("seed-2**32", ("seed=4294967296",), expect=("seed: 4294967296 is out of range",)),
    Case("seed-10**30", (f"seed={10**30}",), expect=(f"seed: {10**30} is out of range",)),
    Case("seed-negative-train", ("seed=-1",), expect=("seed: -1 is out of range",), dry_run=False),
    # 3. floats: finite and in range, every section
    Case("lr-nan", ("train.learning_rate=nan",),
         expect=("train.learning_rate: must be a finite number, got nan",)),
    Case("lr-inf", ("train.learning_rate=.inf",),
         expect=("train.learning_rate: must be a finite number, got inf",)),
    Case("weight-inf", ("data.datasets.facts.weight=inf",),
         expect=("data.datasets[0].weight: must be a finite",)),
    Case("weight-nan", ("data.datasets.facts.weight=.nan",),
         expect=("data.datasets[0].weight: must be a finite",)),
    Case("weight-negative", ("data.datasets.facts.weight=-2",),
         expect=("data.datasets[0].weight: must be > 0",)),
    Case("temperature-nan", ("data.temperature=nan",), expect=("data.temperature: must be a finite number",)),
    Case("temperature-inf", ("data.temperature=inf",), expect=("data.temperature: must be a finite number",)),
    Case("temperature-zero", ("data.temperature=0",), expect=("data.temperature: must be > 0",)),
    Case("max-grad-norm-nan", ("train.max_grad_norm=nan",),
         expect=("train.max_grad_norm: must be a finite number or .inf, got nan",)),
    Case("max-grad-norm-negative-inf", ("train.max_grad_norm=-.inf",),
         expect=("train.max_grad_norm: must be",)),
    Case("weight-decay-inf", ("train.weight_decay=inf",), expect=("train.weight_decay: must be a finite",)),
    Case("warmup-nan", ("train.warmup_ratio=nan",), expect=("train.warmup_ratio: must be a finite",)),
    Case("lora-alpha-nan", ("adapter.lora_alpha=nan",), expect=("adapter.lora_alpha: must be a finite",)),
    Case("dropout-inf", ("adapter.lora_dropout=inf",), expect=("adapter.lora_dropout: must be a finite",)),
    Case("save-minutes-inf", ("output.save_minutes=inf",), expect=("output.save_minutes: must be a finite",)),
    Case("val-size-nan", ("data.datasets.facts.val_size=nan",),
         expect=("data.datasets[0].val_size: must be a finite",)),
    # 4. integers past what torch/numpy take, or past any real adapter
    Case("r-huge", (f"adapter.r={10**21}",), expect=(f"adapter.r: {10**21} is too large", "2147483647")),
    Case("r-over-cap", ("adapter.r=70000",),
         expect=("adapter.r: 70000 is larger than any model needs; give at most 65536",)),
    Case("r-over-cap-train", ("adapter.r=70000",), expect=("adapter.r: 70000",), dry_run=False),
    Case("heads-huge", ("adapter.num_heads=100000",), expect=("adapter.num_heads: 100000", "at most 256")),
    Case("micro-batch-2**31", (f"train.micro_batch_size={2**31}",),
         expect=("train.micro_batch_size: 2147483648 is too large",)),
    Case("accumulation-huge", (f"train.gradient_accumulation_steps={10**30}",),
         expect=("train.gradient_accumulation_steps:", "too large")),
    Case("max-steps-huge", (f"train.max_steps={10**20}",), expect=("train.max_steps:", "too large")),
    Case("max-length-huge", (f"data.max_length={10**20}",), expect=("data.max_length:", "too large")),
    Case("num-samples-huge", (f"data.num_samples={10**20}",), expect=("data.num_samples:", "too large")),
    Case("save-steps-huge", (f"output.save_steps={10**40}",), expect=("output.save_steps:", "too large")),
    # 5. values of the wrong type: source, row, field and the type expected
    Case("jsonl-list-answer", (on("list.jsonl"),),
         {"list.jsonl": jsonl([{"question": "q", "answer": [1, 2]}] * 20)},
         ("list.jsonl", "row 0: answer is a list ([1, 2]), expected a string")),
    Case("jsonl-list-in-row-5", (on("mixed.jsonl"),),  # mixed types: datasets stores the column as JSON
         {"mixed.jsonl": jsonl([{"question": "q", "answer": [1, 2] if i == 5 else "a"} for i in range(20)])},
         ("mixed.jsonl", "row 5: answer is a list ([1, 2])")),
    Case("parquet-list-answer", (on("list.parquet"),),
         {"list.parquet": lambda: parquet([{"question": f"q{i}", "answer": [i, 2]} for i in range(20)])},
         ("list.parquet", "row 0: answer is a list ([0, 2]), expected a string")),
    Case("json-mapping-question", (on("map.json"),),
         {"map.json": json.dumps([{"question": {"text": "q"}, "answer": "a"}] * 20).encode()},
         ("map.json", "row 0: question is a mapping ({'text': 'q'}), expected a string or a number")),
    Case("mapped-column-list", (on("q.jsonl"), "data.datasets.facts.columns={question: prompt}"),
         {"q.jsonl": jsonl([{"prompt": ["a", "b"], "answer": "x"}] * 20)},
         ("q.jsonl", "row 0: question (column 'prompt') is a list")),
    Case("choices-a-string", (on("mc.jsonl"),),
         {"mc.jsonl": jsonl([{"question": "q", "choices": "ABC", "answer": 0}] * 20)},
         ("mc.jsonl", "row 0: choices is a str ('ABC'), expected a list of strings")),
    Case("nlu-label-list", (on("nlu.jsonl"), "data.datasets.facts.kind=nlu"),
         {"nlu.jsonl": jsonl([{"text": "t", "label": ["good"]}] * 20)},
         ("data.datasets[0] (facts)", "label column 'label'", "nlu.jsonl holds lists")),
    Case("chat-content-list", (on("chat.jsonl"), "data.datasets.facts.kind=chat"),
         {"chat.jsonl": jsonl([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}]
                              * 20)},
         ("chat.jsonl", "row 0: messages[0].content is a list", "expected a string")),
    Case("chat-message-a-string", (on("chat.jsonl"), "data.datasets.facts.kind=chat"),
         {"chat.jsonl": jsonl([{"messages": ["hi", "hello"]}] * 20)},
         ("chat.jsonl", "row 0: messages[0] is a str ('hi'), expected a {role, content} message")),
    # 6. chat roles outside system/user/assistant/tool
    Case("chat-unknown-role", (on("chat.jsonl"), "data.datasets.facts.kind=chat"),
         {"chat.jsonl": chat("wizard")},
         ("chat.jsonl", "row 3: messages[1] has role 'wizard'", "system, user, assistant, tool")),
    # 7. a recipe path that is a directory
    Case("recipe-is-a-directory", recipe=".", expect=("is a directory, not a recipe file", "recipe.yaml")),
    # 8. user text with rich markup in it is printed as written
    Case("bracketed-path-missing", ("data.datasets.facts.path={tmp}/a[/b].jsonl",),
         expect=("no such file or folder:", "/a[/b].jsonl")),
    Case("bracketed-name-bad-role", (on("chat.jsonl"), "data.datasets.facts.kind=chat",
                                     "data.datasets.facts.name='a[bold]x'"), {"chat.jsonl": chat("[/b]")},
         ("(a[bold]x, ", "has role '[/b]'")),
]


def write_recipe(folder: Path, model_dir: Path) -> str:
    (folder / "facts.jsonl").write_bytes(jsonl(FACTS))
    recipe = {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
              "adapter": {"type": "lora", "r": 4, "target_modules": "all-linear"},
              "data": {"max_length": 64, "datasets": [
                  {"name": "facts", "path": str(folder / "facts.jsonl"), "kind": "knowledge",
                   "val_size": 2}]},
              "train": {"max_steps": 1, "micro_batch_size": 2, "precision": "fp32"},
              "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, tiny_model_dir, capfd, quiet):
    write_recipe(tmp_path, tiny_model_dir)
    if case.recipe_bytes is not None:
        (tmp_path / "recipe.yaml").write_bytes(case.recipe_bytes)
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content() if callable(content) else content)
    args = ["train", str(tmp_path / case.recipe),
            *(o.replace("{tmp}", str(tmp_path)) for o in case.overrides)]
    with pytest.raises(SystemExit) as e:
        main(args + (["--dry-run"] if case.dry_run else ["--output", str(tmp_path / "run")]))
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in case.expect:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing trained


def test_bracketed_names_and_paths_print_as_written(tmp_path, tiny_model_dir, capfd, quiet, monkeypatch):
    """The mixture table, the example panel and the last line show user text literally: `[bold]`
    does not vanish and `[/b]` raises no MarkupError."""
    monkeypatch.setenv("COLUMNS", "500")  # no wrapping or eliding in the middle of a name
    write_recipe(tmp_path, tiny_model_dir)
    (tmp_path / "a[").mkdir()  # a[/b].jsonl is b].jsonl in the folder a[
    (tmp_path / "a[/b].jsonl").write_bytes(jsonl(FACTS))
    (tmp_path / "[bold]").mkdir()
    (tmp_path / "[bold]" / "recipe.yaml").write_text((tmp_path / "recipe.yaml").read_text())
    main(["train", str(tmp_path / "[bold]" / "recipe.yaml"),
          f"data.datasets.facts.path={tmp_path}/a[/b].jsonl",
          "data.datasets.facts.name='a[bold]x'", "--dry-run"])
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out
    assert out.count("a[bold]x") >= 2  # the table's row and the panel's title
    assert "[bold]/recipe.yaml is valid" in out


def test_extreme_but_valid_numbers_are_accepted(tmp_path, tiny_model_dir, capfd, quiet):
    """The edges stay open: the largest seed, max_grad_norm .inf (no clipping, the norm still
    logged), a tiny temperature."""
    recipe = write_recipe(tmp_path, tiny_model_dir)
    main(["train", recipe, "seed=4294967295", "train.max_grad_norm=.inf", "data.temperature=1e-300",
          "--dry-run"])
    assert "dry run ok" in capfd.readouterr().out


def test_shares_never_overflow():
    """w^(1/T) overflows a float for w = 10, T = 0.001; the shares must not."""
    assert target_shares([10.0, 1.0], 0.001) == [1.0, 0.0]
    assert target_shares([1e308, 1e308], 1.0) == [0.5, 0.5]  # their sum is inf
    assert target_shares([5.0, 3.0, 2.0], 1e300) == pytest.approx([1 / 3] * 3)
    assert plan_counts([10, 10], [1e308, 1e-308], 0.5, [None, None], total=100) == [100, 0]


def test_odd_but_valid_data_still_loads(tmp_path, quiet):
    """What the checks above must not refuse: a BOM (Excel's CSV), numbers where text is expected,
    the tool role, and ShareGPT's from/value beside role/content in one conversation."""
    from rlora_cli.data.pipeline import load_splits
    from rlora_cli.recipe.load import load_recipe

    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfquestion,answer\n" + b"".join(b"%d+1?,%d\n" % (i, i + 1)
                                                                              for i in range(10)))
    turns = [{"role": "system", "content": "be brief"}, {"from": "human", "value": "hi"},
             {"role": "tool", "content": "{}"}, {"role": "Assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_bytes(jsonl([{"messages": turns}] * 10))
    sources = [{"path": str(tmp_path / "bom.csv"), "kind": "knowledge", "val_size": 0},
               {"path": str(tmp_path / "chat.jsonl"), "kind": "chat", "val_size": 0}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "m"},
                                                          "data": {"datasets": sources}}))
    splits = load_splits(load_recipe(tmp_path / "recipe.yaml"), cache_dir=str(tmp_path / "cache"))
    assert splits["bom"][0][3].fields == {"question": "3+1?", "answer": "4"}
    assert splits["chat"][0][0].fields["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "hello"}]
