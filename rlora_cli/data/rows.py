"""One source row as its kind's fields: the fixed schema `normalize_row` writes, row by row.

A value of the wrong type (a list where text is expected would otherwise train as its Python
repr, a date that the JSON reader made of an ISO string), a label outside label_words, an answer
that is not a choice and an unknown chat role are each a UserError naming the row and the field;
a row with an empty required field is kept with `_ok` false, and sources.py drops it.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from datasets import Features, Value

from rlora_cli.config import CHAT_ROLES
from rlora_cli.data.templates import LETTERS
from rlora_cli.errors import UserError

# Other datasets' role names (ShareGPT's human/gpt, Gemini's model) -> ours; every other role is
# an error, not a turn the template renders as it likes.
ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
              **{role: role for role in CHAT_ROLES}}


def label_word(value: Any, words: tuple[str, ...] | list[str]) -> str | None:
    """The label word of a label: an integer indexes `words`, text must be one of them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return words[value] if 0 <= value < len(words) else None
    return str(value) if str(value) in words else None


def kind_features(kind: str) -> Any:
    """The fixed schema `normalize_row` writes. Declared, not inferred: a source column of the same
    name keeps none of its type (a hub ClassLabel would turn label words back into integers)."""
    text = Value("string")
    schema = {"instruction": {"instruction": text, "input": text, "output": text},
              "nlu": {"text": text, "text_pair": text, "label": text},
              "knowledge": {"question": text, "answer": text, "choices": [text],
                            "answer_index": Value("int64")},
              "chat": {"messages": [{"role": text, "content": text}]},
              "completion": {"prompt": text, "completion": text},
              "text": {"text": text}}[kind]
    return Features({**schema, "_ok": Value("bool")})


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
        word = None if label is None else label_word(label, words or [])
        if label is not None and word is None:
            raise UserError(f"{at}: label {label!r} is outside label_words {words}",
                            "fix label_words (integer labels index it from 0) or the data")
        out = {"text": _text(get["text"], at, name["text"]), "label": word or "",
               "text_pair": _text(get.get("text_pair"), at, name["text_pair"])}
        return {**out, "_ok": bool(out["text"].strip() and word)}
    if kind in ("completion", "text"):  # text as it is: only an all-blank field makes a row unusable
        out = {f: _text(get[f], at, name[f]) for f in mapping}
        return {**out, "_ok": all(v.strip() for v in out.values())}
    if kind == "knowledge":
        return _knowledge(get, at, name)
    messages = _messages(get["messages"], at, name["messages"])
    # An assistant turn that opens the conversation answers nothing, so it is not trained.
    return {"messages": messages, "_ok": any(m["role"] == "assistant" and m["content"] for m in messages[1:])}


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
    out = {"question": question, "answer": "" if answer is None else str(answer), "choices": [],
           "answer_index": -1}
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
