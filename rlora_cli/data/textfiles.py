"""Text files from users: UTF-8 (a BOM is fine), JSON lines, and the error naming the first bad byte.

Every reader of a user's text file (data sources, BIG-bench tasks, recipes, prompt files) decodes
with `TEXT_ENCODING` and turns a decoding failure into `not_utf8(file)`: one line with the file,
the offending byte and its offset, and how to re-save the file.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from rlora_cli.errors import UserError

# utf-8-sig: a BOM (Excel writes one) is skipped, as datasets' readers skip it.
TEXT_ENCODING = "utf-8-sig"
UTF8_FIX = ("re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW, "
            "or your editor's 'save with encoding')")


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
