"""The per-source stats table of a build: every row removed or added is counted per source, so that for each
source rows - dropped + added + resampled - held_out = kept.
"""

from collections import Counter

from align.config import SourceConfig
from align.data.store import Built


def new_stats(src: SourceConfig, loaded) -> dict:
    """A source's line of the table, from what its loader read (a sources.Loaded)."""
    return {"source": src.name, "split": src.split, "kind": src.kind, "read": loaded.read, "bad": loaded.bad,
            "unmapped": loaded.unmapped, "rows": len(loaded.rows), "dropped": {}, "added": {}, "resampled": 0,
            "held_out": 0, "kept": 0}


def track(stats: dict, label: str, before: Counter, after: Counter) -> None:
    """Count per source what one step (a column, `label`) dropped or added: rows per source before and after it."""
    for name in stats:
        delta = after[name] - before[name]
        stats[name]["dropped"].setdefault(label, 0)
        if delta < 0:
            stats[name]["dropped"][label] += -delta
        elif delta > 0:
            stats[name]["added"][label] = stats[name]["added"].get(label, 0) + delta


def print_table(stats: list) -> str:
    """A fixed-width table: one line per source, filter columns as -dropped/+added, and a total."""
    filters = []
    for s in stats:
        for name in list(s["dropped"]) + list(s["added"]):
            if name not in filters:
                filters.append(name)
    cols = ["source", "split", "kind", "read", "bad", "unmapped", "rows", *filters, "resampled", "held_out", "kept"]

    def cells(s):
        def signed(name):
            delta = s["added"].get(name, 0) - s["dropped"].get(name, 0)
            return f"{delta:+d}" if delta else "0"
        return [s["source"], s["split"], s["kind"], *(str(s[k]) for k in ("read", "bad", "unmapped", "rows")),
                *(signed(f) for f in filters), f"{s['resampled']:+d}" if s["resampled"] else "0",
                str(s["held_out"]), str(s["kept"])]

    lines = [cells(s) for s in stats]
    total = {"source": "total", "split": "", "kind": "", "resampled": sum(s["resampled"] for s in stats),
             **{k: sum(s[k] for s in stats) for k in ("read", "bad", "unmapped", "rows", "held_out", "kept")},
             "dropped": {f: sum(s["dropped"].get(f, 0) for s in stats) for f in filters},
             "added": {f: sum(s["added"].get(f, 0) for s in stats) for f in filters}}
    lines.append(cells(total))
    widths = [max(len(c), *(len(row[i]) for row in lines)) for i, c in enumerate(cols)]

    def fmt(row):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cols), rule, *(fmt(r) for r in lines[:-1]), rule, fmt(lines[-1])])


def summary(built: Built) -> dict:
    """Flat metrics for metrics.json: output sizes and totals of the stats table."""
    out = {f"rows/{k}": v for k, v in built.sizes().items()}
    for key in ("read", "bad", "unmapped", "kept"):
        out[f"sources/{key}"] = sum(s[key] for s in built.stats)
    return out
