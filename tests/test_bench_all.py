"""`make bench` (scripts/bench_all.py) and the benchmarks it runs that had no smoke test: each on the tiny model or
on runs the suite already trained, writing its JSON record (commit, date, CPU, command, table), and the rendering of
docs/benchmarks.md's generated part from those records."""

import json
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT
from test_pipeline import finished_chain  # noqa: F401 (the pipeline chain the suite trains once)


def run_script(monkeypatch, name: str, *args: str) -> None:
    """scripts/<name> in this process (no second interpreter start), as `python scripts/<name> <args>`."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")
        raise SystemExit(0)
    assert stop.value.code in (0, None), stop.value.code


def test_main_job_benchmark_reads_finished_pipelines(monkeypatch, finished_chain, tmp_path):  # noqa: F811
    out = tmp_path / "main_job.json"
    run_script(monkeypatch, "bench_main_job.py", "--from", str(finished_chain / "pipe"), "--out-json", str(out))
    record = json.loads(out.read_text())
    (run,) = record["runs"]
    assert set(run["seconds"]) == {"data", "sft", "rm", "dpo", "safety_eval"} and run["total_seconds"] > 0
    assert run["figures"]["after/os"] is not None and record["commit"] != "unknown" and record["cpu"]
    assert record["command"] == f"python scripts/bench_main_job.py --from {finished_chain / 'pipe'} --out-json {out}"
    assert "| sft (s) |" in record["table_md"] and "| os |" in record["table_md"]
    # records of runs made at different times join into one table (--add, no new seeds)
    both = tmp_path / "both.json"
    run_script(monkeypatch, "bench_main_job.py", "--seeds", "", "--add", str(out), str(out), "--out-json", str(both))
    joined = json.loads(both.read_text())
    assert [{k: v for k, v in r.items() if k not in ("commit", "omp_num_threads")} for r in joined["runs"]] == [run] * 2
    assert joined["runs"][0]["commit"] == record["commit"] and "mean and range over 2 run(s)" in joined["table_md"]


def test_eval_benchmark_on_the_tiny_model(monkeypatch, tmp_path):
    out = tmp_path / "eval.json"
    run_script(monkeypatch, "bench_eval.py", "--model", "tiny", "--prompts", "4", "--batch", "4",
               "--max-new-tokens", "4", "--out-json", str(out))
    record = json.loads(out.read_text())
    assert record["one_at_a_time"]["generated_tokens"] > 0 and record["batched"]["generated_tokens"] > 0
    assert "| batched (4) |" in record["table_md"] and "speed-up" in record["table_md"]


def test_ppo_benchmark_runs_our_side_on_the_tiny_model(tmp_path):
    """TRL 1.12's side needs its own virtualenv from PyPI (the full benchmark makes it); ours runs here."""
    out = tmp_path / "ppo.json"
    res = subprocess.run([sys.executable, "scripts/bench_ppo.py", "--model", "tiny", "--skip-trl", "--updates", "2",
                          "--batch", "4", "--mini", "4", "--epochs", "1", "--max-new-tokens", "4",
                          "--work", str(tmp_path / "work"), "--out-json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["results"]["align"]["peak_rss_mb"] > 0 and len(record["results"]["align"]["seconds"]) == 2
    assert "| align (align/rl/ppo.py) |" in record["table_md"]


def test_bench_all_renders_the_records_and_keeps_the_history(monkeypatch, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_record

    monkeypatch.setattr(sys, "argv", ["bench_eval.py", "--model", "tiny"])
    bench_record.write(bench / "eval.json", "bench_eval.py", "| mode | seconds |\n|---|---|\n| batched | 1.0 |")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nWhat this file is.\n\n## Round 1\n\nan old measurement\n")
    for _ in range(2):  # the second run replaces the generated part instead of adding another
        run_script(monkeypatch, "bench_all.py", "--render-only", "--bench-dir", str(bench), "--doc", str(doc))
    text = doc.read_text()
    assert text.count("## Current figures (`make bench`)") == 1 and text.endswith("## Round 1\n\nan old measurement\n")
    assert text.index("What this file is.") < text.index("## Current figures") < text.index("## Round 1")
    assert "`python scripts/bench_eval.py --model tiny`" in text and "| batched | 1.0 |" in text
    assert "Not measured yet: `python scripts/bench_all.py --only main_job`." in text
