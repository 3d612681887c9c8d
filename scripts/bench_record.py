"""The provenance every benchmark's JSON carries, and its one writer, so `make bench` (scripts/bench_all.py) can
render each result as a table row set with the commit, date, CPU and command that made it."""

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checkout's short commit, with +dirty when tracked files differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "align", "scripts", "conf"],
                               cwd=ROOT).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def write(path: Path, script: str, table_md: str, **fields) -> dict:
    """Write the record (provenance, `fields`, the markdown table) as JSON to `path`; returns it."""
    from align.models import cpu_description

    record = {"date": datetime.now().isoformat(timespec="seconds"), "commit": commit(), "cpu": cpu_description(),
              "command": " ".join(["python", f"scripts/{script}", *sys.argv[1:]]), **fields, "table_md": table_md}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
