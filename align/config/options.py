"""How an option is declared (`opt`: default, one-line help, valid range) and read back (`options`, `ranges`).

Every option of align's config is a dataclass field made by `opt` (align/config/schema.py and stage_sections.py);
`align/checks.py` checks the ranges before a stage runs, `python -m align --help` prints the help, and
conf/config.yaml is generated from the same fields (align/config/yaml_file.py).
"""

import copy
import dataclasses
import typing
from dataclasses import field
from typing import Any, Iterator, List, NamedTuple


class Range(NamedTuple):
    lo: float | None  # None: no lower bound
    hi: float | None  # None: no upper bound
    why: str  # one line: what goes wrong outside the range
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False
    also: tuple = ()  # special values allowed outside the range (e.g. -1 = off)


def at_least(lo, why, also=()) -> Range:
    return Range(lo, None, why, also=also)


def above(lo, why) -> Range:
    return Range(lo, None, why, lo_open=True)


UNIT = Range(0, 1, "a rate or probability")
SEED = Range(0, 2**32 - 1, "numpy's seed range; transformers.set_seed seeds numpy too")


def opt(default, help: str, range: Range | None = None):
    """A config option: its default, a one-line help (shown by `python -m align --help` and above the key in
    conf/config.yaml) and, for numbers, its valid range (checked by align/checks.py before a stage runs; on a list
    option the range applies to every item; None values, options left off, always pass)."""
    metadata = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, help: str = ""):
    """A nested group of options."""
    return field(default_factory=cls, metadata={"help": help})


class Option(NamedTuple):
    key: str  # dotted; "a[].b" is field b of every item of the list a
    default: Any  # the declared default ("???" = required)
    help: str
    range: Range | None
    type: Any


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def list_item(t) -> Any:
    """T for List[T] / Optional[List[T]], else None."""
    if typing.get_origin(t) is typing.Union:
        t = next((a for a in typing.get_args(t) if a is not type(None)), t)
    if typing.get_origin(t) in (list, List):
        args = typing.get_args(t)
        return args[0] if args else Any
    return None


def options(cls, prefix: str = "") -> Iterator[Option]:
    """Every option (leaf field) under cls, in declaration order; a list of dataclasses gives its own option and
    then its items' fields as "key[].field"."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(t):
            yield from options(t, key + ".")
            continue
        yield Option(key, _default(f), f.metadata.get("help", ""), f.metadata.get("range"), t)
        item = list_item(t)
        if dataclasses.is_dataclass(item):
            yield from options(item, key + "[].")


def ranges(cls) -> dict[str, Range]:
    """key -> valid range, for align/checks.py. A range on a list option applies to its items ("key[]")."""
    return {o.key + ("[]" if list_item(o.type) is not None else ""): o.range for o in options(cls) if o.range}

