"""Loading one data source: local JSONL/JSON/Parquet/CSV files or hub datasets, optionally through a
dataset format (converters.py) that maps a public dataset's exact columns to canonical rows (formats.py).

Every row is validated. A bad row (unparseable JSON, a missing column, an invalid canonical row)
raises AlignError naming `file:line` (JSONL) or `file:row N` (JSON/Parquet/CSV/hub, 1-based), unless
data.on_bad_rows=skip, in which case it is skipped and counted. Rows a format cannot map by design
(e.g. a redacted Aegis prompt, an hh-rlhf pair with identical answers) are counted as `unmapped`.
"""

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from align import AlignError
from align.config import SourceConfig
from align.data import converters, formats, jsonl

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # an installed wheel ships data_recipes/ inside align/
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
LOADER_OPTIONS = ("hub_split", "hub_config", "revision", "max_rows")
# CSV cells in these columns may hold JSON (lists of messages, category dicts, ...)
STRUCTURED_COLUMNS = {"messages", "prompt", "chosen", "rejected", "categories", "conversations", "category",
                      "conversation", "distractors", "conversation_with_distractors"}


@dataclass
class Loaded:
    rows: list = field(default_factory=list)  # valid canonical rows
    read: int = 0        # raw records read
    bad: int = 0         # records skipped as bad (data.on_bad_rows=skip)
    unmapped: int = 0    # records the format cannot map by design
    first_bad: str = ""  # where/why of the first bad record, for the log line


# --- paths and raw records ----------------------------------------------------------------------

SHIPPED = "shipped:"  # shipped:tax_assistant/off_scope.jsonl names a file the package ships, from a wheel or a clone


def resolve(path: str) -> Path | None:
    """A local file: `shipped:<recipe>/<file>` (data_recipes/ inside the package), absolute, or relative to the
    current directory (a user's folder is their project; nothing is looked up in the package by a relative path)."""
    if path.startswith(SHIPPED):
        p = shipped(path[len(SHIPPED):])
        return p if p.is_file() else None
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    return p if p.is_file() else None


def shipped(relative: str) -> Path:
    """A file shipped in data_recipes/, from a source checkout or an installed wheel."""
    for base in (REPO_ROOT, PACKAGE_DIR):
        if (base / "data_recipes" / relative).exists():
            return base / "data_recipes" / relative
    return REPO_ROOT / "data_recipes" / relative


def is_local(path: str) -> bool:
    """A path that names a file (so a missing one is "file not found", never a hub lookup): shipped:, absolute or
    home-relative, ./ or ../, a data suffix, or any path with a folder in it (hub ids are owner/name, no suffix)."""
    return (resolve(path) is not None or path.startswith((SHIPPED, "/", ".", "~"))
            or Path(path).suffix.lower() in DATA_SUFFIXES or "\\" in path or path.count("/") >= 2)


def describe_missing(path: str) -> str:
    if path.startswith(SHIPPED):
        return f"{path!r} is not a file the package ships (see data_recipes/ in the repo: shipped:<recipe>/<file>)"
    return f"file {path!r} not found (relative paths are read from the current directory, {Path.cwd()})"


def read_file(path: Path) -> Iterator[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from jsonl.records(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:  # many ".json" files on the hub are JSON lines
            yield from jsonl.records(path)
            return
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise AlignError(f"{path}: expected a JSON list of rows (or JSON lines)")
        for i, rec in enumerate(data):
            yield f"{path}:row {i + 1}", rec
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i + 1}", rec
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            try:
                for i, rec in enumerate(csv.DictReader(f)):
                    yield f"{path}:row {i + 1}", _csv_record(rec)
            except UnicodeDecodeError as e:
                raise AlignError(f"{path}: not UTF-8 text ({jsonl.byte_error(e)}); save it as UTF-8") from None
    else:
        raise AlignError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")


def _csv_record(rec: dict) -> dict:
    out = {}
    for key, value in rec.items():
        if value == "":
            value = None  # CSV has no null
        elif key in STRUCTURED_COLUMNS and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def read_hub(src) -> Iterator[tuple[str, object]]:
    opts = src.options
    split = opts.get("hub_split", "train")
    try:
        from datasets import load_dataset

        ds = load_dataset(src.path, opts.get("hub_config"), split=split, revision=opts.get("revision"))
    except Exception as e:  # offline, gated, unknown id, bad split: all end here
        reason = " ".join(str(e).split()) or type(e).__name__
        raise AlignError(f"data source '{src.name}': could not load hub dataset '{src.path}' (offline?): "
                         f"{reason[:300]}") from None
    for i, rec in enumerate(ds):
        yield f"{src.path}[{split}]:row {i + 1}", rec


def _pyrit_harm():
    from align.data import pyrit

    for i, row in enumerate(pyrit.harm_prompts(), 1):
        yield f"pyrit:harm:row {i}", row


# sources the package makes from public data it fetches (pyrit==1.1.0's wheel, MIT): no file, no hub
GENERATED = {"pyrit:harm": _pyrit_harm}


# --- loading one source -------------------------------------------------------------------------

def check_source(src) -> None:
    """Fail on config mistakes before reading anything."""
    name, fmt = src.name, src.format
    if src.kind not in formats.KINDS:
        raise AlignError(f"data source '{name}': kind must be one of {', '.join(formats.KINDS)}, got {src.kind!r}")
    if src.split not in ("train", "eval", "rl"):
        raise AlignError(f"data source '{name}': split must be train, eval or rl, got {src.split!r}")
    if src.count is not None and src.weight is not None:
        raise AlignError(f"data source '{name}': give count or weight, not both")
    valid = LOADER_OPTIONS
    if fmt is not None:
        if fmt not in converters.FORMATS:
            raise AlignError(f"data source '{name}': unknown format {fmt!r}; choices: {', '.join(converters.FORMATS)}")
        spec = converters.FORMATS[fmt]
        if src.kind not in spec.kinds:
            raise AlignError(f"data source '{name}': format '{fmt}' makes {' or '.join(spec.kinds)} "
                             f"rows, not {src.kind!r}")
        valid = valid + spec.options
    for key in src.options:
        if key not in valid:
            raise AlignError(f"data source '{name}': unknown option {key!r}; valid: {', '.join(valid)}")


def _records(src, path: Path | None) -> Iterator[tuple[str, object]]:
    """(where, record) of a generated source, a local file or a hub dataset."""
    if src.path in GENERATED:
        return GENERATED[src.path]()
    if path is not None:
        return read_file(path)
    if is_local(src.path):
        raise AlignError(f"data source '{src.name}': {describe_missing(src.path)}")
    return read_hub(src)


def _canonical_rows(rec, src, spec) -> list:
    """The canonical rows of one record, validated ([] = unmapped by design); raises on a bad record."""
    if isinstance(rec, jsonl.Bad):
        raise ValueError(rec.reason)
    if spec is None:
        rows = [rec]
    else:
        if not isinstance(rec, dict):
            raise ValueError(f"expected an object, got {type(rec).__name__}")
        rows = [{k: v for k, v in r.items() if v is not None or k in ("response", "attack")}
                for r in spec.fn(rec, src.kind, src.options)]
    for row in rows:
        formats.validate(row, src.kind)
    return rows


def load_source(src, on_bad_rows: str = "error") -> Loaded:
    """Read, convert and validate one source. `src` has SourceConfig's fields, options a plain dict."""
    if on_bad_rows not in ("error", "skip"):
        raise AlignError(f"data.on_bad_rows must be error or skip, got {on_bad_rows!r}")
    check_source(src)
    path = resolve(src.path)
    records = _records(src, path)
    fmt = src.format
    spec = converters.FORMATS[fmt] if fmt else None
    max_rows = src.options.get("max_rows")
    out = Loaded()
    for where, rec in records:
        if max_rows is not None and out.read >= max_rows:
            break
        out.read += 1
        try:
            rows = _canonical_rows(rec, src, spec)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            reason = f"missing column {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            if spec is not None and isinstance(e, (KeyError, TypeError, AttributeError, IndexError)):
                reason = f"format '{fmt}': {reason}"
            msg = f"data source '{src.name}': {where}: {reason}"
            if on_bad_rows == "error":
                raise AlignError(msg + " (set data.on_bad_rows=skip to skip and count bad rows)") from None
            out.bad += 1
            out.first_bad = out.first_bad or msg
            continue
        if not rows:
            out.unmapped += 1
            continue
        out.rows.extend(rows)
    if out.read == 0 and path is not None:  # an empty file would build a "finished" stage with nothing in it
        raise AlignError(f"data source '{src.name}': {path} has no rows; add rows or remove the source from the recipe")
    if out.bad:
        log.warning("data source '%s': skipped %d bad row(s) of %d; first: %s", src.name, out.bad, out.read,
                    out.first_bad)
    if out.unmapped:
        log.info("data source '%s': %d row(s) the '%s' format does not map", src.name, out.unmapped, fmt)
    return out


def load_scope_files(paths, on_bad_rows: str = "error", what: str = "eval.prompts") -> list[dict]:
    """Scope-eval JSONL files (prompt, expected, category, attack) named by a config list such as eval.prompts."""
    rows = []
    for path in paths:
        loaded = load_source(SourceConfig(name=Path(path).stem, path=path, kind="scope_eval", split="eval"),
                             on_bad_rows)
        if loaded.bad:
            log.warning("%s: skipped %d bad rows in %s", what, loaded.bad, path)
        rows += loaded.rows
    return rows
