"""Peak memory of each training stage with peft=full against peft=lora, on one model, data and step count.

Each stage runs in its own child process, so a peak (the child's ru_maxrss: CPU memory, imports and model loading
included) belongs to one stage. The lora chain and the full chain each run sft first, then rm, dpo and kto on it,
as the pipeline does. Writes the raw results (JSON) and prints a markdown table:

    python scripts/bench_stage_memory.py                          # the embedded SmolLM2-135M, 8 steps per stage
    python scripts/bench_stage_memory.py --model tiny --steps 1 --stages sft   # smoke run (tests/test_bench_scripts.py)
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record

STAGES = ("sft", "rm", "dpo", "kto")
METHODS = ("lora", "full")
MARK = "bench_stage_memory result: "


def overrides(args, method: str, stage: str, out: str) -> list[str]:
    """The same data, steps and batch for every stage and method; only peft= and the stage differ."""
    return [f"stage={stage}", f"model={args.model}", f"peft={method}", "data=tax_assistant", "scope=tax_assistant",
            "tracking=none", f"run.output_dir={out}", f"run.name={method}", f"data.max_rows={args.rows}",
            f"trainer.max_steps={args.steps}", f"trainer.per_device_train_batch_size={args.batch}",
            f"trainer.max_length={args.max_length}", "trainer.save_steps=100000", "+trainer.extra.save_strategy=no",
            "data.rejected_source=template", *args.extra]  # no generation: the stages' training alone


def child(cfg_overrides: list[str]) -> None:
    """One stage in this process; prints its peak RSS and timings as one JSON line after MARK."""
    from align.__main__ import _one_line, quiet_libraries
    from align.config import compose
    from align.launch import run_stage

    quiet_libraries()
    res = {"ok": False}
    started = time.time()
    try:
        m = run_stage(compose(*cfg_overrides))
        res.update(ok=True, s_per_step=m["train/train_runtime"] / max(m["train/global_step"], 1),
                   trainable_params=m.get("trainable_params"), total_params=m.get("total_params"),
                   first_loss=m.get("train/first_loss"), last_loss=m.get("train/last_loss"),
                   tokens_per_second=m.get("train/tokens_per_second"),
                   shared_prefix_token_ratio=m.get("train/shared_prefix_token_ratio"))
    except Exception as exc:  # one cell of the table, not the end of the benchmark
        res["error"] = _one_line(exc)
    res["seconds"] = round(time.time() - started, 1)
    res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(MARK + json.dumps(res), flush=True)


def run_one(args, method: str, stage: str, out: str) -> dict:
    return run_child(__file__, overrides(args, method, stage, out))


def run_child(script: str, cfg_overrides: list[str]) -> dict:
    """`script --child -- <overrides>` in a fresh process (whose main calls child()); its result line as a dict."""
    cmd = [sys.executable, script, "--child", "--", *cfg_overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
        return {"ok": False, "error": f"exit code {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len(MARK):])


def table(results: dict, stages: list[str]) -> str:
    rows = ["| stage | lora peak RSS (MB) | full peak RSS (MB) | full / lora | lora s/step | full s/step |",
            "|---|---|---|---|---|---|"]
    for stage in stages:
        lo, fu = results["lora"][stage], results["full"][stage]
        if not (lo["ok"] and fu["ok"]):
            err = lo.get("error") or fu.get("error")
            rows.append(f"| {stage} | failed: {err} | | | | |")
            continue
        rows.append(f"| {stage} | {lo['max_rss_mb']:,.0f} | {fu['max_rss_mb']:,.0f} | "
                    f"{fu['max_rss_mb'] / lo['max_rss_mb']:.2f} | {lo['s_per_step']:.2f} | {fu['s_per_step']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="conf/model name (tiny for smoke runs)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=64, help="rows per split (data.max_rows)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list, sft first (the others start from it)")
    p.add_argument("--out-json", type=Path, default=Path("docs/bench/stage_memory.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every stage, e.g. data=instructions")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.overrides)
    results = {}
    with tempfile.TemporaryDirectory(prefix="align-stage-memory-") as out:
        for method in METHODS:
            results[method] = {}
            for stage in args.stages.split(","):  # sft first: the others start from it
                r = run_one(args, method, stage, out)
                results[method][stage] = r
                print(f"peft={method} stage={stage}: " + (f"{r['max_rss_mb']:,.0f} MB, {r['seconds']} s" if r["ok"]
                      else f"failed: {r['error']}"), file=sys.stderr, flush=True)
    if not any(r["ok"] for by_stage in results.values() for r in by_stage.values()):
        sys.exit("every run failed; nothing written")
    print(bench_record.write(args.out_json, "bench_stage_memory.py", table(results, args.stages.split(",")),
                             settings=vars(args) | {"out_json": str(args.out_json)}, results=results)["table_md"])

if __name__ == "__main__":
    main()
