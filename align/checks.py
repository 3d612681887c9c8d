"""Checks on the composed config that need no model: numeric ranges and run.name, in one place.

`check(cfg)` runs in `__main__.run_stage` before any stage code (so before a model loads or a finished stage
folder is touched, and for each stage of the pipeline). Hydra's schema already checks keys and types; this
checks values. The ranges are declared with the options, in align/config/ (`opt(default, help, range)`).
"""

import math
import os

from omegaconf import OmegaConf

from align import AlignError
from align.config import AlignConfig
from align.config.options import Range, ranges

# key -> valid range, from the fields' metadata. "a[].b" checks b in every item of the list a, "a[]" every item of a.
# None values (optional options left off) pass. ppo.samples_per_prompt and ppo.rm_weight are checked with the
# options they depend on, in align/rl/ppo.py's check_options.
RANGES: dict[str, Range] = ranges(AlignConfig)


def num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def describe(r: Range) -> str:
    """The valid range in words: '> 0', '>= 1', 'in [0, 0.5)', '-1 or >= 1'."""
    if r.lo is not None and r.hi is not None:
        text = f"in {'(' if r.lo_open else '['}{num(r.lo)}, {num(r.hi)}{')' if r.hi_open else ']'}"
    elif r.lo is not None:
        text = f"{'>' if r.lo_open else '>='} {num(r.lo)}"
    else:
        text = f"{'<' if r.hi_open else '<='} {num(r.hi)}"
    return " or ".join([*(num(v) for v in r.also), text])


def inside(value, r: Range) -> bool:
    if value in r.also:
        return True
    if not math.isfinite(value):
        return False
    lo_ok = r.lo is None or (value > r.lo if r.lo_open else value >= r.lo)
    hi_ok = r.hi is None or (value < r.hi if r.hi_open else value <= r.hi)
    return lo_ok and hi_ok


def values(cfg, key: str):
    """(shown key, value) pairs for a RANGES key; 'a[].b' expands over the list a."""
    if "[]" not in key:
        yield key, OmegaConf.select(cfg, key, default=None)
        return
    head, _, tail = key.partition("[]")
    for i, item in enumerate(OmegaConf.select(cfg, head, default=None) or []):
        sub = OmegaConf.select(item, tail.lstrip("."), default=None) if tail else item
        yield f"{head}[{i}]{tail}", sub


def check_ranges(cfg) -> None:
    for key, r in RANGES.items():
        for shown, value in values(cfg, key):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AlignError(f"{shown}={value!r}: expected a number {describe(r)} ({r.why})")
            if not inside(value, r):
                raise AlignError(f"{shown}={num(value)}: expected {describe(r)} ({r.why})")


def check_run_name(cfg) -> None:
    """run.name is one folder under run.output_dir: never empty, '.', '..', a path or absolute."""
    name = cfg.run.name
    name = "" if name is None else str(name)
    hint = "expected a plain folder name under run.output_dir, e.g. run.name=exp1"
    if not name.strip():
        raise AlignError(f"run.name is empty: {hint}")
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if name in (".", "..") or any(s in name for s in seps) or "\0" in name or os.path.isabs(name):
        raise AlignError(f"run.name={name!r}: {hint} (no path separators, '.' or '..')")
    root = os.path.normpath(os.path.abspath(cfg.run.output_dir))
    if os.path.dirname(os.path.normpath(os.path.join(root, name))) != root:
        raise AlignError(f"run.name={name!r} resolves outside run.output_dir={cfg.run.output_dir}: {hint}")


def check(cfg) -> None:
    """Every check that needs only the config; raises AlignError with one line naming key, value and range."""
    check_run_name(cfg)
    check_ranges(cfg)
