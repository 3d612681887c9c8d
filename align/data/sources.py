"""Loading one data source: local JSONL/JSON/Parquet/CSV files or hub datasets, optionally through an
adapter that maps a public dataset's exact columns to canonical rows (formats.py).

Every row is validated. A bad row (unparseable JSON, a missing column, an invalid canonical row)
raises AlignError naming `file:line` (JSONL) or `file:row N` (JSON/Parquet/CSV/hub, 1-based), unless
data.on_bad_rows=skip, in which case it is skipped and counted. Rows an adapter cannot map by design
(e.g. a redacted Aegis prompt, an hh-rlhf pair with identical answers) are counted as `unmapped`.
"""

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from align import AlignError
from align.config import SourceConfig
from align.data import formats
from align.data.formats import slug

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
    unmapped: int = 0    # records the adapter cannot map by design
    first_bad: str = ""  # where/why of the first bad record, for the log line


class _Bad:
    """A record that could not even be parsed (it still counts as a bad row)."""

    def __init__(self, reason: str):
        self.reason = reason


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
        yield from _read_jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:  # many ".json" files on the hub are JSON lines
            yield from _read_jsonl(path)
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
                raise AlignError(f"{path}: not UTF-8 text ({_byte_error(e)}); save it as UTF-8") from None
    else:
        raise AlignError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")


def _read_jsonl(path: Path):
    """Lines as bytes, decoded one by one: a bad byte is that line's error (file:line), not a traceback; a UTF-8 BOM
    (Excel, Notepad) is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", _Bad(f"not UTF-8 text ({_byte_error(e)}); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", _Bad(f"invalid JSON: {e.msg} (column {e.colno})")


def _byte_error(e: UnicodeDecodeError) -> str:
    return f"byte 0x{e.object[e.start]:02x} at position {e.start}"


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


# --- helpers for adapters -----------------------------------------------------------------------

def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": str(content).strip()}


def _nonempty(*texts) -> bool:
    return all(isinstance(t, str) and t.strip() for t in texts)


# --- adapters: public dataset rows -> canonical rows ----------------------------------------------
# Each takes (record, kind, options) and returns a list of canonical rows ([] = unmapped by design).
# A missing column raises KeyError, which the loader reports as a bad row.

def gair_lima(rec, kind, opts):
    """GAIR/lima: `conversations` (alternating user/assistant strings, user first), `source`."""
    turns = [_msg("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(rec["conversations"])]
    origin = f"lima/{rec['source']}" if rec.get("source") else None
    return _chat_rows(turns, kind, origin)


def h4_lima(rec, kind, opts):
    """HuggingFaceH4/lima: `messages` [{role, content}], `prompt_id`, `prompt`, `meta`."""
    turns = [_msg(m["role"], m["content"]) for m in rec["messages"]]
    return _chat_rows(turns, kind, None, rec.get("prompt_id"))


def _chat_rows(turns, kind, origin=None, row_id=None):
    extra = {k: v for k, v in (("id", row_id), ("source", origin)) if v}
    if kind == "sft":
        while turns and turns[-1]["role"] != "assistant":
            turns = turns[:-1]  # GAIR/lima's test split and some dialogs end with a user turn
        return [{"messages": turns, **extra}] if turns else []
    while turns and turns[-1]["role"] != "user":
        turns = turns[:-1]
    return [{"prompt": turns, **extra}] if turns else []


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _parse_hh(text: str) -> list:
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [_msg(roles[parts[i]], parts[i + 1]) for i in range(1, len(parts), 2)]


def hh_rlhf(rec, kind, opts):
    """Anthropic/hh-rlhf: `chosen`/`rejected` full transcripts; the last Assistant turn is the answer."""
    marker = "\n\nAssistant:"
    chosen, rejected = rec["chosen"], rec["rejected"]
    ic, ir = chosen.rfind(marker), rejected.rfind(marker)
    if ic < 0 or ir < 0:
        raise ValueError("transcript has no '\\n\\nAssistant:' turn")
    prefix, answer_c, answer_r = chosen[:ic], chosen[ic + len(marker):].strip(), rejected[ir + len(marker):].strip()
    prompt = _parse_hh(prefix)
    # known quirks of the dataset: different histories, empty or identical answers, empty turns
    if rejected[:ir] != prefix or not answer_c or not answer_r or answer_c == answer_r:
        return []
    if not prompt or prompt[-1]["role"] != "user" or not all(m["content"] for m in prompt):
        return []
    if kind == "preference":
        return [{"prompt": prompt, "chosen": [_msg("assistant", answer_c)],
                 "rejected": [_msg("assistant", answer_r)]}]
    if kind == "sft":
        return [{"messages": prompt + [_msg("assistant", answer_c)]}]
    return [{"prompt": prompt}]


def pku_saferlhf(rec, kind, opts):
    """PKU-Alignment/PKU-SafeRLHF: prompt, response_0/1, is_response_0/1_safe, better/safer_response_id."""
    mode = opts.get("preference", "safer")
    if mode not in ("safer", "better"):
        raise AlignError(f"pku_saferlhf: option preference must be safer or better, got {mode!r}")
    best = int(rec[f"{mode}_response_id"])
    chosen, rejected = rec[f"response_{best}"], rec[f"response_{1 - best}"]
    # preferring the lesser of two harmful answers teaches harm: by default the chosen must be safe
    if mode == "safer" and opts.get("require_safe_chosen", True) and not _truthy(rec[f"is_response_{best}_safe"]):
        return []
    if not _nonempty(rec["prompt"], chosen, rejected) or chosen.strip() == rejected.strip():
        return []
    return [{"prompt": [_msg("user", rec["prompt"])], "chosen": [_msg("assistant", chosen)],
             "rejected": [_msg("assistant", rejected)]}]


def beavertails(rec, kind, opts):
    """PKU-Alignment/BeaverTails: prompt, response, category {14 harm names: bool}, is_safe (of the QA pair)."""
    safe = _truthy(rec["is_safe"])
    cats = sorted(f"unsafe/{slug(name)}" for name, on in (rec["category"] or {}).items() if _truthy(on))
    if not safe and not cats:
        cats = ["unsafe/other"]
    response = rec.get("response") if _nonempty(rec.get("response")) else None
    return [{"prompt": rec["prompt"], "response": response, "label": "safe" if safe else "unsafe",
             "categories": cats if not safe else ["general"]}]


def aegis2(rec, kind, opts):
    """nvidia/Aegis-AI-Content-Safety-Dataset-2.0: prompt, response, prompt_label, response_label,
    violated_categories (comma-separated), reconstruction_id_if_redacted, *_label_source."""
    prompt = rec["prompt"]
    if not _nonempty(prompt) or prompt.strip() == "REDACTED":
        return []  # redacted prompts must be reconstructed from their source (reconstruction_id_if_redacted)
    label = rec["prompt_label"]
    if label not in ("safe", "unsafe"):
        raise ValueError(f"prompt_label must be safe or unsafe, got {label!r}")
    cats = [f"unsafe/{slug(c)}" for c in (rec.get("violated_categories") or "").split(",") if c.strip()]
    cats = (cats or ["unsafe/other"]) if label == "unsafe" else ["general"]
    if kind == "scope_eval":
        return [{"prompt": prompt, "expected": "refuse" if label == "unsafe" else "answer",
                 "category": cats[0], "attack": None, "id": rec.get("id")}]
    # a response is kept when it matches the prompt: a safe answer to a safe prompt, or a harmful
    # compliance to an unsafe prompt (usable as a DPO rejected, never as a target)
    response = rec.get("response")
    keep = _nonempty(response) and rec.get("response_label") == label
    return [{"prompt": prompt, "response": response if keep else None, "label": label, "categories": cats,
             "id": rec.get("id")}]


def wildguardmix(rec, kind, opts):
    """allenai/wildguardmix: prompt, adversarial, response, prompt_harm_label, response_refusal_label,
    response_harm_label, subcategory."""
    harm = rec["prompt_harm_label"]
    if harm not in ("harmful", "unharmful"):
        return []  # a few rows carry no prompt label
    unsafe = harm == "harmful"
    category = f"unsafe/{slug(rec.get('subcategory') or 'other')}" if unsafe else "general"
    adversarial = _truthy(rec.get("adversarial"))
    if kind == "scope_eval":
        return [{"prompt": rec["prompt"], "expected": "refuse" if unsafe else "answer", "category": category,
                 "attack": "adversarial" if adversarial else None}]
    response = rec.get("response")
    complied = rec.get("response_refusal_label") == "compliance"
    # benign prompt: keep a harmless compliant answer; harmful prompt: keep a compliance (a rejected)
    keep = _nonempty(response) and complied and (unsafe or rec.get("response_harm_label") == "unharmful")
    cats = [category] + (["attack/adversarial"] if adversarial else [])
    return [{"prompt": rec["prompt"], "response": response if keep else None,
             "label": "unsafe" if unsafe else "safe", "categories": cats}]


def xstest(rec, kind, opts):
    """XSTest (paul-rottger/xstest, xstest_prompts.csv): id, prompt, type, label, focus, note."""
    safe = rec["label"] == "safe"
    if rec["label"] not in ("safe", "unsafe"):
        raise ValueError(f"label must be safe or unsafe, got {rec['label']!r}")
    category = f"xstest/{slug(rec['type'])}" if safe else f"unsafe/{slug(rec['type'])}"
    row_id = str(rec["id"]) if rec.get("id") is not None else None
    if kind == "safety":
        return [{"prompt": rec["prompt"], "response": None, "label": rec["label"], "categories": [category]}]
    out = {"prompt": rec["prompt"], "expected": "answer" if safe else "refuse", "category": category, "attack": None}
    return [{**out, "id": row_id} if row_id else out]


def off_topic(rec, kind, opts):
    """gabrielchua/off-topic: system_prompt, prompt, off_topic (1 = off-topic for that system prompt)."""
    off = int(rec["off_topic"]) == 1
    row = {"prompt": rec["prompt"], "expected": "refuse" if off else "answer",
           "category": "off_scope/off_topic" if off else "in_scope/on_topic", "attack": None}
    if _nonempty(rec.get("system_prompt")):
        row["system"] = rec["system_prompt"]
    return [row]


ROLE_ALIASES = {"user": "user", "assistant": "assistant", "bot": "assistant", "human": "user", "system": "system"}


def cant_talk_about_this(rec, kind, opts):
    """nvidia/CantTalkAboutThis-Topic-Control-Dataset: domain, scenario, system_instruction, conversation,
    distractors [{"distractor", "bot turn"}], conversation_with_distractors.

    conversation_with_distractors is read as a list of conversation blocks (each a list of
    {role, content} turns) or as one flat list of turns. A distractor turn is a user turn whose text
    equals one of `distractors[].distractor`. mode=full (default): one row per block, trimmed to end
    with the assistant; mode=redirects: one row per distractor, ending with the assistant's redirect.
    """
    mode = opts.get("mode", "full")
    if mode not in ("full", "redirects"):
        raise AlignError(f"cant_talk_about_this: option mode must be full or redirects, got {mode!r}")
    conv = rec["conversation_with_distractors"]
    blocks = conv if conv and isinstance(conv[0], list) else [conv]
    distractors = {d["distractor"].strip() for d in rec.get("distractors") or [] if d.get("distractor")}
    system = [_msg("system", rec["system_instruction"])] if _nonempty(rec.get("system_instruction")) else []
    rows, seen = [], []
    for block in blocks:
        turns = [_msg(ROLE_ALIASES[t["role"].lower()], t["content"]) for t in block]
        if mode == "redirects":
            ends = [i + 2 for i, t in enumerate(turns[:-1])
                    if t["role"] == "user" and t["content"] in distractors and turns[i + 1]["role"] == "assistant"]
        else:
            ends = [max((i + 1 for i, t in enumerate(turns) if t["role"] == "assistant"), default=0)]
        for end in ends:
            msgs = system + turns[:end]
            if end and msgs not in seen:
                seen.append(msgs)
                rows.append({"messages": msgs})
    return rows


@dataclass(frozen=True)
class Adapter:
    fn: Callable
    kinds: tuple
    options: tuple = ()


ADAPTERS = {
    "gair_lima": Adapter(gair_lima, ("sft", "prompt")),
    "h4_lima": Adapter(h4_lima, ("sft", "prompt")),
    "hh_rlhf": Adapter(hh_rlhf, ("preference", "sft", "prompt")),
    "pku_saferlhf": Adapter(pku_saferlhf, ("preference",), ("preference", "require_safe_chosen")),
    "beavertails": Adapter(beavertails, ("safety",)),
    "aegis2": Adapter(aegis2, ("safety", "scope_eval")),
    "wildguardmix": Adapter(wildguardmix, ("safety", "scope_eval")),
    "xstest": Adapter(xstest, ("scope_eval", "safety")),
    "off_topic": Adapter(off_topic, ("scope_eval",)),
    "cant_talk_about_this": Adapter(cant_talk_about_this, ("sft",), ("mode",)),
}


def _pyrit_harm():
    from align.data import pyrit

    for i, row in enumerate(pyrit.harm_prompts(), 1):
        yield f"pyrit:harm:row {i}", row


# sources the package makes from public data it fetches (pyrit==1.1.0's wheel, MIT): no file, no hub
GENERATED = {"pyrit:harm": _pyrit_harm}


# --- loading one source -------------------------------------------------------------------------

def check_source(src) -> None:
    """Fail on config mistakes before reading anything."""
    name = src.name
    if src.kind not in formats.KINDS:
        raise AlignError(f"data source '{name}': kind must be one of {', '.join(formats.KINDS)}, got {src.kind!r}")
    if src.split not in ("train", "eval", "rl"):
        raise AlignError(f"data source '{name}': split must be train, eval or rl, got {src.split!r}")
    if src.count is not None and src.weight is not None:
        raise AlignError(f"data source '{name}': give count or weight, not both")
    valid = LOADER_OPTIONS
    if src.adapter is not None:
        if src.adapter not in ADAPTERS:
            raise AlignError(f"data source '{name}': unknown adapter {src.adapter!r}; choices: {', '.join(ADAPTERS)}")
        adapter = ADAPTERS[src.adapter]
        if src.kind not in adapter.kinds:
            raise AlignError(f"data source '{name}': adapter '{src.adapter}' makes {' or '.join(adapter.kinds)} "
                             f"rows, not {src.kind!r}")
        valid = valid + adapter.options
    for key in src.options:
        if key not in valid:
            raise AlignError(f"data source '{name}': unknown option {key!r}; valid: {', '.join(valid)}")


def load_source(src, on_bad_rows: str = "error") -> Loaded:
    """Read, adapt and validate one source. `src` has SourceConfig's fields, options a plain dict."""
    if on_bad_rows not in ("error", "skip"):
        raise AlignError(f"data.on_bad_rows must be error or skip, got {on_bad_rows!r}")
    check_source(src)
    path = resolve(src.path)
    if src.path in GENERATED:
        records = GENERATED[src.path]()
    elif path is not None:
        records = read_file(path)
    elif is_local(src.path):
        raise AlignError(f"data source '{src.name}': {describe_missing(src.path)}")
    else:
        records = read_hub(src)
    adapter = ADAPTERS[src.adapter] if src.adapter else None
    max_rows = src.options.get("max_rows")
    out = Loaded()
    for where, rec in records:
        if max_rows is not None and out.read >= max_rows:
            break
        out.read += 1
        try:
            if isinstance(rec, _Bad):
                raise ValueError(rec.reason)
            if adapter is None:
                rows = [rec]
            else:
                if not isinstance(rec, dict):
                    raise ValueError(f"expected an object, got {type(rec).__name__}")
                rows = [{k: v for k, v in r.items() if v is not None or k in ("response", "attack")}
                        for r in adapter.fn(rec, src.kind, src.options)]
                if not rows:
                    out.unmapped += 1
                    continue
            for row in rows:
                formats.validate(row, src.kind)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            reason = f"missing column {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            if adapter is not None and isinstance(e, (KeyError, TypeError, AttributeError, IndexError)):
                reason = f"adapter '{src.adapter}': {reason}"
            msg = f"data source '{src.name}': {where}: {reason}"
            if on_bad_rows == "error":
                raise AlignError(msg + " (set data.on_bad_rows=skip to skip and count bad rows)") from None
            out.bad += 1
            out.first_bad = out.first_bad or msg
            continue
        out.rows.extend(rows)
    if out.read == 0 and path is not None:  # an empty file would build a "finished" stage with nothing in it
        raise AlignError(f"data source '{src.name}': {path} has no rows; add rows or remove the source from the recipe")
    if out.bad:
        log.warning("data source '%s': skipped %d bad row(s) of %d; first: %s", src.name, out.bad, out.read,
                    out.first_bad)
    if out.unmapped:
        log.info("data source '%s': %d row(s) the '%s' adapter does not map", src.name, out.unmapped, src.adapter)
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
