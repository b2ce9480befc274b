"""Data sources: find, check and read one `data.datasets[]` entry into rows of its kind's fields.

A source is a hub dataset id (read with `datasets.load_dataset`), a local .jsonl/.json/.csv/
.parquet file or a folder of them, or (format: bigbench) a BIG-bench task.json. `check_source` is
the recipe loader's cheap offline check (files exist, mapped columns exist in the first rows);
`load_source` reads everything, renames columns to the kind's fields, drops rows with empty
required fields and raises a UserError naming the row for rows that contradict the recipe (a
label outside label_words, an answer that is not a choice), values of the wrong type (a list
where text is expected would otherwise train as its Python repr) and unknown chat roles. Text
files must be UTF-8 (a BOM is fine): anything else is a UserError with the first bad byte's
offset. Every step is a `Dataset.map`/`filter`, so datasets' fingerprints cache it and a changed
file or recipe never reuses a stale result.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import glob
import json
import math
from pathlib import Path
from typing import Any, Iterator

from rlora_cli.config import DatasetConfig
from rlora_cli.data.bigbench import bigbench_prompt as shared_prompt
from rlora_cli.errors import UserError, first_line
from rlora_cli.data.templates import CHAT_ROLES, KIND_FIELDS, LETTERS

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Other datasets' role names (ShareGPT's human/gpt, Gemini's model) -> ours; every other role is
# an error, not a turn the template renders as it likes.
ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
              **{role: role for role in CHAT_ROLES}}
PEEK_ROWS = 5
# utf-8-sig: a BOM (Excel writes one) is skipped, as datasets' readers skip it.
TEXT_ENCODING = "utf-8-sig"
UTF8_FIX = "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW, or your editor's 'save with encoding')"


def looks_local(path: str) -> bool:
    """A path that can only mean a local file (hub ids are `name` or `owner/name`)."""
    p = Path(path)
    return (p.suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or path.count("/") >= 2
            or "\\" in path)


def columns_of(cfg: DatasetConfig) -> dict[str, str]:
    """Kind field -> source column: the recipe's `columns`, else the field's own name."""
    required, optional = KIND_FIELDS[cfg.kind]
    return {f: cfg.columns.get(f, f) for f in required + optional}


def bigbench_file(path: str) -> Path:
    p = Path(path).expanduser()
    return p / "task.json" if p.is_dir() else p


# ---- the offline check the recipe loader runs ---------------------------------------------------

def check_source(cfg: DatasetConfig, where: str) -> list[str]:
    """Problems a look at the source's files can find; none for a hub id (checked when read)."""
    path = Path(cfg.path).expanduser()
    if cfg.format == "bigbench":
        try:
            read_bigbench(cfg.path)
        except UserError as e:
            return [f"{where}.path: {e.problem}"]
        return []
    if not path.exists():
        if looks_local(cfg.path):
            return [f"{where}.path: no such file or folder: {cfg.path} (relative paths are read from "
                    f"{Path.cwd()})"]
        return []
    extra = [f"{where}.{k}: only hub sources have a {k}; remove it for a local file" for k in ("subset", "split")
             if getattr(cfg, k)]
    try:
        files = local_files(path)
        rows = peek_rows(files[0])
    except UserError as e:  # its fix goes along: the report's own fix is about the recipe
        return extra + [f"{where}.path: {e.problem}" + (f"; {e.fix}" if e.fix else "")]
    return extra + column_problems(cfg, rows, files[0].name, where)


def local_files(path: Path) -> list[Path]:
    """The data files of a local source: the file itself or a folder's files (one format)."""
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'}; use "
                            f"{', '.join(LOCAL_SUFFIXES)}")
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"{path}: the folder holds no {'/'.join(LOCAL_SUFFIXES)} files")
    if len({LOCAL_SUFFIXES[f.suffix] for f in files}) > 1:
        raise UserError(f"{path}: the folder mixes file types; keep one of {', '.join(LOCAL_SUFFIXES)} per source")
    return files


def peek_rows(file: Path, n: int = PEEK_ROWS) -> list[dict[str, Any]]:
    """The first `n` rows of a local data file, read without loading the whole file (.json aside)."""
    try:
        rows = _peek(file, n)
    except UnicodeDecodeError:
        raise not_utf8(file) from None
    if not rows:
        raise UserError(f"{file}: no rows")
    return rows


def _peek(file: Path, n: int) -> list[dict[str, Any]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(file).iter_batches(batch_size=n), None)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{file}: not a readable parquet file ({e})") from None
        return batch.to_pylist() if batch is not None else []
    if file.suffix == ".csv":
        with open(file, newline="", encoding=TEXT_ENCODING) as f:
            reader = csv.DictReader(f)
            return [{k: _csv_value(v) for k, v in row.items()} for _, row in zip(range(n), reader)]
    return _peek_json(file, n)


def _peek_json(file: Path, n: int) -> list[dict[str, Any]]:
    if file.suffix == ".json":
        text = file.read_text(encoding=TEXT_ENCODING)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if not text.lstrip().startswith("{") or "Extra data" not in e.msg:
                raise UserError(f"{file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        else:
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data[:n]):
                raise UserError(f"{file}: a .json source must hold a list of objects (or one object per line)")
            return data[:n]
    rows = []
    for _, row in iter_jsonl(file):
        rows.append(row)
        if len(rows) == n:
            break
    return rows


def iter_jsonl(file: Path, fix: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is a UserError naming it."""
    with open(file, encoding=TEXT_ENCODING) as f:
        try:  # reading a line is what decodes it; the consumer's errors never arrive here
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{file}:{lineno}: not valid JSON ({e.msg})", fix) from None
                if not isinstance(row, dict):
                    raise UserError(f"{file}:{lineno}: each line must be a JSON object", fix)
                yield lineno, row
        except UnicodeDecodeError:
            raise not_utf8(file) from None


def not_utf8(file: Path) -> UserError:
    """The error for a text file that is not UTF-8, naming its first bad byte and that byte's offset."""
    bad = first_non_utf8(file)
    at = f" (byte 0x{bad[1]:02x} at offset {bad[0]})" if bad else ""
    return UserError(f"{file}: not UTF-8 text{at}", UTF8_FIX)


def first_non_utf8(file: Path) -> tuple[int, int] | None:
    """(offset, value) of the first byte of `file` that is not valid UTF-8, or None. Reads in
    chunks; a character split across two chunks waits in the decoder, so offsets stay exact."""
    decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
    with open(file, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes held back from the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return done - pending + e.start, e.object[e.start]
            if not chunk:
                return None
            done += len(chunk)


def _csv_value(value: str | None) -> Any:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def column_problems(cfg: DatasetConfig, rows: list[dict[str, Any]], file: str, where: str) -> list[str]:
    """Mapped columns that the rows lack (naming those they have), and nlu labels that do not fit."""
    present = list(dict.fromkeys(k for row in rows for k in row))
    required, _ = KIND_FIELDS[cfg.kind]
    problems = []
    for fld, column in columns_of(cfg).items():
        if column in present or (fld not in required and fld not in cfg.columns):
            continue
        if fld in cfg.columns:
            problems.append(f"{where}.columns.{fld}: no column {column!r} in {file}; its columns are "
                            f"{', '.join(present)}")
        else:
            problems.append(f"{where}: {cfg.kind} needs a {fld!r} column and {file} has none (its columns "
                            f"are {', '.join(present)}); map one with columns: {{{fld}: <column>}}")
    if cfg.kind == "nlu" and not problems:
        labels = [row.get(columns_of(cfg)["label"]) for row in rows]
        problems += [f"{where}: {p}" for p in _label_problems(labels, cfg.label_words, file)]
    return problems


def _label_problems(labels: list[Any], words: tuple[str, ...] | None, file: str) -> list[str]:
    ints = [v for v in labels if isinstance(v, int) and not isinstance(v, bool)]
    if ints and words is None:
        return [f"the labels in {file} are integers ({', '.join(map(str, ints[:3]))}...); give label_words "
                f"with one word per label, e.g. label_words: [negative, positive]"]
    if words is None:
        return []
    bad = [v for v in labels if v is not None and _label_word(v, words) is None]
    if bad:
        return [f"label {bad[0]!r} in {file} is outside label_words {list(words)} (integer labels index it "
                f"from 0 to {len(words) - 1}; text labels must be one of the words)"]
    return []


def _label_word(value: Any, words: tuple[str, ...] | list[str]) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return words[value] if 0 <= value < len(words) else None
    return str(value) if str(value) in words else None


# ---- BIG-bench -----------------------------------------------------------------------------------

def read_bigbench(path: str) -> dict[str, Any]:
    """A BIG-bench task.json (or its folder), checked for an `examples` list."""
    file = bigbench_file(path)
    if not file.is_file():
        raise UserError(f"no BIG-bench task file at {file}", "give a task.json or the folder that holds it")
    try:
        task = json.loads(file.read_text(encoding=TEXT_ENCODING))
    except UnicodeDecodeError:
        raise not_utf8(file) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})", "give an unmodified BIG-bench task.json") from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{file}: no `examples` list; not a BIG-bench JSON task",
                        "give a task.json with examples (programmatic BIG-bench tasks are not supported)")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input" not in ex or not ({"target_scores", "target"} & set(ex)):
            raise UserError(f"{file}: examples[{i}] needs `input` and `target_scores` or `target`",
                            "give an unmodified BIG-bench task.json")
    return task


def bigbench_prompt(task: dict[str, Any], example: dict[str, Any]) -> str:
    """BIG-bench's prompt for one example, built by the evaluator's own builder (zero shots), so a
    training row and an evaluation prompt of the same example are the same text."""
    return shared_prompt(task, example, [])


def bigbench_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Knowledge rows: question = the BIG-bench prompt; multiple choice (any example with
    target_scores) answers with the best-scored choice, free-form with the first target."""
    rows = []
    for ex in task["examples"]:
        scores = ex.get("target_scores") or {}
        choices, values = [str(c) for c in scores], [float(v) for v in scores.values()]
        targets = ex.get("target", [])
        targets = [str(t) for t in (targets if isinstance(targets, list) else [targets])]
        best = values.index(max(values)) if choices else -1  # the first of equally scored choices
        if not choices and not targets:
            continue
        rows.append({"question": bigbench_prompt(task, ex), "answer": choices[best] if choices else targets[0],
                     "choices": choices, "answer_index": best, "targets": targets, "format": "bigbench"})
    return rows


# ---- reading and normalising ---------------------------------------------------------------------

def load_source(cfg: DatasetConfig, where: str, cache_dir: str | None = None) -> tuple[Any, int, list[str] | None]:
    """(rows with the kind's fields as a `datasets.Dataset`, rows dropped as empty, nlu label words)."""
    from datasets import Dataset

    if cfg.format == "bigbench":
        return Dataset.from_list(bigbench_rows(read_bigbench(cfg.path))), 0, None
    try:
        raw = _read(cfg, where, cache_dir)
        mapping = columns_of(cfg)
        _check_columns(cfg, raw.column_names, mapping, where)
        words = _words(cfg, raw, mapping["label"], where) if cfg.kind == "nlu" else None
        rows = raw.map(normalize_row, with_indices=True, remove_columns=raw.column_names,
                       features=kind_features(cfg.kind), desc=f"{cfg.name}: reading rows",
                       fn_kwargs={"kind": cfg.kind, "mapping": mapping, "words": words,
                                  "where": f"{where} ({cfg.name}, {cfg.path})"})
    except UnicodeDecodeError as e:
        # datasets' JSON reader hands pyarrow the raw bytes, so a bad byte past the rows that
        # the recipe check peeked at surfaces only when its row is read.
        _check_utf8(cfg)
        raise UserError(f"{where} ({cfg.name}): {cfg.path} holds text that is not UTF-8 ({first_line(e)})",
                        UTF8_FIX) from None
    usable = rows.filter(_is_usable, input_columns="_ok", desc=f"{cfg.name}: dropping empty rows")
    if len(usable) == 0:
        raise UserError(f"{where} ({cfg.name}): no usable rows in {cfg.path} ({len(rows)} rows, all with an "
                        f"empty {' or '.join(KIND_FIELDS[cfg.kind][0])})",
                        "check the file and the columns: mapping")
    return usable.remove_columns("_ok"), len(rows) - len(usable), words


def _read(cfg: DatasetConfig, where: str, cache_dir: str | None) -> Any:
    import datasets

    path = Path(cfg.path).expanduser()
    if path.exists():
        files = local_files(path)
        try:
            # data_files are glob patterns: a file named a[1].jsonl must match itself, not a1.jsonl
            return datasets.load_dataset(LOCAL_SUFFIXES[files[0].suffix], split="train", cache_dir=cache_dir,
                                         data_files=[glob.escape(str(f)) for f in files])
        except Exception as e:  # datasets/pyarrow raise many types for a file they cannot parse
            _check_utf8(cfg)  # pandas' "codec can't decode byte" names neither the file nor the offset
            raise UserError(f"{where} ({cfg.name}): cannot read {cfg.path}: {first_line(e)}",
                            "check that every row has the same columns and value types") from None
    if looks_local(cfg.path):
        raise UserError(f"{where}.path: no such file or folder: {cfg.path}", "check the path")
    try:
        return datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split or "train", cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id, bad subset/split, gated: each its own type
        what = cfg.path + (f" ({cfg.subset})" if cfg.subset else "") + f" split {cfg.split or 'train'}"
        raise UserError(f"{where} ({cfg.name}): cannot load {what} from the Hugging Face hub: {first_line(e)}",
                        "check the id, subset and split; offline, use a cached copy or a local file") from None


def _check_utf8(cfg: DatasetConfig) -> None:
    """Raise `not_utf8` for the first local text file of the source that is not UTF-8."""
    path = Path(cfg.path).expanduser()
    for file in local_files(path) if path.exists() else []:
        if file.suffix != ".parquet" and first_non_utf8(file) is not None:
            raise not_utf8(file)


def _check_columns(cfg: DatasetConfig, present: list[str], mapping: dict[str, str], where: str) -> None:
    required, _ = KIND_FIELDS[cfg.kind]
    missing = [(f, c) for f, c in mapping.items() if c not in present and (f in required or f in cfg.columns)]
    if missing:
        fld, column = missing[0]
        raise UserError(f"{where} ({cfg.name}): {cfg.kind} field {fld!r} reads column {column!r}, which "
                        f"{cfg.path} does not have; its columns are {', '.join(present)}",
                        f"map it with columns: {{{fld}: <column>}}")


def _words(cfg: DatasetConfig, raw: Any, column: str, where: str) -> list[str]:
    if cfg.label_words is not None:
        return list(cfg.label_words)
    feature = raw.features.get(column)
    names = getattr(feature, "names", None)
    if names:  # a hub ClassLabel (GLUE's label) knows its words
        return list(names)
    if not hasattr(feature, "dtype"):  # a list or struct column: unique() cannot even compare them
        raise UserError(f"{where} ({cfg.name}): the label column {column!r} of {cfg.path} holds "
                        f"{'mappings' if isinstance(feature, dict) else 'lists'}, expected label words or "
                        "integer indexes", "fix the data, or map label to another column with columns:")
    values = [v for v in raw.unique(column) if v is not None]
    if any(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where}.label_words: the labels of {cfg.name} are integers; give the word for each",
                        "e.g. label_words: [negative, positive] (label 0 = negative)")
    return sorted(str(v) for v in values)


def kind_features(kind: str) -> Any:
    """The fixed schema `normalize_row` writes. Declared, not inferred: a source column of the same
    name keeps none of its type (a hub ClassLabel would turn label words back into integers)."""
    from datasets import Features, Value

    text = Value("string")
    schema = {"instruction": {"instruction": text, "input": text, "output": text},
              "nlu": {"text": text, "text_pair": text, "label": text},
              "knowledge": {"question": text, "answer": text, "choices": [text], "answer_index": Value("int64")},
              "chat": {"messages": [{"role": text, "content": text}]}}[kind]
    return Features({**schema, "_ok": Value("bool")})


def _is_usable(ok: bool) -> bool:
    return ok


def normalize_row(row: dict[str, Any], index: int, *, kind: str, mapping: dict[str, str],
                  words: list[str] | None, where: str) -> dict[str, Any]:
    """One source row as the kind's fields (a fixed schema per kind) plus `_ok` (usable); a value
    of the wrong type is a UserError naming the row and the field."""
    at = f"{where}: row {index}"
    get = {f: row.get(c) for f, c in mapping.items()}
    name = {f: f if c == f else f"{f} (column {c!r})" for f, c in mapping.items()}
    if kind == "instruction":
        out = {f: _text(get[f], at, name[f]) for f in ("instruction", "input", "output")}
        return {**out, "_ok": bool(out["instruction"].strip() and out["output"].strip())}
    if kind == "nlu":
        label = _scalar(get["label"], at, name["label"], "a label word or an integer index")
        word = None if label is None else _label_word(label, words or [])
        if label is not None and word is None:
            raise UserError(f"{at}: label {label!r} is outside label_words {words}",
                            "fix label_words (integer labels index it from 0) or the data")
        out = {"text": _text(get["text"], at, name["text"]), "label": word or "",
               "text_pair": _text(get.get("text_pair"), at, name["text_pair"])}
        return {**out, "_ok": bool(out["text"].strip() and word)}
    if kind == "knowledge":
        return _knowledge(get, at, name)
    messages = _messages(get["messages"], at, name["messages"])
    return {"messages": messages, "_ok": any(m["role"] == "assistant" and m["content"] for m in messages)}


def _scalar(value: Any, at: str, name: str, expected: str) -> Any:
    """`value` if it is a string, number or boolean; None for None and NaN (what pandas reads from
    an empty CSV cell of a numeric column). A list or mapping is an error: it would be trained as
    its Python repr ("Answer: [1, 2]")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (str, int, float)):  # bool is an int
        return value
    raise _wrong_type(at, name, value, expected)


def _text(value: Any, at: str, name: str) -> str:
    value = _scalar(value, at, name, "a string or a number")
    return "" if value is None else str(value)


def _wrong_type(at: str, name: str, value: Any, expected: str) -> UserError:
    if isinstance(value, (datetime.date, datetime.time)):
        # pyarrow's JSON reader (under datasets) turns ISO-8601 strings into timestamps.
        return UserError(f"{at}: {name} was read as a date ({value}), expected {expected} (the JSON reader "
                         "turns ISO-8601 date strings into timestamps)",
                         "save the source as .csv or .parquet, or write the dates another way (2021/05/01)")
    kind = {list: "a list", tuple: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")
    return UserError(f"{at}: {name} is {kind} ({_short(value)}), expected {expected}",
                     "fix the data, or map the field to another column with columns:")


def _short(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 63 else text


def _knowledge(get: dict[str, Any], at: str, name: dict[str, str]) -> dict[str, Any]:
    question, raw_choices = _text(get["question"], at, name["question"]), get.get("choices")
    answer = _scalar(get["answer"], at, name["answer"], "a string or an integer (a choice's index)")
    out = {"question": question, "answer": "" if answer is None else str(answer), "choices": [], "answer_index": -1}
    if raw_choices is None:
        return {**out, "_ok": bool(question.strip() and out["answer"].strip())}
    texts, labels = _choice_lists(raw_choices, at, name["choices"])
    i = _answer_index(answer, texts, labels)
    if answer is not None and texts and i is None:
        raise UserError(f"{at}: answer {answer!r} is not one of the {len(texts)} choices "
                        f"(give an index from 0, a letter, a choice label or the choice's text)",
                        "fix the answer column or the columns: mapping")
    ok = bool(question.strip() and texts and i is not None)
    return {"question": question, "answer": texts[i] if ok else "", "choices": texts if ok else [],
            "answer_index": i if ok else -1, "_ok": ok}


def _choice_lists(value: Any, at: str, name: str) -> tuple[list[str], list[str]]:
    """Choices as a list, or as {"text": [...], "label": [...]} (ARC, OpenBookQA, CommonsenseQA)."""
    if isinstance(value, dict):
        return _texts(value.get("text"), at, f"{name}.text"), _texts(value.get("label"), at, f"{name}.label")
    return _texts(value, at, name), []


def _texts(value: Any, at: str, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):  # a string here would be split into one choice per character
        raise _wrong_type(at, name, value, "a list of strings (or {text: [...], label: [...]})")
    return [_text(v, at, f"{name}[{i}]") for i, v in enumerate(value)]


def _answer_index(answer: Any, texts: list[str], labels: list[str]) -> int | None:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(texts) else None
    answer = "" if answer is None else str(answer).strip()
    if answer in labels:
        return labels.index(answer)
    if len(answer) == 1 and answer in LETTERS[: len(texts)]:
        return LETTERS.index(answer)
    return texts.index(answer) if answer in texts else None


def _messages(value: Any, at: str, name: str) -> list[dict[str, str]]:
    """{role, content} turns; ShareGPT's {from, value} with human/gpt roles are translated. A
    role outside system/user/assistant/tool is an error: the chat template would render it as it
    likes (or not at all), and the turn would still be trained."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _wrong_type(at, name, value, "a list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _wrong_type(at, f"{name}[{i}]", m, "a {role, content} message")
        # Arrow gives every message every key of the column, absent ones as None.
        given = m.get("role") if m.get("role") is not None else m.get("from")
        role = ROLE_NAMES.get(given.lower()) if isinstance(given, str) else None
        if role is None:
            raise UserError(f"{at}: {name}[{i}] has role {given!r}; a role must be one of "
                            f"{', '.join(CHAT_ROLES)} (ShareGPT's human and gpt are translated)",
                            "fix the role in the data")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        out.append({"role": role, "content": _text(content, at, f"{name}[{i}].content")})
    return out
