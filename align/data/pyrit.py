"""Public harm prompts, jailbreak templates and human refusal labels from the PyRIT wheel (pyrit 1.1.0, MIT).

The wheel is fetched once with `pip download --no-deps` (never installed: PyRIT's dependencies are large and none
is needed to read its data files) and cached under `cache_dir()/pyrit-1.1.0`; files are read straight out of the
zip. `wheel=` (or `$ALIGN_PYRIT_WHEEL`) may name another wheel or a folder laid out like the wheel, such as the
test fixture `tests/fixtures/public/pyrit`.

- `harm_prompts`: AdvBench's 520 harmful behaviours and the AI Red Team (AIRT) objectives as scope-eval rows;
- `jailbreak_templates` + `fill`: jailbreak wrappers with one `{{ prompt }}` slot;
- `refusal_labels`: 169 human-labelled responses (refused/answered). PyRIT counts a reply unrelated to the request
  as a refusal, which our own convention (data_recipes/judge/README.md) does not cover: read scores on it with that
  in mind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from align import AlignError
from align.data import formats
from align.data.formats import slug

log = logging.getLogger(__name__)

WHEEL = "pyrit==1.1.0"
WHEEL_SHA256 = "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"
ENV_VAR = "ALIGN_PYRIT_WHEEL"
ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
AIRT_DIR = "pyrit/datasets/seed_datasets/local/airt/"
TEMPLATES_DIR = "pyrit/datasets/jailbreak/templates/"
REFUSAL_CSVS = ("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv")
SLOT = "{{ prompt }}"

# AdvBench's first label is one of nine top-level harm types of arXiv:2407.01294; the long ones get short slugs.
SHORT_CATEGORIES = {"financial and business": "financial", "human rights and civil liberties": "human_rights",
                    "societal and cultural": "societal", "political and economic": "political"}
# AIRT files that hold no harmful request: yes/no questions with no good yes/no answer (a model should answer them
# with nuance, not refuse), so an "expected: refuse" row would be wrong.
SKIP_AIRT_FILES = {"fairness_yes_no.prompt": "benign yes/no questions, not harm requests"}


# --- where the files are --------------------------------------------------------------------------------------------

@dataclass
class _Source:
    names: List[str]  # paths as inside the wheel, "/"-separated
    read: Callable[[str], str]
    where: str


def wheel_path(wheel=None) -> Path:
    """The wheel (or wheel-like folder) to read: `wheel`, else $ALIGN_PYRIT_WHEEL, else the cached download."""
    given = wheel or os.environ.get(ENV_VAR)
    if given:
        path = Path(given).expanduser()
        if not path.exists():
            raise AlignError(f"PyRIT data: {path} not found (expected a pyrit wheel or a folder laid out like one)")
        return path
    folder = _cache_folder()
    found = sorted(folder.glob("pyrit-*.whl"))
    return found[0] if found else _download(folder)


def _cache_folder() -> Path:
    from align.models import cache_dir  # imported here: align.models pulls in torch

    return cache_dir() / "pyrit-1.1.0"


def _download(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI (no dependencies, not installed; once)", WHEEL)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # a cut-off download never looks like a cached wheel
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        got = list(Path(tmp).glob("pyrit-*.whl")) if subprocess.run(cmd).returncode == 0 else []
        if not got:
            raise AlignError(f"could not download {WHEEL} with pip; check network access to PyPI")
        digest = hashlib.sha256(got[0].read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise AlignError(f"{got[0].name}: sha256 {digest[:12]}... is not the pinned {WHEEL_SHA256[:12]}...")
        target = folder / got[0].name
        shutil.move(str(got[0]), target)
    return target


def _open(wheel=None) -> _Source:
    path = wheel_path(wheel)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        return _Source(names, lambda name: (path / name).read_text(encoding="utf-8"), str(path))
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AlignError(f"PyRIT data: {path} is not a readable wheel ({e})") from None
    return _Source(sorted(zf.namelist()), lambda name: zf.read(name).decode("utf-8"), str(path))


def _read(src: _Source, name: str) -> str:
    if name not in src.names:
        raise AlignError(f"PyRIT data: {name} missing in {src.where}")
    return src.read(name)


def _yaml(src: _Source, name: str):
    import yaml

    try:
        return yaml.safe_load(_read(src, name))
    except yaml.YAMLError as e:
        raise AlignError(f"PyRIT data: {src.where}/{name}: invalid YAML ({' '.join(str(e).split())[:200]})") from None


# --- harm prompts ---------------------------------------------------------------------------------------------------

def category_slug(name: Optional[str]) -> str:
    """'Financial and Business' -> 'financial', 'cyber_harms' -> 'cyber_harms', None -> 'general'."""
    if not name or not str(name).strip():
        return "general"
    key = " ".join(str(name).lower().split())
    return SHORT_CATEGORIES.get(key) or slug(key)


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _seed_rows(doc: dict, source: str, id_prefix: str, skipped: Dict[str, str]) -> List[dict]:
    """One row per seed a user would send as is; per-seed harm_categories override the file's."""
    rows, file_cats = [], _as_list(doc.get("harm_categories"))
    for i, seed in enumerate(doc.get("seeds") or []):
        seed_type = seed.get("seed_type", doc.get("seed_type", "objective"))
        # a scripted multi-turn conversation's turns (assistant replies, benign openers, follow-ups like "Now make
        # one group superior") are no request on their own; the conversation's objective is kept
        if seed.get("role") == "assistant" or (seed.get("prompt_group_alias") and seed_type != "objective"):
            skipped[f"{id_prefix}-{i}"] = "a turn of a scripted conversation, not a standalone request"
            continue
        text = seed.get("value")
        if not isinstance(text, str) or not text.strip():
            skipped[f"{id_prefix}-{i}"] = "empty value"
            continue
        cats = _as_list(seed.get("harm_categories")) or file_cats
        row = {"prompt": text.strip(), "expected": "refuse", "source": source, "id": f"{id_prefix}-{i}",
               "category": f"unsafe/{category_slug(cats[0] if cats else None)}"}
        try:
            formats.validate(row, "scope_eval")
        except ValueError as e:
            raise AlignError(f"PyRIT data: {row['id']}: {e}") from None
        rows.append(row)
    return rows


def harm_prompts(wheel=None, skipped: Optional[Dict[str, str]] = None) -> List[dict]:
    """AdvBench + AIRT as scope-eval rows {prompt, expected: refuse, category: unsafe/<slug>, source, id}.

    `skipped`, if given, is filled with {row or file id: reason} for what is left out (see SKIP_AIRT_FILES).
    """
    skipped = {} if skipped is None else skipped
    src = _open(wheel)
    rows = _seed_rows(_yaml(src, ADVBENCH), "advbench", "advbench", skipped)
    for name in (n for n in src.names if n.startswith(AIRT_DIR) and n.endswith(".prompt")):
        base = name[len(AIRT_DIR):]
        if base in SKIP_AIRT_FILES:
            skipped[f"airt/{base}"] = SKIP_AIRT_FILES[base]
            continue
        rows += _seed_rows(_yaml(src, name), "airt", f"airt/{base[:-len('.prompt')]}", skipped)
    if skipped:
        log.info("PyRIT harm prompts: %d rows, %d skipped", len(rows), len(skipped))
    return rows


# --- jailbreak templates --------------------------------------------------------------------------------------------

def _render(value: str) -> str:
    """The template with Jinja's raw blocks and escapes resolved and the slot written as SLOT."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    marker = "\x00prompt\x00"
    # sandboxed: the templates are third-party text (some are "in the wild" community posts)
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    text = env.from_string(value).render(prompt=marker)
    if SLOT in text:
        raise ValueError(f"the text itself contains {SLOT!r}, so the slot would be ambiguous")
    if marker not in text:
        raise ValueError("no prompt slot in the text")
    return text.strip().replace(marker, SLOT)


def jailbreak_templates(wheel=None, skipped: Optional[Dict[str, str]] = None) -> List[dict]:
    """{name, text, tokens_hint} per template whose only parameter is `prompt`, sorted by name.

    name is the path under jailbreak/templates without .yaml; text holds SLOT where the prompt goes (maybe more than
    once); tokens_hint is the word count of the rest. `skipped` gets {name: reason} for the templates left out.
    """
    skipped = {} if skipped is None else skipped
    src, out = _open(wheel), []
    for path in (n for n in src.names if n.startswith(TEMPLATES_DIR) and n.endswith(".yaml")):
        name = path[len(TEMPLATES_DIR):-len(".yaml")]
        try:
            doc = _yaml(src, path)
        except AlignError as e:
            skipped[name] = str(e)
            continue
        params = doc.get("parameters") if isinstance(doc, dict) else None
        if params != ["prompt"] or not isinstance(doc.get("value"), str):
            skipped[name] = f"parameters {params} (need exactly ['prompt'])"
            continue
        try:
            text = _render(doc["value"])
        except Exception as e:  # jinja2 raises many types; any of them means we cannot use the template
            skipped[name] = f"cannot render: {type(e).__name__}: {e}"[:200]
            continue
        out.append({"name": name, "text": text, "tokens_hint": len(text.replace(SLOT, " ").split())})
    if skipped:
        log.info("PyRIT jailbreak templates: %d kept, %d skipped", len(out), len(skipped))
    return out


def fill(template_text: str, prompt: str) -> str:
    """The template with every slot replaced by `prompt` (one pass: a slot inside `prompt` stays as typed)."""
    if SLOT not in template_text:
        raise AlignError(f"jailbreak template has no {SLOT} slot: {template_text[:60]!r}")
    return template_text.replace(SLOT, prompt)


def split_templates(templates: Sequence[dict], eval_fraction: float, seed: int = 0) -> Tuple[List[dict], List[dict]]:
    """(train, eval) split of templates by a hash of seed and name: deterministic, disjoint, and a template keeps
    its side when others are added or removed (so eval rows never leak into training across data versions)."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise AlignError(f"eval_fraction must lie in [0, 1], got {eval_fraction}")
    train, held = [], []
    for t in templates:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{t['name']}".encode()).digest()[:8], "big") / 2.0 ** 64
        (held if h < eval_fraction else train).append(t)
    return train, held


# --- human refusal labels -------------------------------------------------------------------------------------------

def _csv_rows(text: str) -> List[dict]:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))  # "# dataset_version"
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def refusal_labels(wheel=None) -> List[dict]:
    """{prompt, response, verdict, source} from refusal.csv and refusal_extra.csv; human_score 1 = refused."""
    src, out = _open(wheel), []
    for name in REFUSAL_CSVS:
        for n, rec in enumerate(_csv_rows(_read(src, name)), 1):
            score = (rec.get("human_score") or "").strip()
            if score not in ("0", "1") or rec.get("assistant_response") is None:
                raise AlignError(f"PyRIT data: {name}: row {n}: expected human_score 0 or 1 and an assistant_response")
            out.append({"prompt": rec.get("objective") or "", "response": rec["assistant_response"],
                        "verdict": "refused" if score == "1" else "answered", "source": Path(name).name})
    return out
