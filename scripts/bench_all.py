"""`make bench`: run every benchmark, then regenerate the current figures at the top of docs/benchmarks.md.

Each benchmark script writes its raw JSON under docs/bench/ (scripts/bench_record.py: the commit, date, CPU model and
flags, command, and its table); this script runs them one after the other, alone, then rewrites the part of
docs/benchmarks.md between its two markers from those JSON files. The rounds below the markers are the project's
record of earlier measurements and stay as written.

    python scripts/bench_all.py                       # every benchmark (a few hours on 2 CPU cores), then the tables
    python scripts/bench_all.py --only shared_prefix,eval
    python scripts/bench_all.py --render-only         # the tables from the JSON already in docs/bench/
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- make bench: generated from docs/bench/*.json by scripts/bench_all.py; do not edit by hand -->"
END = "<!-- make bench: end of the generated part -->"
# name (docs/bench/<name>.json), title, the script and its arguments
BENCHES = [
    ("main_job", "The main job: seconds per stage and the held-out figures over three seeds",
     ["bench_main_job.py"]),
    ("throughput", "SFT's tokens per second and share of the machine's measured matmul peak",
     ["bench_throughput.py"]),
    ("shared_prefix", "Shared prefixes: sft and dpo step time and peak memory on the main job's rows, DPO/SFT memory",
     ["bench_shared_prefix.py"]),
    ("stage_memory", "Peak memory per stage, peft=full against lora", ["bench_stage_memory.py"]),
    ("eval", "Batched against one-at-a-time generation", ["bench_eval.py"]),
    ("ppo", "Our PPO against TRL 1.12's (the last TRL with a PPOTrainer)", ["bench_ppo.py", "--model", "smollm2"]),
]


def run(names: list[str], bench_dir: Path) -> list[str]:
    """Run the named benchmarks, each writing bench_dir/<name>.json; the names that failed."""
    failed = []
    for name, _, cmd in BENCHES:
        if name not in names:
            continue
        print(f"make bench: {name}", file=sys.stderr, flush=True)
        out = (bench_dir / f"{name}.json").resolve()
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out  # the command as a reader would type it
        proc = subprocess.run([sys.executable, f"scripts/{cmd[0]}", *cmd[1:], "--out-json", str(shown)], cwd=ROOT)
        if proc.returncode != 0:
            failed.append(name)
    return failed


def render(bench_dir: Path) -> str:
    """The generated part: one section per benchmark with a JSON record, its provenance line, then its table."""
    parts = [BEGIN, "## Current figures (`make bench`)", ""]
    for name, title, _ in BENCHES:
        path = bench_dir / f"{name}.json"
        if not path.exists():
            parts += [f"### {title}", "", f"Not measured yet: `python scripts/bench_all.py --only {name}`.", ""]
            continue
        record = json.loads(path.read_text())
        table = record.get("table_md") or (f"(this JSON predates its table: `python scripts/bench_all.py --only "
                                           f"{name}` measures it again)")
        parts += [f"### {title}", "",
                  f"Commit {record.get('commit', 'unknown')}, {record['date']}, {record['cpu']}: `{record['command']}` "
                  f"(raw: `docs/bench/{name}.json`)", "", table, ""]
    return "\n".join([*parts, END])


def rewrite(doc: Path, generated: str) -> None:
    """Replace the generated part of `doc` (inserted after its first heading's paragraph when absent)."""
    text = doc.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + generated + rest.split(END, 1)[1]
    else:
        first, _, rest = text.partition("\n\n## ")
        text = f"{first}\n\n{generated}\n\n## {rest}"
    doc.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma list of: " + ", ".join(name for name, _, _ in BENCHES))
    p.add_argument("--render-only", action="store_true", help="regenerate the tables without running anything")
    p.add_argument("--bench-dir", type=Path, default=ROOT / "docs" / "bench")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    names = args.only.split(",") if args.only else [name for name, _, _ in BENCHES]
    unknown = sorted(set(names) - {name for name, _, _ in BENCHES})
    if unknown:
        sys.exit(f"--only: no benchmark named {', '.join(unknown)}")
    failed = [] if args.render_only else run(names, args.bench_dir)
    rewrite(args.doc, render(args.bench_dir))
    print(f"make bench: wrote {args.doc}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
