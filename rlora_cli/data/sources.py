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
file or recipe never reuses a stale result. How one row becomes the kind's fields is rows.py;
BIG-bench tasks are read by bigbench.py, UTF-8 and JSON lines by textfiles.py.
"""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from rlora_cli.config import KIND_FIELDS, DatasetConfig
from rlora_cli.config.data import LOCAL_SUFFIXES, looks_local
from rlora_cli.data.bigbench import bigbench_rows, load_bigbench
from rlora_cli.data.rows import kind_features, label_word, normalize_row
from rlora_cli.data.textfiles import TEXT_ENCODING, UTF8_FIX, first_non_utf8, iter_jsonl, not_utf8
from rlora_cli.errors import UserError, first_line

PEEK_ROWS = 5


def columns_of(cfg: DatasetConfig) -> dict[str, str]:
    """Kind field -> source column: the recipe's `columns`, else the field's own name."""
    required, optional = KIND_FIELDS[cfg.kind]
    return {f: cfg.columns.get(f, f) for f in required + optional}


# ---- the offline check the recipe loader runs ---------------------------------------------------

def check_source(cfg: DatasetConfig, where: str) -> list[str]:
    """Problems a look at the source's files can find; none for a hub id (checked when read)."""
    path = Path(cfg.path).expanduser()
    if cfg.format == "bigbench":
        try:
            load_bigbench(cfg.path)
        except UserError as e:
            return [f"{where}.path: {e.problem}"]
        return []
    if not path.exists():
        if looks_local(cfg.path):
            return [f"{where}.path: no such file or folder: {cfg.path} (relative paths are read from "
                    f"{Path.cwd()})"]
        return []
    extra = [f"{where}.{k}: only hub sources have a {k}; remove it for a local file"
             for k in ("subset", "split") if getattr(cfg, k)]
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
        raise UserError(f"{path}: the folder mixes file types; "
                        f"keep one of {', '.join(LOCAL_SUFFIXES)} per source")
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
                raise UserError(f"{file}: a .json source must hold a list of objects "
                                "(or one object per line)")
            return data[:n]
    rows = []
    for _, row in iter_jsonl(file):
        rows.append(row)
        if len(rows) == n:
            break
    return rows


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
    bad = [v for v in labels if v is not None and label_word(v, words) is None]
    if bad:
        return [f"label {bad[0]!r} in {file} is outside label_words {list(words)} (integer labels index it "
                f"from 0 to {len(words) - 1}; text labels must be one of the words)"]
    return []


# ---- reading and normalising ---------------------------------------------------------------------

def load_source(cfg: DatasetConfig, where: str,
                cache_dir: str | None = None) -> tuple[Any, int, list[str] | None]:
    """(rows with the kind's fields as a `datasets.Dataset`, rows dropped as empty, nlu label words)."""
    if cfg.format == "bigbench":
        return datasets.Dataset.from_list(bigbench_rows(load_bigbench(cfg.path))), 0, None
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
        raise UserError(f"{where} ({cfg.name}): cannot load {what} from the Hugging Face hub: "
                        f"{first_line(e)}",
                        "check the id, subset and split; offline, use a cached copy or a local file",
                        ) from None


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


def _is_usable(ok: bool) -> bool:
    return ok


