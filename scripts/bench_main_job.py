"""The main job (`make run`'s pipeline) per stage and over seeds: seconds of each stage and the held-out figures.

Each seed runs `python -m align seed=<s>` (the main job's config, W&B off) alone in a child process under a fresh
output folder, one after the other; the stage seconds come from each stage's manifest and the figures from
safety_eval's metrics. `--from` reads pipelines already run instead (their run folders), so nothing trains:

    python scripts/bench_main_job.py                      # seeds 42,1,2 on the embedded model (about 15 min each)
    python scripts/bench_main_job.py --seeds 42 model.cpu_bf16=false      # one seed, fp32 (extra overrides)
    python scripts/bench_main_job.py --from outputs/main                  # a finished `make run`
    python scripts/bench_main_job.py --seeds '' --add a.json b.json      # seeds run at different times, joined

Writes the raw JSON (docs/bench/main_job.json) and prints two tables: seconds per stage per seed, and each
held-out figure's mean and range over the seeds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_record
from align.config import STAGES  # the project's one list, in pipeline order

FIGURES = ("ar_in", "rr_out", "rr_unsafe", "rr_adv", "os")


def read_run(folder: Path) -> dict:
    """Stage seconds and the before/after held-out figures of a finished pipeline run folder."""
    seconds = {}
    for stage in STAGES:
        manifest = folder / stage / "manifest.json"
        if manifest.exists():
            seconds[stage] = json.loads(manifest.read_text())["seconds"]
    metrics_file = folder / "safety_eval" / "metrics.json"
    if not seconds or not metrics_file.exists():
        sys.exit(f"{folder}: not a finished pipeline run (no stage manifests or no safety_eval/metrics.json)")
    metrics = json.loads(metrics_file.read_text())
    figures = {f"{when}/{k}": metrics.get(f"{when}/{k}") for when in ("before", "after") for k in FIGURES}
    return {"folder": str(folder), "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
            "figures": figures, "n_prompts": metrics.get("n_prompts")}


def omp_threads() -> str:
    return os.environ.get("OMP_NUM_THREADS", "unset (torch's default: every core)")


def added_runs(records: list[Path]) -> list[dict]:
    """The runs of earlier records of this script, each with the commit and thread count its record gives."""
    runs = []
    for path in records:
        record = json.loads(path.read_text())
        runs += [{"commit": record["commit"], "omp_num_threads": record.get("omp_num_threads", "?"), **run}
                 for run in record["runs"]]
    return runs


def run_seed(seed: int, overrides: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "align", f"seed={seed}", f"run.name=seed{seed}", f"run.output_dir={out}",
           "tracking=none", *overrides]
    proc = subprocess.run(cmd, cwd=bench_record.ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
        sys.exit(f"seed {seed}: the main job failed (exit {proc.returncode}): {tail}")
    return {"seed": seed, **read_run(Path(out) / f"seed{seed}"), "commit": bench_record.commit(),
            "omp_num_threads": omp_threads()}


def table(runs: list[dict]) -> str:
    stages = [s for s in STAGES if any(s in r["seconds"] for r in runs)]
    rows = ["| run | " + " | ".join(f"{s} (s)" for s in stages) + " | total (min) |",
            "|---|" + "---|" * (len(stages) + 1)]
    for r in runs:
        name = f"seed {r['seed']}" if "seed" in r else r["folder"]
        rows.append(f"| {name} | " + " | ".join(f"{r['seconds'].get(s, 0):.0f}" for s in stages)
                    + f" | {r['total_seconds'] / 60:.1f} |")
    rows += ["", f"held out ({runs[0]['n_prompts']} prompts), mean and range over {len(runs)} run(s):", "",
             "| figure | before | after (mean) | after (min-max) |", "|---|---|---|---|"]
    for k in FIGURES:
        after = [r["figures"][f"after/{k}"] for r in runs if r["figures"][f"after/{k}"] is not None]
        before = runs[0]["figures"][f"before/{k}"]
        if after:
            rows.append(f"| {k} | {before if before is None else round(before, 3)} | "
                        f"{statistics.mean(after):.3f} | {min(after):.3f}-{max(after):.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2", help="comma list; one main job per seed")
    p.add_argument("--from", dest="folders", nargs="+", type=Path, help="finished run folders to read instead")
    p.add_argument("--add", nargs="+", type=Path, default=[],
                   help="earlier records of this script whose runs come first (seeds run at different times); "
                        "with --seeds '' only those")
    p.add_argument("--out-json", type=Path, default=Path("docs/bench/main_job.json"))
    p.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. model.cpu_bf16=false")
    args = p.parse_args()
    runs = added_runs(args.add)  # each run keeps the commit and thread count it ran with
    if args.folders:
        runs += [read_run(folder) for folder in args.folders]
    else:
        with tempfile.TemporaryDirectory(prefix="align-main-job-") as out:
            for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
                runs.append(run_seed(seed, args.overrides, out))
                print(f"seed {seed}: {runs[-1]['total_seconds']:.0f} s, OS {runs[-1]['figures']['after/os']}",
                      file=sys.stderr, flush=True)
    if not runs:
        sys.exit("nothing to report: give --seeds, --from or --add")
    made = [r for r in runs if "seed" in r]  # trained by this script, here or in an added record
    lead = "" if not made else (
        f"OMP_NUM_THREADS {', '.join(sorted({r.get('omp_num_threads', omp_threads()) for r in made}))}; the seeds one "
        f"after the other, at commit {', '.join(sorted({r.get('commit', '?') for r in made}))}\n\n")
    print(bench_record.write(args.out_json, "bench_main_job.py", lead + table(runs), runs=runs,
                             omp_num_threads=omp_threads())["table_md"])


if __name__ == "__main__":
    main()
