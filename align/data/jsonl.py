"""JSON lines, the project's one reader and one writer.

The reader is strict about where a problem is: each line is decoded on its own, so a bad byte or a bad JSON line is
that line's error (`file:line`), never a traceback, and a UTF-8 BOM (Excel, Notepad) is dropped. The writer writes
UTF-8, one JSON object per line, non-ASCII text as it is, whole or not at all (a reader never sees half a file).
"""

import json
from pathlib import Path
from typing import Iterator

from align import AlignError


class Bad:
    """A record that could not even be parsed (it still counts as a bad row)."""

    def __init__(self, reason: str):
        self.reason = reason


def byte_error(e: UnicodeDecodeError) -> str:
    return f"byte 0x{e.object[e.start]:02x} at position {e.start}"


def records(path: Path) -> Iterator[tuple[str, object]]:
    """(`file:line`, record or Bad) per non-blank line. Lines as bytes, decoded one by one: a bad byte is that line's
    error (file:line), not a traceback; a UTF-8 BOM (Excel, Notepad) is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", Bad(f"not UTF-8 text ({byte_error(e)}); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", Bad(f"invalid JSON: {e.msg} (column {e.colno})")


def read(path: Path) -> list:
    """Every record of a file this package wrote; the first bad line is an AlignError naming `file:line`."""
    rows = []
    for where, rec in records(path):
        if isinstance(rec, Bad):
            raise AlignError(f"{where}: {rec.reason}")
        rows.append(rec)
    return rows


def text(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write(path: Path, rows) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text(rows), encoding="utf-8")
    tmp.replace(path)
